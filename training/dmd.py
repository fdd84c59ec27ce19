"""Distribution matching distillation (DMD; Yin et al. 2024, *One-step Diffusion with Distribution Matching
Distillation*, and DMD2, Yin et al. 2024), in Flow Lune's flow convention, one formula per function.

A generator (the student sampled on its few-step Euler grid) makes clean latents ``x0_g``. Two flow models score
them after re-noising, ``x_t = flow_state(x0_g, n, t)``: a *real* model of the target distribution and a *fake*
model trained online, by flow matching, on the generator's own samples. Each gives a clean-latent prediction
``x0 = x_t - t v`` (``convention.x0_from_velocity``); their difference is the gradient of the KL divergence from the
generator's distribution to the real one (DMD eq. 7, up to a positive weight per sample):

    g = (x0_fake - x0_real) / mean_i |x0_g - x0_real|          (dmd_direction)
    L_dmd = 0.5 * mean (x0_g - sg(x0_g - g))^2,   dL_dmd / dx0_g = g / numel      (dmd_loss)

The generator's sample comes from backward simulation (DMD2 section 4.5): Euler steps without gradient from
``z`` at ``grid[0] = 1`` down to ``grid[k]``, then one clean-latent prediction with gradient
(:func:`backward_simulation`), so the loss trains the predictions the few-step sampler actually makes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flow_lune.flow.convention import euler_step, expand_sigma, flow_state, x0_from_velocity
from flow_lune.flow.reflow import reflow_target

from .objective import flow_matching_loss

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_sigma, sigma (B,)) -> v


def dmd_direction(x0_gen: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD's normalised gradient ``g = (x0_fake - x0_real) / mean_i |x0_gen - x0_real|`` (no grad; per sample i,
    the mean over all but the batch dim; DMD eq. 8's weight, so that ``g`` is scale-free across noise levels)."""
    with torch.no_grad():
        scale = (x0_gen - x0_real).abs().flatten(1).mean(dim=1).clamp_min(1e-6)
        return (x0_fake - x0_real) / expand_sigma(scale, x0_gen)


def dmd_loss(x0_gen: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """``0.5 * mean (x0_gen - sg(x0_gen - g))^2``: a surrogate whose gradient in ``x0_gen`` is ``g / numel``."""
    return 0.5 * (x0_gen.float() - (x0_gen - direction).detach().float()).pow(2).mean()


def backward_simulation(velocity: Velocity, z: torch.Tensor, grid: torch.Tensor, k: int) -> torch.Tensor:
    """The generator's clean latent from grid point ``k``: Euler steps ``grid[0] -> ... -> grid[k]`` from ``z``
    without gradient, then ``x0 = x - grid[k] * v(x, grid[k])`` with gradient. ``grid`` is the sampler's sigmas,
    ``grid[0] = 1``; ``0 <= k < len(grid) - 1``."""
    if not 0 <= k < len(grid) - 1:
        raise ValueError(f"k must be in [0, {len(grid) - 1}), got {k}.")
    b = z.shape[0]
    x = z
    with torch.no_grad():
        for i in range(k):
            x = euler_step(x, velocity(x, grid[i].expand(b)), grid[i], grid[i + 1])
    sigma = grid[k].expand(b)
    return x0_from_velocity(x, velocity(x, sigma), sigma)


def denoising_loss(velocity: Velocity, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Flow matching on samples ``x0`` (how the fake model follows the generator, and how a real model learns a
    sample set): ``mean_i |v(flow_state(x0, n, sigma), sigma) - (n - x0)|^2``, the straight line's velocity
    (``reflow_target``) as the target, unweighted (``flow_matching_loss``)."""
    return flow_matching_loss(velocity(flow_state(x0, noise, sigma), sigma), reflow_target(x0, noise), sigma)
