"""The assessor's profile: per block and sigma bin, how well it reads the teacher (DESIGN.md sections 4 and 6).

Over ``profile_samples`` teacher states spread evenly over the ``num_bins`` equal sigma bins (the same
number per bin, sigma uniform inside its bin), per block b and bin k:

- ``timestep_accuracy[b][k]``: fraction of samples whose argmax timestep bin is the true bin;
- ``timestep_error[b][k]``: mean ``e_t`` (timestep cross-entropy / ln(num_bins), clipped to [0, 1]);
- ``pattern_entropy[b][k]``: mean ``e_p`` (pattern entropy / ln(num_patterns)).

The adaptive sampler aggregates over blocks (mean): accuracy_k (reliability), difficulty_k = 1 + e_t,k
(a bin the assessor reads badly is harder and drawn more, up to twice as often), jitter scale_k = pattern
entropy_k (ambiguous bins are sampled more widely when ``adaptive_jitter > 0``).

Written as ``profile.json`` and ``profile.png`` (heat maps, blocks x bins, ``plots.plot_profile``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from flow_lune.atomic import atomic_file
from flow_lune.flow import ADAPTIVE_JITTER, BASE_JITTER, RELIABILITY_THRESHOLD, sigma_to_bin

from .assessor import PROFILE_IMAGE_NAME, PROFILE_NAME, Assessor
from .assessor_formulas import pattern_entropy, timestep_error
from .plots import plot_profile

__all__ = [
    "AssessorProfile",
    "ProfileAccumulator",
    "stratified_sigmas",
    "save_profile",
    "load_profile",
    "adaptive_sampler_from_profile",
]


@dataclass
class AssessorProfile:
    """Per block x bin statistics of an assessor on teacher features; lists for JSON."""

    block_names: list[str]
    num_bins: int
    samples_per_bin: list[int]  # (num_bins,)
    timestep_accuracy: list[list[float]]  # [block][bin]
    timestep_error: list[list[float]]  # [block][bin]
    pattern_entropy: list[list[float]]  # [block][bin]

    def __post_init__(self) -> None:
        nb, nk = len(self.block_names), self.num_bins
        if len(self.samples_per_bin) != nk:
            raise ValueError(f"samples_per_bin has {len(self.samples_per_bin)} entries for {nk} bins.")
        for name in ("timestep_accuracy", "timestep_error", "pattern_entropy"):
            table = torch.as_tensor(getattr(self, name), dtype=torch.float64)
            if table.shape != (nb, nk):
                raise ValueError(f"profile {name} has shape {tuple(table.shape)}, expected ({nb}, {nk}) blocks x bins.")
            if not torch.isfinite(table).all() or (table < 0).any() or (table > 1).any():
                raise ValueError(f"profile {name} must hold values in [0, 1]; the profile file is damaged.")

    def table(self, name: str) -> torch.Tensor:
        return torch.as_tensor(getattr(self, name), dtype=torch.float64)

    def bin_accuracy(self) -> torch.Tensor:
        """(num_bins,) timestep accuracy, mean over blocks."""
        return self.table("timestep_accuracy").mean(0)

    def bin_difficulty(self) -> torch.Tensor:
        """(num_bins,) ``1 + mean_b e_t[b, k]``, in [1, 2]."""
        return 1 + self.table("timestep_error").mean(0)

    def bin_pattern_entropy(self) -> torch.Tensor:
        """(num_bins,) pattern entropy, mean over blocks, in [0, 1]."""
        return self.table("pattern_entropy").mean(0)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AssessorProfile:
        known = {f.name for f in fields(cls)}
        missing = sorted(known - set(d))
        if missing:
            raise ValueError(f"The profile lacks {missing}; write it with train_assessor.py.")
        return cls(**{k: d[k] for k in known})


def stratified_sigmas(num_samples: int, num_bins: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``num_samples`` sigmas, bin k = i mod num_bins for sample i, ``sigma = (k + r) / num_bins``, r ~ U(0, 1).

    Every bin gets ``num_samples // num_bins`` or one more samples. Clipped to [SIGMA_MIN, 1].
    """
    from flow_lune.flow import SIGMA_MIN

    if num_samples < num_bins:
        raise ValueError(f"Profiling needs at least one sample per bin: num_samples={num_samples} < {num_bins} bins.")
    k = torch.arange(num_samples) % num_bins
    r = torch.rand(num_samples, generator=generator, dtype=torch.float64)
    return ((k + r) / num_bins).clamp(SIGMA_MIN, 1.0).float()


