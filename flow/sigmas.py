"""Training sigma densities, the shift, and the adaptive per-bin sampler (DESIGN.md section 4).

A draw is ``u`` from a density on [0, 1], then the shift ``sigma = s*u / (1 + (s-1)*u)`` computed
continuously, then a clip to [SIGMA_MIN, 1]. The adaptive sampler instead draws one of
``num_bins`` equal sigma bins with probability proportional to the base sampler's mass in the bin
times the bin's weight from an assessor profile, then jitters around the bin centre.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling

from flow_lune.settings import (  # the defaults live in the torch-free settings module
    ADAPTIVE_JITTER,
    BASE_JITTER,
    DENSITIES,
    LOGIT_MEAN,
    LOGIT_STD,
    MODE_SCALE,
    RELIABILITY_THRESHOLD,
    SIGMA_DENSITY,
    TRAINING_SHIFT,
    check_sigma_settings,
)

from .convention import shift_sigma

SIGMA_MIN = 1e-3  # below this the student's target is numerically the teacher's x0 error only


def cosmap_density(batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """CosMap density (SD3, Esser et al. 2024, eq. 21): ``u = 1 - 1 / (tan(pi/2 * r) + 1)``, r ~ U(0, 1)."""
    r = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    return (1 - 1 / (torch.tan(math.pi / 2 * r) + 1)).float()


def sample_u(
    density: str,
    batch_size: int,
    generator: torch.Generator | None = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """Draw ``u`` in [0, 1] from ``density``: uniform, logit_normal(mean, std), mode(scale) or cosmap.

    uniform, logit_normal and mode are diffusers' ``compute_density_for_timestep_sampling``.
    """
    if density not in DENSITIES:
        raise ValueError(f"Unknown sigma density {density!r}; choose one of {DENSITIES}.")
    if density == "cosmap":
        return cosmap_density(batch_size, generator)
    return compute_density_for_timestep_sampling(
        density, batch_size, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale, generator=generator
    )


@dataclass
class SigmaSampler:
    """Training sigmas: ``clip(shift(u), SIGMA_MIN, 1)`` with ``u`` from ``density``.

    Defaults: uniform u with shift 3, which moves the median sigma from 0.5 to 0.75 (toward noise).
    """

    density: str = SIGMA_DENSITY
    shift: float = TRAINING_SHIFT  # Flow Lune's default training shift (DESIGN.md section 4)
    logit_mean: float = LOGIT_MEAN  # SD3's logit-normal defaults
    logit_std: float = LOGIT_STD
    mode_scale: float = MODE_SCALE  # SD3 paper's mode(1.29)

    def __post_init__(self) -> None:
        check_sigma_settings(self.density, self.shift, self.logit_std)

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``batch_size`` sigmas in [SIGMA_MIN, 1], float32."""
        u = sample_u(self.density, batch_size, generator, self.logit_mean, self.logit_std, self.mode_scale)
        return shift_sigma(u.float(), self.shift).clamp(SIGMA_MIN, 1.0)


def sigma_to_bin(sigma: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Bin of ``sigma`` among ``num_bins`` equal bins over [0, 1]: ``min(floor(sigma * num_bins), num_bins - 1)``.

    sigma = 1 falls in the last bin. The adaptive sampler, the assessor's timestep head and its profile share it.
    """
    return (torch.as_tensor(sigma).detach().to(torch.float64) * num_bins).floor().long().clamp(0, num_bins - 1)


class AdaptiveSigmaSampler:
    """Sigmas drawn per bin, weighted by an assessor's difficulty profile.

    ``P(bin b) ∝ mass_b * w_b`` where ``mass_b`` is the base sampler's probability of bin b and
    ``w_b = difficulty_b`` where ``accuracy_b >= reliability_threshold``, else 1 (an unreliable
    bin gives no opinion). Within a bin: ``sigma = centre_b + (r - 1/2) * width * j_b``, r ~ U(0, 1),
    with ``j_b = base_jitter * (1 + adaptive_jitter * jitter_scale_b)``, clipped to [SIGMA_MIN, 1].

    Args:
        difficulty: (num_bins,) positive weights, e.g. ``1 + e_t`` per bin from the profile.
        accuracy: (num_bins,) the assessor's timestep accuracy per bin, in [0, 1].
        base: the sampler whose bin masses are reweighted (estimated once from a fixed-seed draw).
        reliability_threshold: bins with accuracy below this keep weight 1 (``RELIABILITY_THRESHOLD``).
        base_jitter: jitter width in units of a bin width (1 = uniform over the bin).
        adaptive_jitter: how much ``jitter_scale`` (e.g. the bin's pattern entropy in [0, 1]) widens it.
        jitter_scale: (num_bins,) per-bin jitter scale; zeros when not given.
    """

    def __init__(
        self,
        difficulty: torch.Tensor,
        accuracy: torch.Tensor,
        base: SigmaSampler | None = None,
        reliability_threshold: float = RELIABILITY_THRESHOLD,
        base_jitter: float = BASE_JITTER,
        adaptive_jitter: float = ADAPTIVE_JITTER,
        jitter_scale: torch.Tensor | None = None,
        base_mass_samples: int = 200_000,
    ):
        difficulty = torch.as_tensor(difficulty, dtype=torch.float64).flatten()
        accuracy = torch.as_tensor(accuracy, dtype=torch.float64).flatten()
        self.num_bins = len(difficulty)
        if self.num_bins < 1 or len(accuracy) != self.num_bins:
            raise ValueError(
                f"difficulty and accuracy need one value per bin; got {len(difficulty)} and {len(accuracy)}."
            )
        if not torch.isfinite(difficulty).all() or (difficulty <= 0).any():
            raise ValueError("difficulty weights must be finite and > 0; check the assessor profile.")
        if base_jitter < 0 or adaptive_jitter < 0:
            raise ValueError(f"jitters must be >= 0, got base_jitter={base_jitter}, adaptive_jitter={adaptive_jitter}.")
        jitter_scale = torch.zeros(self.num_bins) if jitter_scale is None else torch.as_tensor(jitter_scale)
        if len(jitter_scale.flatten()) != self.num_bins:
            raise ValueError(f"jitter_scale needs {self.num_bins} values, got {len(jitter_scale.flatten())}.")
        self.base = base or SigmaSampler()
        self.reliability_threshold = reliability_threshold
        self.bin_weights = torch.where(accuracy >= reliability_threshold, difficulty, torch.ones_like(difficulty))
        self.jitter = base_jitter * (1 + adaptive_jitter * jitter_scale.flatten().to(torch.float64))
        self.base_mass = self._base_mass(base_mass_samples)
        probs = self.base_mass * self.bin_weights
        self.probs = probs / probs.sum()

    def _base_mass(self, n: int) -> torch.Tensor:
        """Probability of each bin under the base sampler, from a fixed-seed draw of ``n`` sigmas."""
        draws = self.base.sample(n, torch.Generator().manual_seed(0)).to(torch.float64)
        idx = sigma_to_bin(draws, self.num_bins)
        counts = torch.bincount(idx, minlength=self.num_bins).to(torch.float64)
        return (counts + 1) / (counts.sum() + self.num_bins)  # +1: no bin is unreachable

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``batch_size`` sigmas in [SIGMA_MIN, 1], float32."""
        bins = torch.multinomial(self.probs, batch_size, replacement=True, generator=generator)
        r = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        width = 1.0 / self.num_bins
        sigma = (bins + 0.5) * width + (r - 0.5) * width * self.jitter[bins]
        return sigma.clamp(SIGMA_MIN, 1.0).float()
