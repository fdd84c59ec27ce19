"""Reflow (Liu et al. 2022, "Flow Straight and Fast"; InstaFlow, Liu et al. 2023): retrain a flow on its own pairs.

A pair ``(z, x0_hat)`` is a noise ``z`` and the end of the model's ODE started from it at sigma = 1. Reflow trains
on the straight line between the two ends of each pair, so the new flow's paths are straighter and few Euler
steps land close to where many did:

    x_sigma = (1 - sigma) x0_hat + sigma z      (``flow_state(x0_hat, z, sigma)``, the convention's state)
    v       = z - x0_hat                        (the target, constant along the line)
    t       = flow_timestep(sigma) = 1000 sigma
"""

from __future__ import annotations

import torch


def reflow_target(x0_hat: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The reflow velocity target ``v = z - x0_hat`` of a pair (the same at every sigma on its line).

    ``z`` is the pair's noise (the ODE's state at sigma = 1), ``x0_hat`` the ODE's end at sigma = 0.
    """
    if x0_hat.shape != z.shape:
        raise ValueError(f"x0_hat {tuple(x0_hat.shape)} and z {tuple(z.shape)} must have the same shape.")
    return z - x0_hat
