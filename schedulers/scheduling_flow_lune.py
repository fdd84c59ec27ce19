"""FlowLuneScheduler: Euler sampling of a rectified-flow model, shift applied exactly once.

Noise convention (the formulas are in ``flow_lune.flow.convention``)::

    x_sigma = (1 - sigma) * x0 + sigma * eps     sigma = 1 is pure noise, sigma = 0 is data
    model(x_sigma, timestep = 1000 * sigma) = v = eps - x0
    x <- x + (sigma_next - sigma) * v

Interchangeable with diffusers' ``FlowMatchEulerDiscreteScheduler`` (``from_config`` works both
ways and keeps ``shift``), without its two traps: ``set_timesteps`` shifts its base grid once
(diffusers shifts an already shifted training table a second time), and ``init_noise_sigma``
exists, so pipelines built on ``StableDiffusionPipeline.prepare_latents`` work.

Base grid: ``num_inference_steps`` values evenly spaced from 1 down to ``1 / num_inference_steps``
(``1 - i / N``, i = 0..N-1), then shifted; a terminal 0 is appended. For 4 steps at shift 3 the
sigmas are ``shift(1), shift(0.75), shift(0.5), shift(0.25), 0`` = ``1, 0.9, 0.75, 0.5, 0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from flow_lune.flow.convention import (
    euler_step,
    flow_state,
    flow_timestep,
    shift_sigma,
    sigma_from_flow_timestep,
)


@dataclass
class FlowLuneSchedulerOutput(BaseOutput):
    """Output of ``FlowLuneScheduler.step``.

    Args:
        prev_sample: the state at the next (lower) sigma.
    """

    prev_sample: torch.Tensor


class FlowLuneScheduler(SchedulerMixin, ConfigMixin):
    """Euler sampler for rectified-flow models (velocity prediction, ``v = eps - x0``).

    Args:
        num_train_timesteps: the model's timestep is ``sigma * num_train_timesteps``.
        shift: time shift ``s * sigma / (1 + (s - 1) * sigma)`` applied once to the base grid.
            The default 1.0 is diffusers' default: ``from_config`` drops defaulted keys when a config
            moves between classes, so equal defaults keep the shift the same in both directions.
            Flow Lune's trainer writes its training shift (3 by default) explicitly.
    """

    # Config keys of these classes are accepted silently by from_config.
    _compatibles = ["FlowMatchEulerDiscreteScheduler"]
    order = 1
    init_noise_sigma = 1.0  # a flow sample at sigma = 1 is plain unit Gaussian noise

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0):
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}; use 1.0 for no shift.")
        if num_train_timesteps <= 0:
            raise ValueError(f"num_train_timesteps must be > 0, got {num_train_timesteps}.")
        self.sigmas: torch.Tensor | None = None
        self.timesteps: torch.Tensor | None = None
        self.num_inference_steps: int | None = None
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @property
    def shift(self) -> float:
        return self.config.shift

    @property
    def step_index(self) -> int | None:
        """Index of the current sigma; advances by one after each ``step``."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start stepping at ``begin_index`` (for image-to-image); set by pipelines before the loop."""
        self._begin_index = begin_index

    def base_sigmas(self, num_inference_steps: int) -> torch.Tensor:
        """The unshifted base grid ``1 - i / N`` for ``i = 0..N-1`` (float64)."""
        return 1 - torch.arange(num_inference_steps, dtype=torch.float64) / num_inference_steps

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        """Build the sampling schedule.

        Args:
            num_inference_steps: number of Euler steps on the shifted base grid.
            device: where ``timesteps`` (float32) and ``sigmas`` (float64; float32 on MPS) live.
            sigmas: explicit, strictly decreasing sigmas in [0, 1], used exactly as given (no
                shift); a terminal 0 is appended unless the last value already is 0.
        """
        if sigmas is not None:
            sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten().cpu()
            if sigmas.numel() == 0:
                raise ValueError("sigmas is empty; pass at least one sigma in (0, 1].")
            if num_inference_steps is not None and num_inference_steps != len(sigmas):
                raise ValueError(
                    f"num_inference_steps={num_inference_steps} but {len(sigmas)} sigmas; pass one of the two."
                )
            if not torch.isfinite(sigmas).all() or sigmas.min() < 0 or sigmas.max() > 1:
                raise ValueError(f"sigmas must lie in [0, 1], got {sigmas.tolist()}.")
            if sigmas[-1] != 0:
                sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
            if len(sigmas) < 2 or not (sigmas[1:] < sigmas[:-1]).all():
                raise ValueError(f"sigmas must be strictly decreasing and start above 0, got {sigmas.tolist()}.")
        else:
            if num_inference_steps is None:
                raise ValueError("Pass num_inference_steps or sigmas to set_timesteps; got neither.")
            if int(num_inference_steps) != num_inference_steps or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps}.")
            base = self.base_sigmas(int(num_inference_steps))
            sigmas = torch.cat([shift_sigma(base, float(self.config.shift)), base.new_zeros(1)])

        self.num_inference_steps = len(sigmas) - 1
        # sigmas stay float64 (MPS has none: float32 there), so a pipeline forms the model's timesteps from them
        # exactly and a wrapped teacher is queried at exact timesteps; the Euler step works in float32.
        exact = torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64
        self.sigmas = sigmas.to(device=device, dtype=exact)
        self.timesteps = flow_timestep(sigmas[:-1], self.config.num_train_timesteps).to(device, torch.float32)
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: float | torch.Tensor) -> int:
        """Index of ``timestep`` in ``self.timesteps`` (nearest value, so a float round trip is harmless)."""
        if self.timesteps is None:
            raise ValueError("Call set_timesteps before step.")
        timestep = torch.as_tensor(timestep, dtype=torch.float32, device=self.timesteps.device).flatten()[0]
        return int((self.timesteps - timestep).abs().argmin())

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """Identity: the flow model takes ``x_sigma`` unscaled."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> FlowLuneSchedulerOutput | tuple[torch.Tensor]:
        """One Euler step from the current sigma to the next with velocity ``model_output``.

        Computed in float32 and cast back to ``model_output``'s dtype, as diffusers does.
        ``generator`` is accepted for interface compatibility; the Euler step is deterministic.
        """
        if self.sigmas is None:
            raise ValueError("Call set_timesteps before step.")
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)
        if self._step_index >= self.num_inference_steps:
            raise ValueError(
                f"step called {self._step_index + 1} times for a schedule of {self.num_inference_steps} steps; "
                "call set_timesteps again to start a new schedule."
            )
        sigma = self.sigmas[self._step_index]
        sigma_next = self.sigmas[self._step_index + 1]
        prev_sample = euler_step(sample.to(torch.float32), model_output, sigma, sigma_next).to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return FlowLuneSchedulerOutput(prev_sample=prev_sample)

    def _sigma_of(self, timestep: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        timestep = torch.as_tensor(timestep, dtype=like.dtype, device=like.device)
        return sigma_from_flow_timestep(timestep, self.config.num_train_timesteps)

    def scale_noise(self, sample: torch.Tensor, timestep: float | torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The flow state at ``sigma = timestep / num_train_timesteps`` (diffusers' name and argument order)."""
        return flow_state(sample, noise, self._sigma_of(timestep, sample))

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The flow state for per-sample ``timesteps`` (DDPM schedulers' name and argument order)."""
        return flow_state(original_samples, noise, self._sigma_of(timesteps, original_samples))

    def __len__(self) -> int:
        return self.config.num_train_timesteps
