"""The exact bridge from an epsilon-prediction DDPM teacher to flow coordinates (DESIGN.md section 2).

With ``a_t = sqrt(abar_t)``, ``s_t = sqrt(1 - abar_t)`` from the teacher's own scheduler config and
``n(sigma) = sqrt((1 - sigma)^2 + sigma^2)``:

    sigma(t) = s_t / (a_t + s_t)            x_t = x_sigma / n(sigma)
    t(sigma): linear interpolation of log(s_t / a_t) over the 1000-entry table (k-diffusion)
    eps_hat = teacher(x_t, t(sigma), c)
    x0_hat  = (x_sigma - sigma * eps_hat) / (1 - sigma)
    v*      = eps_hat - x0_hat

Euler in sigma with ``v*`` on the sigma grid of DDIM's timesteps *is* DDIM (eta = 0). Outside the
teacher's range, sigma > sigma(999) is pure noise to the teacher (DDIM starts there from ``n(sigma(999)) z``):
``v* = (2 sigma - 1) / n(sigma)^2 * x_sigma``, the rescaling ``x_sigma = n(sigma) z`` that carries noise at
sigma = 1 to that start; sigma < sigma(0) queries t = 0 with the formulas above.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .convention import FLOW_TIMESTEPS, expand_sigma, sigma_from_flow_timestep

# States this close above sigma(T-1) keep the in-range form (t clamps to T-1 there): a DDIM grid given in float32
# starts at sigma(T-1) rounded, and must stay DDIM.
SWITCH_SLACK = 1e-6

_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule")


@dataclass(frozen=True)
class TeacherSchedule:
    """The teacher's DDPM noise table in float64, and its range in flow sigma."""

    alphas_cumprod: torch.Tensor  # (T,), abar_t for t = 0..T-1

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any] | None) -> TeacherSchedule:
        """Read the schedule from the teacher's own scheduler config (any diffusers DDPM-family scheduler).

        Raises ``ValueError`` for a missing config, a non-epsilon prediction type or zero-terminal-SNR betas.
        """
        if config is None:
            raise ValueError(
                "The teacher has no scheduler config; Flow Lune reads the noise schedule from it. "
                "Load the teacher as a diffusers pipeline folder (with scheduler/scheduler_config.json)."
            )
        config = dict(config)
        missing = [k for k in _SCHEDULE_KEYS if k not in config and "trained_betas" not in config]
        if missing:
            raise ValueError(f"The teacher's scheduler config lacks {missing}; it does not describe a DDPM schedule.")
        prediction_type = config.get("prediction_type", "epsilon")
        if prediction_type != "epsilon":
            raise ValueError(
                f"The teacher's prediction_type is {prediction_type!r}; Flow Lune distils epsilon-prediction "
                "SD1.5 teachers only (prediction_type='epsilon')."
            )
        if config.get("rescale_betas_zero_snr", False):
            raise ValueError(
                "The teacher's scheduler config sets rescale_betas_zero_snr=True; SD1.5 teachers are trained "
                "without it, and the bridge uses the teacher's betas unchanged. Set it to false."
            )
        from diffusers import DDPMScheduler

        # DDPMScheduler computes the betas of every beta_schedule exactly as the teacher's scheduler does.
        keys = (*_SCHEDULE_KEYS, "trained_betas")
        ddpm = DDPMScheduler(**{k: config[k] for k in keys if config.get(k) is not None})
        betas = ddpm.betas.to(torch.float64)
        return cls(alphas_cumprod=torch.cumprod(1 - betas, dim=0))

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def a(self) -> torch.Tensor:
        """``a_t = sqrt(abar_t)``."""
        return self.alphas_cumprod.sqrt()

    @property
    def s(self) -> torch.Tensor:
        """``s_t = sqrt(1 - abar_t)``."""
        return (1 - self.alphas_cumprod).sqrt()

    @property
    def log_snr_sigmas(self) -> torch.Tensor:
        """``log(s_t / a_t)``, increasing in t: the table t(sigma) interpolates over."""
        return torch.log(self.s / self.a)

    @property
    def sigma_min(self) -> float:
        """``sigma(0)``, the least noisy state the teacher knows (0.02834 for SD1.5)."""
        return float(sigma_from_t(torch.tensor(0), self))

    @property
    def sigma_max(self) -> float:
        """``sigma(T-1)``, the noisiest state the teacher knows (0.93596 for SD1.5)."""
        return float(sigma_from_t(torch.tensor(self.num_train_timesteps - 1), self))


