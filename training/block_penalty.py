"""The per-block weights lambda_b of the KD penalty term (DESIGN.md sections 5 and 6).

A ``BlockPenalty`` sees the pooled student and teacher block features and sigma, and returns
``lambda_b`` for the term ``block_penalty_weight * sum_b lambda_b KD_b``. It is called under
``torch.no_grad()``: lambda_b weighs the loss but is never differentiated.

``--assessor none`` is the ablation control, ``lambda_b = w_b`` (``ConstantBlockPenalty``);
``--assessor PATH`` loads the geometric assessor (``AssessorBlockPenalty``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from .assessor import Assessor
from .block_features import BASE_BLOCK_WEIGHTS, BLOCK_NAMES
from .fusion import FusionConfig, fuse_block_weights


@dataclass
class BlockWeights:
    """What a block penalty returns: lambda_b and, from an assessor, its three signals (batch means)."""

    lam: torch.Tensor  # (9,) lambda_b, no grad
    e_t: torch.Tensor | None = None  # (9,) in [0, 1]: timestep cross-entropy / ln(num_bins)
    e_p: torch.Tensor | None = None  # (9,) in [0, 1]: pattern entropy / ln(num_patterns)
    coh: torch.Tensor | None = None  # (9,) in [0, 1]: coherence


@runtime_checkable
class BlockPenalty(Protocol):
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


class ConstantBlockPenalty:
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


def build_block_penalty(
    assessor: str, base_weights: Sequence[float], fusion: FusionConfig | None, device: torch.device | str
) -> BlockPenalty:
    """``"none"`` -> ``ConstantBlockPenalty``; otherwise ``assessor`` is an assessor folder to load."""
    if assessor == "none":
        return ConstantBlockPenalty(base_weights)
    return AssessorBlockPenalty.from_pretrained(assessor, base_weights=base_weights, fusion=fusion, device=device)


class AssessorBlockPenalty:
    """lambda_b from an assessor: ``fuse_block_weights(w_b, e_t, e_p, coh)`` of its signals on the batch."""

    def __init__(self, assessor: Assessor, base_weights: Sequence[float], fusion: FusionConfig | None = None):
        base = check_base_weights(base_weights)
        if len(base) != assessor.config.num_blocks:
            raise ValueError(
                f"base_weights has {base.numel()} values; the assessor has {assessor.config.num_blocks} blocks."
            )
        self.assessor = assessor.eval().requires_grad_(False)
        self.fusion = fusion if fusion is not None else FusionConfig()
        if not isinstance(self.fusion, FusionConfig):
            raise TypeError(f"fusion must be a FusionConfig, got {type(self.fusion).__name__}.")
        self.base_weights = base.to(assessor.blocks[0].feature_mean.device)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        base_weights: Sequence[float],
        fusion: FusionConfig | None = None,
        device: torch.device | str | None = None,
    ) -> AssessorBlockPenalty:
        return cls(Assessor.from_pretrained(path, device=device), base_weights, fusion)

    @torch.no_grad()
    def __call__(
        self, student_pooled: Sequence[torch.Tensor], teacher_pooled: Sequence[torch.Tensor], sigma: torch.Tensor
    ):
        s = self.assessor.signals(student_pooled, teacher_pooled, sigma)
        lam = fuse_block_weights(self.base_weights, s.e_t, s.e_p, s.coh, self.fusion)
        device = sigma.device if isinstance(sigma, torch.Tensor) else lam.device  # as ConstantBlockPenalty
        return BlockWeights(lam=lam.to(device), e_t=s.e_t.to(device), e_p=s.e_p.to(device), coh=s.coh.to(device))
