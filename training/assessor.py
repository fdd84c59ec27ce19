"""The assessor ("David"): per-block companions that judge pooled UNet features (DESIGN.md section 6).

One small companion per block (the nine blocks of DESIGN.md section 5) sees the block's spatially
pooled features ``f`` (C_b channels), standardised with the teacher's per-channel statistics, and has

- an embedding ``z = normalize(g(f))`` (L2-normalised, ``embed_dim``),
- a timestep head: logits over ``num_bins`` equal sigma bins on [0, 1],
- a pattern head: logits over ``num_patterns`` patterns (k-means clusters of the teacher's pooled
  features of the block, centroids stored in the model; or class labels carried by the data).

Signals, per block, batch means, each in [0, 1] (DESIGN.md section 6):

- ``e_t = clip(CE(timestep_logits(f_student), bin(sigma)) / ln(num_bins), 0, 1)``
- ``e_p = H(softmax(pattern_logits(f_student))) / ln(num_patterns)``
- ``coh = (1 + cos(z(f_student), z(f_teacher))) / 2``, the same sample's student and teacher embeddings.

The embedding is trained contrastively on the teacher (InfoNCE): two views of the same sample (the same
x0 at a nearby sigma with partly fresh noise) agree, other samples in the batch disagree. So ``coh`` is 1
when the student's features equal the teacher's, and falls as they move toward another sample's.

Saved as ``config.json`` + ``model.safetensors``; loading checks every key and shape both ways.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from flow_lune.atomic import atomic_file
from flow_lune.flow import SIGMA_MIN, flow_state, sigma_to_bin

__all__ = [
    "AssessorConfig",
    "AssessorTrainingConfig",
    "AssessorSignals",
    "AssessorLoss",
    "CompanionOutput",
    "BlockCompanion",
    "Assessor",
    "TeacherBlockFeatures",
    "timestep_error",
    "pattern_entropy",
    "coherence",
    "info_nce",
    "soft_bin_targets",
    "kmeans",
    "make_views",
    "initialise_from_features",
    "assessor_loss",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PROFILE_NAME = "profile.json"
PROFILE_IMAGE_NAME = "profile.png"


# ----------------------------------------------------------------------------------------------- formulas


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


# ----------------------------------------------------------------------------------------------- model


@dataclass
class AssessorConfig:
    """Shape of an assessor; written to ``config.json``."""

    block_channels: list[int]  # C_b of the pooled features of each block, from one dummy forward
    block_names: list[str] = field(default_factory=list)  # names of the blocks, for logs and the profile
    embed_dim: int = 64  # small: coherence needs a direction, not a reconstruction
    hidden_dim: int = 256  # keeps the assessor about 0.3% of the SD1.5 UNet at SD1.5 channel counts
    num_bins: int = 100  # equal sigma bins over [0, 1], the adaptive sampler's bins (DESIGN.md section 4)
    num_patterns: int = 10  # DESIGN.md section 6
    pattern_source: str = "kmeans"  # "kmeans" (clusters of teacher features) or "data" (class labels in the data)

    def __post_init__(self) -> None:
        self.block_channels = [int(c) for c in self.block_channels]
        self.block_names = list(self.block_names) or [f"block{i}" for i in range(len(self.block_channels))]
        if not self.block_channels or any(c < 1 for c in self.block_channels):
            raise ValueError(f"block_channels must be positive channel counts, got {self.block_channels}.")
        if len(self.block_names) != len(self.block_channels):
            raise ValueError(
                f"{len(self.block_names)} block_names for {len(self.block_channels)} block_channels; give one each."
            )
        for name in ("embed_dim", "hidden_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.num_bins < 2 or self.num_patterns < 2:
            raise ValueError(
                f"num_bins and num_patterns must be >= 2 (their entropies are normalised by ln of them), "
                f"got {self.num_bins} and {self.num_patterns}."
            )
        if self.pattern_source not in ("kmeans", "data"):
            raise ValueError(f"pattern_source must be 'kmeans' or 'data', got {self.pattern_source!r}.")

    @property
    def num_blocks(self) -> int:
        return len(self.block_channels)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AssessorConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"_class_name"})
        if unknown:
            raise ValueError(f"Unknown assessor config keys {unknown}; this config was not written by AssessorConfig.")
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class CompanionOutput:
    """What one companion says about a batch of pooled features."""

    embedding: torch.Tensor  # (B, embed_dim), unit norm
    timestep_logits: torch.Tensor  # (B, num_bins)
    pattern_logits: torch.Tensor  # (B, num_patterns)


class BlockCompanion(nn.Module):
    """The companion of one block: standardise, then an embedding branch and a two-headed trunk (MLPs, SiLU)."""

    def __init__(self, channels: int, hidden_dim: int, embed_dim: int, num_bins: int, num_patterns: int):
        super().__init__()
        # Teacher statistics (set before training): standardising keeps each block's scale, unlike LayerNorm,
        # and the scale of a pooled feature carries the noise level.
        self.register_buffer("feature_mean", torch.zeros(channels))
        self.register_buffer("feature_std", torch.ones(channels))
        self.register_buffer("centroids", torch.zeros(num_patterns, channels))  # k-means, standardised space
        self.num_bins = num_bins
        # The embedding branch and the trunk have separate hidden layers; their first layers and the two heads are
        # each fused into one Linear, so a call costs few ops (the assessor runs every training step).
        self.inp = nn.Linear(channels, 2 * hidden_dim)  # [embedding branch | trunk]
        self.embed_out = nn.Linear(hidden_dim, embed_dim)
        self.trunk_out = nn.Linear(hidden_dim, hidden_dim)
        self.heads = nn.Linear(hidden_dim, num_bins + num_patterns)  # [timestep head | pattern head]

    def standardise(self, pooled: torch.Tensor) -> torch.Tensor:
        return (pooled.to(self.feature_mean.dtype) - self.feature_mean) / self.feature_std

    def forward(self, pooled: torch.Tensor) -> CompanionOutput:
        h_embed, h_trunk = F.silu(self.inp(self.standardise(pooled))).chunk(2, dim=-1)
        logits = self.heads(F.silu(self.trunk_out(h_trunk)))
        z = F.normalize(self.embed_out(h_embed), dim=-1)
        return CompanionOutput(z, logits[:, : self.num_bins], logits[:, self.num_bins :])

    def pattern_labels(self, pooled: torch.Tensor) -> torch.Tensor:
        """Nearest centroid of the standardised features: the k-means pattern of each sample."""
        return torch.cdist(self.standardise(pooled), self.centroids).argmin(-1)


@dataclass
class AssessorSignals:
    """Per-block signals, batch means, each (num_blocks,) in [0, 1]."""

    e_t: torch.Tensor
    e_p: torch.Tensor
    coh: torch.Tensor


class Assessor(nn.Module):
    """One :class:`BlockCompanion` per block. ``save_pretrained``/``from_pretrained`` with strict key checks."""

    def __init__(self, config: AssessorConfig):
        super().__init__()
        if not isinstance(config, AssessorConfig):
            raise TypeError(f"config must be an AssessorConfig, got {type(config).__name__}.")
        self.config = config
        self.blocks = nn.ModuleList(
            BlockCompanion(c, config.hidden_dim, config.embed_dim, config.num_bins, config.num_patterns)
            for c in config.block_channels
        )

    def check_features(self, pooled: Sequence[torch.Tensor], name: str = "pooled") -> None:
        """Raise early if ``pooled`` is not one (B, C_b) tensor per block with equal B."""
        if len(pooled) != self.config.num_blocks:
            raise ValueError(f"{name} has {len(pooled)} tensors; the assessor has {self.config.num_blocks} blocks.")
        batch = None
        for i, (f, c) in enumerate(zip(pooled, self.config.block_channels)):
            if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[1] != c:
                shape = tuple(f.shape) if isinstance(f, torch.Tensor) else type(f).__name__
                raise ValueError(
                    f"{name}[{i}] ({self.config.block_names[i]}) must be (B, {c}) pooled features, got {shape}; "
                    "pool over H, W first (block_features.pool_block_output)."
                )
            if batch is not None and f.shape[0] != batch:
                raise ValueError(f"{name} tensors have different batch sizes ({batch} and {f.shape[0]}).")
            batch = f.shape[0]

    def _to(self, f: torch.Tensor) -> torch.Tensor:
        return f.to(device=self.blocks[0].feature_mean.device, dtype=torch.float32)

    def forward(self, pooled: Sequence[torch.Tensor]) -> list[CompanionOutput]:
        self.check_features(pooled)
        return [block(self._to(f)) for block, f in zip(self.blocks, pooled)]

    @torch.no_grad()
    def pattern_labels(self, pooled: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self.check_features(pooled)
        return [block.pattern_labels(self._to(f)) for block, f in zip(self.blocks, pooled)]

    @torch.no_grad()
    def signals(
        self, student_pooled: Sequence[torch.Tensor], teacher_pooled: Sequence[torch.Tensor], sigma: torch.Tensor
    ) -> AssessorSignals:
        """``e_t``, ``e_p`` from the student's features at their true sigma, ``coh`` against the teacher's."""
        self.check_features(student_pooled, "student_pooled")
        self.check_features(teacher_pooled, "teacher_pooled")
        batch = student_pooled[0].shape[0]
        if teacher_pooled[0].shape[0] != batch:
            raise ValueError(f"student batch {batch} != teacher batch {teacher_pooled[0].shape[0]}.")
        sigma = torch.as_tensor(sigma).flatten()
        if sigma.numel() == 1:
            sigma = sigma.expand(batch)
        if sigma.numel() != batch:
            raise ValueError(f"sigma has {sigma.numel()} values for a batch of {batch}; pass one per sample.")
        bins = sigma_to_bin(sigma, self.config.num_bins)
        # one pass per block over [student; teacher], then the three formulas once over all blocks
        outs = [
            block(self._to(torch.cat([fs, ft]))) for block, fs, ft in zip(self.blocks, student_pooled, teacher_pooled)
        ]
        t_logits = torch.stack([o.timestep_logits[:batch] for o in outs])  # (num_blocks, B, num_bins)
        p_logits = torch.stack([o.pattern_logits[:batch] for o in outs])  # (num_blocks, B, num_patterns)
        z = torch.stack([o.embedding for o in outs])  # (num_blocks, 2B, embed_dim)
        e_t = timestep_error(t_logits.flatten(0, 1), bins.repeat(len(outs))).view(len(outs), batch).mean(1)
        e_p = pattern_entropy(p_logits).mean(1)
        coh = coherence(z[:, :batch], z[:, batch:]).mean(1)
        return AssessorSignals(e_t, e_p, coh)

    # ------------------------------------------------------------------------------------------- I/O

    def save_pretrained(self, folder: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``config.json`` and ``model.safetensors`` atomically; refuses to replace them unless ``overwrite``."""
        folder = Path(folder)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if (folder / name).exists() and not overwrite:
                raise ValueError(f"{folder / name} exists; choose a new folder (nothing on disk is overwritten).")
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_file(folder / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
        cfg = {"_class_name": "Assessor", **self.config.to_dict()}
        atomic_file(folder / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(cfg, indent=2) + "\n"))
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: torch.device | str | None = None) -> Assessor:
        """Load strictly: every key of the file must be a key of the model and the reverse, with equal shapes."""
        folder = Path(folder)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (folder / name).is_file():
                raise ValueError(
                    f"{folder} is not an assessor folder: {name} is missing (train one with train_assessor.py)."
                )
        config = AssessorConfig.from_dict(json.loads((folder / CONFIG_NAME).read_text()))
        model = cls(config)
        state = load_file(str(folder / WEIGHTS_NAME))
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{folder / WEIGHTS_NAME} does not match its config: missing keys {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
                f"{' ...' if len(unexpected) > 10 else ''}."
            )
        bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items() if state[k].shape != v.shape]
        if bad:
            raise ValueError(f"Shape mismatch in {folder / WEIGHTS_NAME} (key, file, model): {bad[:10]}.")
        model.load_state_dict(state, strict=True)
        return model.to(device) if device is not None else model

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------------------------- training