def sigma_from_t(t: torch.Tensor, schedule: TeacherSchedule) -> torch.Tensor:
    """Flow sigma of an integer teacher timestep: ``sigma(t) = s_t / (a_t + s_t)`` (float64)."""
    t = torch.as_tensor(t, device="cpu").long()
    a, s = schedule.a[t], schedule.s[t]
    return s / (a + s)


def t_from_sigma(sigma: torch.Tensor, schedule: TeacherSchedule) -> torch.Tensor:
    """Continuous teacher timestep of flow sigma, clamped to [0, T-1].

    Linear interpolation of ``log(sigma / (1 - sigma))`` in the table ``log(s_t / a_t)``, as
    k-diffusion and ``EulerDiscreteScheduler._sigma_to_t`` do. Returned in ``sigma``'s dtype.
    """
    sigma = torch.as_tensor(sigma)
    table = schedule.log_snr_sigmas.to(sigma.device)
    sig = sigma.to(torch.float64).clamp(0, 1)
    log_rho = torch.log(sig) - torch.log1p(-sig)  # -inf at 0, +inf at 1: both clamp below
    low = (torch.searchsorted(table, log_rho.contiguous(), right=True) - 1).clamp(0, len(table) - 2)
    w = ((log_rho - table[low]) / (table[low + 1] - table[low])).clamp(0, 1)
    return (low + w).to(sigma.dtype if sigma.is_floating_point() else torch.float64)


def noise_norm(sigma: torch.Tensor) -> torch.Tensor:
    """``n(sigma) = sqrt((1 - sigma)^2 + sigma^2)``: the flow state's scale relative to the DDPM state."""
    return ((1 - sigma) ** 2 + sigma**2).sqrt()


