"""The rectified-flow convention of Flow Lune, one formula per function.

    x_sigma = (1 - sigma) * x0 + sigma * eps,   sigma in [0, 1], sigma = 1 is pure noise
    v       = eps - x0                          (what the student predicts)
    x      <- x + (sigma_next - sigma) * v      (an Euler step)

This is the convention of diffusers' ``FlowMatchEulerDiscreteScheduler`` and of ComfyUI's
``ModelSamplingSD3`` (CONST: denoised = x - sigma * v). The model is fed ``x_sigma`` unscaled
with timestep ``1000 * sigma``.
"""

from __future__ import annotations

import torch

Tensorish = torch.Tensor | float


def shift_sigma(sigma: Tensorish, shift: float) -> Tensorish:
    """Time shift (SD3, Esser et al. 2024, eq. 23): ``sigma' = s * sigma / (1 + (s - 1) * sigma)``.

    ``s > 1`` moves mass toward noise (high sigma); ``s = 1`` is the identity.
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}; use 1.0 for no shift.")
    return shift * sigma / (1 + (shift - 1) * sigma)


def expand_sigma(sigma: Tensorish, like: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample sigma of shape (B,) as a tensor broadcastable against ``like`` (B, ...)."""
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape(-1, *([1] * (like.ndim - 1)))


def flow_state(x0: torch.Tensor, eps: torch.Tensor, sigma: Tensorish) -> torch.Tensor:
    """The flow state on the straight path: ``x_sigma = (1 - sigma) * x0 + sigma * eps``."""
    sigma = expand_sigma(sigma, x0)
    return (1 - sigma) * x0 + sigma * eps


def flow_velocity(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The velocity of the straight path, ``v = d x_sigma / d sigma = eps - x0``."""
    return eps - x0


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: Tensorish, sigma_next: Tensorish) -> torch.Tensor:
    """One Euler step of the flow ODE: ``x <- x + (sigma_next - sigma) * v``."""
    return x + (expand_sigma(sigma_next, x) - expand_sigma(sigma, x)) * v
