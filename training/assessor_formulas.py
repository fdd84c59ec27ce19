"""The assessor's formulas, one per function (DESIGN.md section 6): its three signals and its training losses.

- ``e_t = clip(CE(timestep_logits, bin(sigma)) / ln(num_bins), 0, 1)`` (``timestep_error``)
- ``e_p = H(softmax(pattern_logits)) / ln(num_patterns)`` (``pattern_entropy``)
- ``coh = (1 + cos(z_student, z_teacher)) / 2`` (``coherence``)

and the training pieces: soft timestep targets, InfoNCE, k-means for the patterns.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def timestep_error(timestep_logits: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Per-sample ``clip(CE(logits, bin) / ln(num_bins), 0, 1)``: 0 = certain and right, 1 = uniform or worse."""
    num_bins = timestep_logits.shape[-1]
    ce = F.cross_entropy(timestep_logits.float(), bins.to(timestep_logits.device), reduction="none")
    return (ce / math.log(num_bins)).clamp(0, 1)


def pattern_entropy(pattern_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ``H(softmax(logits)) / ln(num_patterns)`` in [0, 1]: 0 = one pattern, 1 = all equally likely."""
    log_p = F.log_softmax(pattern_logits.float(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return (entropy / math.log(pattern_logits.shape[-1])).clamp(0, 1)


def coherence(z_student: torch.Tensor, z_teacher: torch.Tensor) -> torch.Tensor:
    """Per-sample ``(1 + cos(z_student, z_teacher)) / 2`` in [0, 1]."""
    return ((1 + F.cosine_similarity(z_student.float(), z_teacher.float(), dim=-1)) / 2).clamp(0, 1)


def soft_bin_targets(bins: torch.Tensor, num_bins: int, width: float) -> torch.Tensor:
    """(B, num_bins) targets ``q_k ∝ exp(-(k - bin)^2 / (2 width^2))``; one-hot for ``width = 0``.

    Neighbouring sigma bins hold nearly the same features; soft targets keep the head calibrated across
    them, so a prediction one bin off costs little instead of saturating ``e_t``.
    """
    if width == 0:
        return F.one_hot(bins, num_bins).float()
    k = torch.arange(num_bins, device=bins.device, dtype=torch.float32)
    logq = -((k[None, :] - bins[:, None].float()) ** 2) / (2 * width**2)
    return logq.softmax(-1)


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP loss, Radford et al. 2021): ``(CE(z1 z2^T / T, I) + CE(z2 z1^T / T, I)) / 2``.

    Row i of ``z1`` and row i of ``z2`` are two views of one sample; the other rows are its negatives.
    """
    logits = z1 @ z2.T / temperature
    target = torch.arange(len(z1), device=z1.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 50) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii 2007), seeded; returns (k, D) centroids.

    An empty cluster keeps its previous centroid. ``x`` is (N, D) with N >= k.
    """
    if x.dim() != 2 or len(x) < k:
        raise ValueError(f"kmeans needs (N, D) points with N >= k={k}; got shape {tuple(x.shape)}. Use more samples.")
    x = x.detach().to(torch.float64).cpu()
    first = torch.randint(len(x), (1,), generator=generator)
    centroids = [x[first[0]]]
    d2 = ((x - centroids[0]) ** 2).sum(-1)
    for _ in range(1, k):
        if d2.sum() <= 0:  # fewer distinct points than k: fall back to uniform picks
            i = torch.randint(len(x), (1,), generator=generator)[0]
        else:
            i = torch.multinomial(d2 / d2.sum(), 1, generator=generator)[0]
        centroids.append(x[i])
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(-1))
    c = torch.stack(centroids)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(-1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        new_c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
        if torch.equal(new_c, c):
            break
        c = new_c
    return c.float()
