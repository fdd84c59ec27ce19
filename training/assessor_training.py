"""Training the assessor on the teacher's features (DESIGN.md section 6): views, loss, initial statistics.

The heads learn from the teacher's features at their true sigma; the embedding learns contrastively (InfoNCE):
two views of the same sample (the same x0 at a nearby sigma with partly fresh noise) agree, other samples in
the batch disagree. ``TeacherBlockFeatures`` gives the features through the one teacher query.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flow_lune.flow import SIGMA_MIN, flow_state, sigma_to_bin
from flow_lune.settings import INFONCE_TEMPERATURE, TIMESTEP_LABEL_WIDTH, VIEW_NOISE_MIX, VIEW_SIGMA_JITTER

from .assessor import Assessor
from .assessor_formulas import info_nce, kmeans, soft_bin_targets


@dataclass
class AssessorTrainingConfig:
    """Loss settings of the assessor."""

    temperature: float = INFONCE_TEMPERATURE  # InfoNCE temperature, CLIP/SimCLR range
    view_sigma_jitter: float = VIEW_SIGMA_JITTER  # the second view's sigma is sigma + jitter * N(0, 1): "nearby"
    view_noise_mix: float = VIEW_NOISE_MIX  # eps2 = sqrt(1 - m^2) eps1 + m xi: partly fresh noise, same x0
    timestep_label_width: float = TIMESTEP_LABEL_WIDTH  # soft targets' std over neighbouring bins; 0 = one-hot
    timestep_weight: float = 1.0
    pattern_weight: float = 1.0
    contrastive_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if self.timestep_label_width < 0:
            raise ValueError(f"timestep_label_width must be >= 0 bins, got {self.timestep_label_width}.")
        if self.view_sigma_jitter < 0 or not 0 <= self.view_noise_mix <= 1:
            raise ValueError(
                f"need view_sigma_jitter >= 0 and view_noise_mix in [0, 1], got {self.view_sigma_jitter}, "
                f"{self.view_noise_mix}."
            )


@dataclass
class AssessorLoss:
    """One training step's losses (scalars) and the timestep accuracy over both views."""

    total: torch.Tensor
    timestep: torch.Tensor
    pattern: torch.Tensor
    contrastive: torch.Tensor
    timestep_accuracy: torch.Tensor


@dataclass
class Views:
    """Two flow states of the same x0 (DESIGN.md section 1: ``x_sigma = (1 - sigma) x0 + sigma eps``)."""

    x_sigma1: torch.Tensor
    sigma1: torch.Tensor
    x_sigma2: torch.Tensor
    sigma2: torch.Tensor


def make_views(
    x0: torch.Tensor, sigma: torch.Tensor, config: AssessorTrainingConfig, generator: torch.Generator | None = None
) -> Views:
    """The contrastive pair: ``(x0, eps1, sigma)`` and ``(x0, sqrt(1-m^2) eps1 + m xi, clip(sigma + j n))``."""

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device="cpu").to(device=x0.device, dtype=x0.dtype)

    eps1 = randn(*x0.shape)
    eps2 = math.sqrt(1 - config.view_noise_mix**2) * eps1 + config.view_noise_mix * randn(*x0.shape)
    sigma = sigma.to(device=x0.device, dtype=torch.float32)
    sigma2 = (sigma + config.view_sigma_jitter * randn(len(sigma)).float()).clamp(SIGMA_MIN, 1.0)
    return Views(flow_state(x0, eps1, sigma), sigma, flow_state(x0, eps2, sigma2), sigma2)


