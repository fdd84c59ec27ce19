"""The rectified-flow convention of Flow Lune, one formula per function.

    x_sigma = (1 - sigma) * x0 + sigma * eps,   sigma in [0, 1], sigma = 1 is pure noise
    v       = eps - x0                          (what the student predicts)
    x      <- x + (sigma_next - sigma) * v      (an Euler step)
    v      = v_u + w (v_c - v_u)                (classifier-free guidance)
    t       = 1000 * sigma                      (the flow model's timestep)

This is the convention of diffusers' ``FlowMatchEulerDiscreteScheduler`` and of ComfyUI's
``ModelSamplingSD3`` (CONST: denoised = x - sigma * v). The model is fed ``x_sigma`` unscaled
with timestep ``flow_timestep(sigma)``.
"""

from __future__ import annotations

import torch

Tensorish = torch.Tensor | float

FLOW_TIMESTEPS = 1000  # the flow model's timestep scale, FlowMatchEulerDiscreteScheduler's num_train_timesteps


def flow_timestep(sigma: Tensorish, num_train_timesteps: int = FLOW_TIMESTEPS) -> Tensorish:
    """The flow model's float timestep ``t = num_train_timesteps * sigma`` (``1000 * sigma``), in sigma's dtype."""
    return sigma * num_train_timesteps


def sigma_from_flow_timestep(timestep: Tensorish, num_train_timesteps: int = FLOW_TIMESTEPS) -> Tensorish:
    """The inverse of :func:`flow_timestep`: ``sigma = t / num_train_timesteps``, in t's dtype."""
    return timestep / num_train_timesteps


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


def x0_from_velocity(x_sigma: torch.Tensor, v: torch.Tensor, sigma: Tensorish) -> torch.Tensor:
    """The clean latent a velocity points to: ``x0 = x_sigma - sigma * v`` (ComfyUI's CONST ``denoised``; exact on
    the straight path, where ``x_sigma = (1 - sigma) x0 + sigma eps`` and ``v = eps - x0``)."""
    return x_sigma - expand_sigma(sigma, x_sigma) * v


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: Tensorish, sigma_next: Tensorish) -> torch.Tensor:
    """One Euler step of the flow ODE: ``x <- x + (sigma_next - sigma) * v``."""
    return x + (expand_sigma(sigma_next, x) - expand_sigma(sigma, x)) * v


def guided_velocity(v_uncond: torch.Tensor, v_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance on velocities: ``v_uncond + w * (v_cond - v_uncond)``.

    The teacher's ``v*`` is affine in ``eps_hat`` with coefficients summing to 1, so this equals guidance in eps space.
    """
    return v_uncond + guidance_scale * (v_cond - v_uncond)
