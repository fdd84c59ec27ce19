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

Saved as ``config.json`` + ``model.safetensors``; loading checks every key and shape both ways. The formulas are
in ``assessor_formulas.py``, its training in ``assessor_training.py``, its profile in ``profile.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from flow_lune.atomic import atomic_file
from flow_lune.flow import sigma_to_bin
from flow_lune.settings import ASSESSOR_EMBED_DIM, ASSESSOR_HIDDEN_DIM, ASSESSOR_NUM_BINS, ASSESSOR_NUM_PATTERNS

from .assessor_formulas import coherence, pattern_entropy, timestep_error

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PROFILE_NAME = "profile.json"
PROFILE_IMAGE_NAME = "profile.png"


@dataclass
class AssessorConfig:
    """Shape of an assessor; written to ``config.json``."""

    block_channels: list[int]  # C_b of the pooled features of each block, from one dummy forward
    block_names: list[str] = field(default_factory=list)  # names of the blocks, for logs and the profile
    embed_dim: int = ASSESSOR_EMBED_DIM  # small: coherence needs a direction, not a reconstruction
    hidden_dim: int = ASSESSOR_HIDDEN_DIM  # about 0.3% of the SD1.5 UNet at SD1.5 channel counts
    num_bins: int = ASSESSOR_NUM_BINS  # equal sigma bins over [0, 1], the adaptive sampler's bins
    num_patterns: int = ASSESSOR_NUM_PATTERNS  # DESIGN.md section 6
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
        config_json = {"_class_name": "Assessor", **self.config.to_dict()}
        atomic_file(folder / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config_json, indent=2) + "\n"))
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