@dataclass
class AssessorTrainingConfig:
    """Loss settings of the assessor."""

    temperature: float = 0.1  # InfoNCE temperature, CLIP/SimCLR range
    view_sigma_jitter: float = 0.05  # the second view's sigma is sigma + jitter * N(0, 1): "nearby"
    view_noise_mix: float = 0.5  # eps2 = sqrt(1 - m^2) eps1 + m xi: partly fresh noise, same x0
    timestep_label_width: float = 2.0  # Gaussian soft targets over neighbouring bins (std, in bins); 0 = one-hot
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
    x0: torch.Tensor, sigma: torch.Tensor, cfg: AssessorTrainingConfig, generator: torch.Generator | None = None
) -> Views:
    """The contrastive pair: ``(x0, eps1, sigma)`` and ``(x0, sqrt(1-m^2) eps1 + m xi, clip(sigma + j n))``."""

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device="cpu").to(device=x0.device, dtype=x0.dtype)

    eps1 = randn(*x0.shape)
    eps2 = math.sqrt(1 - cfg.view_noise_mix**2) * eps1 + cfg.view_noise_mix * randn(*x0.shape)
    sigma = sigma.to(device=x0.device, dtype=torch.float32)
    sigma2 = (sigma + cfg.view_sigma_jitter * randn(len(sigma)).float()).clamp(SIGMA_MIN, 1.0)
    return Views(flow_state(x0, eps1, sigma), sigma, flow_state(x0, eps2, sigma2), sigma2)


def assessor_loss(
    assessor: Assessor,
    pooled1: Sequence[torch.Tensor],
    pooled2: Sequence[torch.Tensor],
    sigma1: torch.Tensor,
    sigma2: torch.Tensor,
    cfg: AssessorTrainingConfig,
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
    targets = soft_bin_targets(bins, num_bins, cfg.timestep_label_width)
    t_loss = torch.stack([F.cross_entropy(o.timestep_logits, targets) for o in outs]).mean()
    p_loss = torch.stack([F.cross_entropy(o.pattern_logits, y.to(device)) for o, y in zip(outs, labels)]).mean()
    b = len(pooled1[0])
    c_loss = torch.stack([info_nce(o.embedding[:b], o.embedding[b:], cfg.temperature) for o in outs]).mean()
    total = cfg.timestep_weight * t_loss + cfg.pattern_weight * p_loss + cfg.contrastive_weight * c_loss
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