def teacher_input(x_sigma: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """The teacher's state for a flow state: ``x_t = x_sigma / n(sigma)``."""
    return x_sigma / noise_norm(expand_sigma(sigma, x_sigma))


@dataclass
class TeacherQuery:
    """What to feed the teacher for a batch of flow states."""

    x_t: torch.Tensor  # teacher input, x_sigma / n(sigma)
    t: torch.Tensor  # continuous teacher timesteps, shape (B,)


def teacher_query(x_sigma: torch.Tensor, sigma: torch.Tensor, schedule: TeacherSchedule) -> TeacherQuery:
    """The teacher's input and continuous timestep for flow states ``x_sigma`` at per-sample ``sigma`` (B,).

    Outside [sigma(0), sigma(T-1)] the timestep clamps to 0 or T-1, as DESIGN.md section 2 says.
    ``t`` is computed from ``sigma`` at its own precision (not ``x_sigma``'s) and kept at least float32:
    fp16 resolves sigma only to about 5e-4 and t only to half a step near 999.
    """
    sigma = torch.as_tensor(sigma, device=x_sigma.device)
    sigma = (sigma if sigma.is_floating_point() else sigma.double()).expand(x_sigma.shape[0])
    t = t_from_sigma(sigma, schedule).to(torch.promote_types(x_sigma.dtype, torch.float32))
    return TeacherQuery(x_t=teacher_input(x_sigma, sigma), t=t)


def velocity_from_eps(
    x_sigma: torch.Tensor, sigma: torch.Tensor, eps_hat: torch.Tensor, schedule: TeacherSchedule
) -> torch.Tensor:
    """Teacher-consistent velocity ``v*`` from the teacher's ``eps_hat`` at ``teacher_query``'s input.

    In range (and below sigma(0)): ``x0_hat = (x_sigma - sigma * eps_hat) / (1 - sigma)``, ``v* = eps_hat - x0_hat``.

    Above sigma(T-1) the teacher has no state: DDIM starts at sigma(T-1) from pure noise ``n(sigma(T-1)) z``.
    The flow that carries noise ``z`` at sigma = 1 to exactly that start is the rescaling ``x_sigma = n(sigma) z``:

        v* = d x_sigma / d sigma = n'(sigma) / n(sigma) * x_sigma = (2 sigma - 1) / n(sigma)^2 * x_sigma

    (no ``eps_hat``: guidance leaves it unchanged). It is discontinuous at the switch, where content starts
    to form, as DDIM's first step does; the earlier straight line through the t = T-1 estimate ``x0_hat``
    amplified its error by ``1 / a_max`` and made the teacher's own bridge from sigma = 1 draw badly
    (docs/math.md, "Outside the teacher's range").
    """
    sigma = torch.as_tensor(sigma, device=x_sigma.device).expand(x_sigma.shape[0])
    # Which side of the switch, decided at sigma's own precision (float32 rounds sigma(T-1) up by up to 3e-8;
    # half precision would move states near it across): the in-range form is exact up to SWITCH_SLACK above.
    precise = sigma.to(torch.promote_types(sigma.dtype, torch.float32))
    above = (precise > schedule.sigma_max + SWITCH_SLACK).reshape(-1, *([1] * (x_sigma.ndim - 1)))
    sig = expand_sigma(sigma.to(x_sigma.dtype), x_sigma)
    # In-range form; the denominator is kept away from 0 where the other branch is taken.
    x0_in = (x_sigma - sig * eps_hat) / torch.where(above, torch.ones_like(sig), 1 - sig)
    v_in = eps_hat - x0_in
    v_above = (2 * sig - 1) / noise_norm(sig) ** 2 * x_sigma
    return torch.where(above, v_above, v_in)


class EpsilonToFlowUNet(nn.Module):
    """An epsilon-prediction ``UNet2DConditionModel`` seen as a flow model: the one teacher query of Flow Lune.

    ``velocity(x_sigma, sigma, c)`` forms the teacher's input and timestep (``teacher_query``), runs the
    teacher once in its own dtype and returns the teacher-consistent velocity ``v*`` (``velocity_from_eps``)
    in ``x_sigma``'s dtype. ``t(sigma)`` is computed at sigma's precision: pass float64 sigmas to query the
    teacher at exact timesteps. Called like a UNet with ``(x_sigma, timestep = flow_timestep(sigma), c)`` it
    does the same with ``sigma = sigma_from_flow_timestep(timestep)`` in float64 and returns ``v*`` in
    ``.sample`` (as k-diffusion's ``external.py`` wraps a discrete eps model as a continuous denoiser), so
    pipelines sample it like a student. Training targets, latent generation and validation all query here.
    """

    def __init__(
        self, unet: nn.Module, scheduler_config: Mapping[str, Any] | None, flow_timesteps: int = FLOW_TIMESTEPS
    ):
        super().__init__()
        self.unet = unet
        self.schedule = TeacherSchedule.from_scheduler_config(scheduler_config)
        self.flow_timesteps = flow_timesteps  # the flow model's timestep is flow_timestep(sigma, flow_timesteps)

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def velocity(
        self,
        x_sigma: torch.Tensor,
        sigma: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        """``v*`` at flow states ``x_sigma`` (B, ...) and per-sample or scalar ``sigma``, from ONE teacher forward."""
        if not isinstance(sigma, torch.Tensor):
            sigma = torch.tensor(sigma, dtype=torch.float64)  # a Python number keeps its full precision
        sigma = sigma.to(x_sigma.device)
        sigma = (sigma if sigma.is_floating_point() else sigma.double()).expand(x_sigma.shape[0])
        query = teacher_query(x_sigma, sigma, self.schedule)
        dtype = self.unet.dtype  # a float32 state may drive a half-precision teacher
        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states.to(dtype)
        eps_hat = self.unet(query.x_t.to(dtype), query.t, encoder_hidden_states, *args, return_dict=False, **kwargs)[0]
        return velocity_from_eps(x_sigma, sigma, eps_hat.to(x_sigma.dtype), self.schedule)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        *args: Any,
        return_dict: bool = True,
        **kwargs: Any,
    ):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        timestep = torch.as_tensor(timestep, device=sample.device).to(torch.float64)  # float64 for t(sigma)
        sigma = sigma_from_flow_timestep(timestep, self.flow_timesteps)
        v = self.velocity(sample, sigma, encoder_hidden_states, *args, **kwargs)
        if not return_dict:
            return (v,)
        return UNet2DConditionOutput(sample=v)