class ProfileAccumulator:
    """Sums per block x bin over batches of teacher features; ``result()`` gives the :class:`AssessorProfile`."""

    def __init__(self, assessor: Assessor):
        self.assessor = assessor
        nb, nk = assessor.config.num_blocks, assessor.config.num_bins
        self.count = torch.zeros(nk, dtype=torch.float64)
        self.correct = torch.zeros(nb, nk, dtype=torch.float64)
        self.error = torch.zeros(nb, nk, dtype=torch.float64)
        self.entropy = torch.zeros(nb, nk, dtype=torch.float64)

    @torch.no_grad()
    def update(self, pooled: list[torch.Tensor], sigma: torch.Tensor) -> None:
        nk = self.assessor.config.num_bins
        bins = sigma_to_bin(sigma.flatten(), nk).cpu()
        self.count += torch.bincount(bins, minlength=nk).double()
        for b, out in enumerate(self.assessor(pooled)):
            logits = out.timestep_logits.cpu()
            self.correct[b].index_add_(0, bins, (logits.argmax(-1) == bins).double())
            self.error[b].index_add_(0, bins, timestep_error(logits, bins).double())
            self.entropy[b].index_add_(0, bins, pattern_entropy(out.pattern_logits.cpu()).double())

    def result(self) -> AssessorProfile:
        n = self.count.clamp_min(1)  # an empty bin reports 0: no opinion for the sampler
        return AssessorProfile(
            block_names=list(self.assessor.config.block_names),
            num_bins=self.assessor.config.num_bins,
            samples_per_bin=[int(c) for c in self.count.tolist()],
            timestep_accuracy=(self.correct / n).tolist(),
            timestep_error=(self.error / n).tolist(),
            pattern_entropy=(self.entropy / n).tolist(),
        )


def save_profile(profile: AssessorProfile, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``profile.json`` and ``profile.png`` atomically into ``folder``."""
    folder = Path(folder)
    for name in (PROFILE_NAME, PROFILE_IMAGE_NAME):
        if (folder / name).exists() and not overwrite:
            raise ValueError(f"{folder / name} exists; choose a new folder (nothing on disk is overwritten).")
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(profile.to_dict()) + "\n"
    atomic_file(folder / PROFILE_NAME, lambda p: Path(p).write_text(text))
    plot_profile(
        profile.block_names,
        [
            ("timestep accuracy", profile.timestep_accuracy),
            ("timestep error e_t", profile.timestep_error),
            ("pattern entropy e_p", profile.pattern_entropy),
        ],
        folder / PROFILE_IMAGE_NAME,
    )
    return folder / PROFILE_NAME


def load_profile(path: str | os.PathLike) -> AssessorProfile:
    """Read a ``profile.json`` (or the assessor folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / PROFILE_NAME
    if not path.is_file():
        raise ValueError(f"No assessor profile at {path}; train the assessor with train_assessor.py first.")
    return AssessorProfile.from_dict(json.loads(path.read_text()))


def adaptive_sampler_from_profile(
    profile_path: str | os.PathLike,
    base=None,
    reliability_threshold: float = RELIABILITY_THRESHOLD,
    base_jitter: float = BASE_JITTER,
    adaptive_jitter: float = ADAPTIVE_JITTER,
):
    """``AdaptiveSigmaSampler(difficulty=1 + mean_b e_t, accuracy=mean_b accuracy, jitter_scale=mean_b e_p)``.

    Bins whose block-mean timestep accuracy is below ``reliability_threshold`` keep weight 1 (no opinion).
    """
    from flow_lune.flow import AdaptiveSigmaSampler, SigmaSampler

    if not 0 <= reliability_threshold <= 1:
        raise ValueError(f"reliability_threshold must lie in [0, 1], got {reliability_threshold}.")
    if base is not None and not isinstance(base, SigmaSampler):
        raise TypeError(f"base must be a SigmaSampler, got {type(base).__name__}.")
    profile = load_profile(profile_path)
    return AdaptiveSigmaSampler(
        difficulty=profile.bin_difficulty(),
        accuracy=profile.bin_accuracy(),
        base=base,
        reliability_threshold=reliability_threshold,
        base_jitter=base_jitter,
        adaptive_jitter=adaptive_jitter,
        jitter_scale=profile.bin_pattern_entropy(),
    )
