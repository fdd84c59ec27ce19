"""Fusion of the assessor's signals into per-block loss weights (DESIGN.md section 6).

``lambda_b = clip(w_b * (1 + alpha * e_t + beta * e_p + delta * (1 - coh)), lam_min, lam_max)``

``w_b`` are the base block weights, ``e_t`` the normalised timestep error, ``e_p`` the normalised
pattern entropy and ``coh`` the coherence, each in [0, 1]. With ``e_t = e_p = 0`` and ``coh = 1``
(a fully confident, fully coherent assessor) ``lambda_b = w_b`` (inside the bounds). This module
has no model dependency; :class:`FusionConfig` lives in ``flow_lune.settings`` (torch-free) for the flags.
"""

from __future__ import annotations

import torch

from flow_lune.settings import FusionConfig  # torch-free: the scripts' parsers check it before importing torch

__all__ = ["FusionConfig", "fuse_block_weights"]


def _check_signal(name: str, x: torch.Tensor, shape: torch.Size) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if x.shape != shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)} but w has shape {tuple(shape)}; pass one value per block.")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds non-finite values: {x.tolist()}.")
    if (x < 0).any() or (x > 1).any():
        raise ValueError(f"{name} must lie in [0, 1], got {x.tolist()}; normalise it before fusing.")


@torch.no_grad()
def fuse_block_weights(
    w: torch.Tensor, e_t: torch.Tensor, e_p: torch.Tensor, coh: torch.Tensor, fusion: FusionConfig
) -> torch.Tensor:
    """``lambda_b = clip(w_b (1 + alpha e_t + beta e_p + delta (1 - coh)), lam_min, lam_max)``, no grad.

    Args:
        w: (num_blocks,) base weights ``w_b``.
        e_t, e_p, coh: (num_blocks,) signals in [0, 1].
        fusion: the coefficients and bounds.

    Returns:
        (num_blocks,) ``lambda_b``, detached, in ``w``'s dtype and device.
    """
    if not isinstance(fusion, FusionConfig):
        raise TypeError(f"fusion must be a FusionConfig, got {type(fusion).__name__}.")
    if not isinstance(w, torch.Tensor) or w.dim() != 1:
        raise ValueError(f"w must be a 1-D tensor of base block weights, got {w!r}.")
    for name, x in (("e_t", e_t), ("e_p", e_p), ("coh", coh)):
        _check_signal(name, x, w.shape)
    e_t, e_p, coh = (x.to(device=w.device, dtype=w.dtype) for x in (e_t, e_p, coh))
    lam = w * (1 + fusion.alpha * e_t + fusion.beta * e_p + fusion.delta * (1 - coh))
    return lam.clamp(fusion.lam_min, fusion.lam_max).detach()
