"""How straight a model's sampling paths are: the figure that reflow should lower (docs/reflow.md).

A many-step Euler trajectory ``x_0 .. x_K`` of the flow ODE at sigmas ``s_0 > .. > s_K`` (from noise at
``s_0 = 1`` to the image at ``s_K = 0``) is compared with the straight line between its two ends. The trajectory
is collected by the pipeline itself through ``callback_on_step_end`` (no second sampling loop).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


def straightness(states: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Normalised mean squared deviation of a trajectory from the straight line between its ends, per sample:

        S = mean_k ||x_k - ((1 - u_k) x_end + u_k x_start)||^2 / ||x_start - x_end||^2,
        u_k = (s_k - s_K) / (s_0 - s_K)        (u = sigma when the path runs from sigma 1 to 0)

    over every state ``k = 0..K`` of the trajectory (the two ends contribute 0). ``states``: (K + 1, B, ...) with
    ``states[0] = x_start`` (noise) and ``states[-1] = x_end``; ``sigmas``: (K + 1,) decreasing. 0 for a straight
    path whatever its speed profile along the line; (B,) float64.
    """
    if states.ndim < 2 or states.shape[0] < 2:
        raise ValueError(f"states must be (K + 1, B, ...) with K >= 1, got shape {tuple(states.shape)}.")
    if sigmas.shape != (states.shape[0],):
        raise ValueError(f"sigmas must be ({states.shape[0]},) to match states, got {tuple(sigmas.shape)}.")
    x = states.double().flatten(2)  # (K + 1, B, D)
    s = sigmas.double().to(x.device)
    if not s[0] > s[-1]:
        raise ValueError(f"sigmas must run from noise to image (s_0 > s_K), got {s[0].item()} .. {s[-1].item()}.")
    u = ((s - s[-1]) / (s[0] - s[-1]))[:, None, None]
    start, end = x[0], x[-1]
    line = (1 - u) * end + u * start
    deviation = (x - line).pow(2).sum(-1).mean(0)  # (B,)
    return deviation / (start - end).pow(2).sum(-1).clamp_min(1e-30)


@dataclass
class Trajectory:
    """The states of one sampling call and their sigmas."""

    states: torch.Tensor  # (K + 1, B, C, h, w), float32 on the CPU; states[0] is the starting noise
    sigmas: torch.Tensor  # (K + 1,) float64, decreasing to 0


class TrajectoryRecorder:
    """A ``callback_on_step_end`` that keeps every state of the sampling loop (on the CPU, float32)."""

    def __init__(self, start: torch.Tensor):
        self.states = [start.detach().float().cpu()]

    def __call__(self, pipe: Any, i: int, t: Any, callback_kwargs: dict) -> dict:
        self.states.append(callback_kwargs["latents"].detach().float().cpu())
        return {}


@torch.no_grad()
def sample_trajectory(
    pipe: Any,
    noise: torch.Tensor,
    steps: int | None,
    guidance: float,
    prompts: Sequence[str] | None = None,
    **pipe_kwargs: Any,
) -> Trajectory:
    """The ``FlowLunePipeline`` run from ``latents=noise`` at sigma = 1 for ``steps`` Euler steps, every state kept.

    ``pipe_kwargs`` go to the pipeline call (e.g. ``sigmas=[...]`` with ``steps=None`` for an explicit grid). A
    teacher goes through ``FlowLunePipeline.from_teacher`` so that its states are flow states too.
    """
    recorder = TrajectoryRecorder(noise)
    dtype = pipe.unet.dtype
    pipe(
        list(prompts) if prompts is not None else None,
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=noise.to(pipe.device, dtype),
        height=noise.shape[-2] * pipe.vae_scale_factor,
        width=noise.shape[-1] * pipe.vae_scale_factor,
        output_type="latent",
        callback_on_step_end=recorder,
        **pipe_kwargs,
    )
    sigmas = pipe.scheduler.sigmas.detach().double().cpu()
    if len(recorder.states) != len(sigmas):
        raise RuntimeError(f"collected {len(recorder.states)} states for {len(sigmas)} sigmas.")
    return Trajectory(states=torch.stack(recorder.states), sigmas=sigmas)


def trajectory_straightness(
    pipe: Any, noise: torch.Tensor, steps: int, guidance: float, prompts: Sequence[str], batch_size: int = 48
) -> torch.Tensor:
    """``straightness`` of the pipeline's ``steps``-step path from each ``noise[i]`` with ``prompts[i]``: (B,)."""
    out = []
    for i in range(0, len(prompts), batch_size):
        traj = sample_trajectory(pipe, noise[i : i + batch_size], steps, guidance, prompts[i : i + batch_size])
        out.append(straightness(traj.states, traj.sigmas))
    return torch.cat(out)


def straightness_summary(
    pipe: Any, noise: torch.Tensor, steps: int, guidance: float, prompts: Sequence[str], batch_size: int = 48
) -> dict:
    """Mean and sample standard deviation of ``trajectory_straightness`` over the paths, with what was measured:
    ``{"mean", "std", "paths", "steps", "guidance"}`` (std 0 for a single path)."""
    values = trajectory_straightness(pipe, noise, steps, guidance, prompts, batch_size)
    std = values.std().item() if len(values) > 1 else 0.0
    return {"mean": values.mean().item(), "std": std, "paths": len(values), "steps": steps, "guidance": guidance}
