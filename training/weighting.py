"""Per-block weighting lambda_b of the KD penalty (DESIGN.md sections 5 and 6).

A ``BlockWeighting`` sees the pooled student and teacher block features and sigma, and returns
``lambda_b`` for the term ``block_penalty_weight * sum_b lambda_b KD_b``. It is called under
``torch.no_grad()``: lambda_b weighs the loss but is never differentiated.

``--assessor none`` is the ablation control, ``lambda_b = w_b``; ``--assessor PATH`` loads the
geometric assessor from ``flow_lune.training.assessor``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from .block_features import BASE_BLOCK_WEIGHTS, BLOCK_NAMES

if TYPE_CHECKING:
    from .fusion import FusionConfig


@dataclass
class BlockWeights:
    """What a block weighting returns: lambda_b and, from an assessor, its three signals (batch means)."""

    lam: torch.Tensor  # (9,) lambda_b, no grad
    e_t: torch.Tensor | None = None  # (9,) in [0, 1]: timestep cross-entropy / ln(num_bins)
    e_p: torch.Tensor | None = None  # (9,) in [0, 1]: pattern entropy / ln(num_patterns)
    coh: torch.Tensor | None = None  # (9,) in [0, 1]: coherence


@runtime_checkable
class BlockWeighting(Protocol):
    def __call__(
        self, student_pooled: Sequence[torch.Tensor], teacher_pooled: Sequence[torch.Tensor], sigma: torch.Tensor
    ) -> BlockWeights: ...


def check_base_weights(base_weights: Sequence[float]) -> torch.Tensor:
    """The base weights as a float32 (9,) tensor; ``ValueError`` unless there are nine finite values >= 0."""
    w = torch.as_tensor(list(base_weights), dtype=torch.float32)
    if w.shape != (len(BLOCK_NAMES),) or not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(
            f"base block weights need {len(BLOCK_NAMES)} finite values >= 0 (one per block {BLOCK_NAMES}), "
            f"got {list(base_weights)}."
        )
    return w


class ConstantBlockWeighting:
    """``lambda_b = w_b`` whatever the features: the ``--assessor none`` control."""

    def __init__(self, base_weights: Sequence[float] = BASE_BLOCK_WEIGHTS):
        self.base_weights = check_base_weights(base_weights)

    def __call__(
        self, student_pooled: Sequence[torch.Tensor], teacher_pooled: Sequence[torch.Tensor], sigma: torch.Tensor
    ) -> BlockWeights:
        if len(student_pooled) != len(self.base_weights) or len(teacher_pooled) != len(self.base_weights):
            raise ValueError(
                f"Expected {len(self.base_weights)} pooled features per model, "
                f"got {len(student_pooled)} (student) and {len(teacher_pooled)} (teacher)."
            )
        return BlockWeights(lam=self.base_weights.to(sigma.device))


def build_block_weighting(
    assessor: str, base_weights: Sequence[float], fusion: FusionConfig | None, device: torch.device | str
) -> BlockWeighting:
    """``"none"`` -> ``ConstantBlockWeighting``; otherwise ``assessor`` is an assessor folder to load."""
    if assessor == "none":
        return ConstantBlockWeighting(base_weights)
    from .assessor import AssessorBlockWeighting

    return AssessorBlockWeighting.from_pretrained(assessor, base_weights=base_weights, fusion=fusion, device=device)