def assessor_loss(
    assessor: Assessor,
    pooled1: Sequence[torch.Tensor],
    pooled2: Sequence[torch.Tensor],
    sigma1: torch.Tensor,
    sigma2: torch.Tensor,
    config: AssessorTrainingConfig,
    pattern_labels: torch.Tensor | None = None,
    model: nn.Module | None = None,
) -> AssessorLoss:
    """Mean over blocks of ``w_t CE_t + w_p CE_p + w_c InfoNCE``, on the teacher features of two views.

    Timestep targets are the sigma bins, softened over neighbours (``soft_bin_targets``); pattern targets are
    the nearest k-means centroid of each view's features, or ``pattern_labels`` (B,) from the data when the
    config says ``pattern_source="data"``. ``model`` is the module whose forward runs (the accelerate-wrapped
    assessor under DDP); ``assessor`` its unwrapped self.
    """
    num_bins = assessor.config.num_bins
    if len(pooled1[0]) < 2:
        raise ValueError("The contrastive loss needs a batch of at least 2 samples; raise --train_batch_size.")
    bins = torch.cat([sigma_to_bin(sigma1, num_bins), sigma_to_bin(sigma2, num_bins)])
    feats = [torch.cat([a, b]) for a, b in zip(pooled1, pooled2)]
    outs = (model if model is not None else assessor)(feats)
    if pattern_labels is not None:
        labels = [pattern_labels.repeat(2)] * assessor.config.num_blocks
    elif assessor.config.pattern_source == "data":
        raise ValueError("pattern_source is 'data' but the batch carries no pattern labels.")
    else:
        labels = assessor.pattern_labels(feats)
    device = outs[0].timestep_logits.device
    bins = bins.to(device)
    targets = soft_bin_targets(bins, num_bins, config.timestep_label_width)
    t_loss = torch.stack([F.cross_entropy(o.timestep_logits, targets) for o in outs]).mean()
    p_loss = torch.stack([F.cross_entropy(o.pattern_logits, y.to(device)) for o, y in zip(outs, labels)]).mean()
    b = len(pooled1[0])
    c_loss = torch.stack([info_nce(o.embedding[:b], o.embedding[b:], config.temperature) for o in outs]).mean()
    total = config.timestep_weight * t_loss + config.pattern_weight * p_loss + config.contrastive_weight * c_loss
    acc = torch.stack([(o.timestep_logits.argmax(-1) == bins).float().mean() for o in outs]).mean()
    return AssessorLoss(total, t_loss.detach(), p_loss.detach(), c_loss.detach(), acc.detach())


@torch.no_grad()
def initialise_from_features(assessor: Assessor, pooled: Sequence[torch.Tensor], seed: int) -> None:
    """Set each companion's standardisation from teacher features (N, C_b) and, for k-means patterns, its centroids."""
    assessor.check_features(pooled)
    if len(pooled[0]) < max(2, assessor.config.num_patterns):
        raise ValueError(
            f"Need at least {max(2, assessor.config.num_patterns)} samples to set statistics and clusters, "
            f"got {len(pooled[0])}; raise --cluster_samples."
        )
    generator = torch.Generator().manual_seed(seed)
    for block, f in zip(assessor.blocks, pooled):
        f = f.detach().float().to(block.feature_mean.device)
        block.feature_mean.copy_(f.mean(0))
        block.feature_std.copy_(f.std(0).clamp_min(1e-6))  # a constant channel must not divide by 0
        if assessor.config.pattern_source == "kmeans":
            c = kmeans(block.standardise(f), assessor.config.num_patterns, generator)
            block.centroids.copy_(c.to(block.centroids.device))


class TeacherBlockFeatures:
    """Pooled block features of the eps teacher at flow states, from the one teacher query.

    The forward is ``EpsilonToFlowUNet.velocity`` (``x_t = x_sigma / n(sigma)``, ``t = t(sigma)``, DESIGN.md
    section 2) under ``BlockFeatureHooks``, so the assessor sees the features the trainer gives it.
    """

    def __init__(self, unet: nn.Module, scheduler_config: dict):
        from flow_lune.flow import EpsilonToFlowUNet

        self.unet = unet
        self.teacher = EpsilonToFlowUNet(unet, scheduler_config)

    @torch.no_grad()
    def __call__(self, x_sigma: torch.Tensor, sigma: torch.Tensor, prompt_embeds: torch.Tensor) -> list[torch.Tensor]:
        from .block_features import BlockFeatureHooks

        with BlockFeatureHooks(self.unet, pooled=True) as hooks:
            self.teacher.velocity(x_sigma.float(), sigma.float(), prompt_embeds)
            return [f.float() for f in hooks.features]
