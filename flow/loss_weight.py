"""Per-sample weights of the flow-matching loss (``--loss_weighting``; DESIGN.md section 5)."""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_loss_weighting_for_sd3

from flow_lune.settings import LOSS_WEIGHTINGS

__all__ = ["LOSS_WEIGHTINGS", "loss_weight"]


def loss_weight(scheme: str, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weight: none = 1, sigma_sqrt = ``sigma^-2``, cosmap = ``2 / (pi (1 - 2 sigma + 2 sigma^2))``.

    The names and formulas are diffusers' ``compute_loss_weighting_for_sd3``.
    """
    if scheme not in LOSS_WEIGHTINGS:
        raise ValueError(f"Unknown loss weighting {scheme!r}; choose one of {LOSS_WEIGHTINGS}.")
    return compute_loss_weighting_for_sd3(scheme, sigma)
