"""Flow Lune's defaults and flag choices, held once and importable without torch.

The scripts build their argument parsers from this module and check their flags with it before importing
torch, diffusers or accelerate, so ``--help`` and argument errors return at once. The modules that do the
work (``flow_lune.flow``, ``flow_lune.training``) take their defaults from here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

# ---------------------------------------------------------------- training sigmas (flow/sigmas.py)

DENSITIES = ("uniform", "logit_normal", "mode", "cosmap")  # diffusers' compute_density_for_timestep_sampling names
SIGMA_DENSITY = "uniform"  # with the shift below: the median training sigma moves from 0.5 to 0.75
TRAINING_SHIFT = 3.0  # Flow Lune's default training and sampling shift (docs/math.md section 4)
LOGIT_MEAN = 0.0  # SD3's logit-normal defaults
LOGIT_STD = 1.0
MODE_SCALE = 1.29  # SD3 paper's mode(1.29)
RELIABILITY_THRESHOLD = 0.15  # bins the assessor reads less accurately than this give no opinion
BASE_JITTER = 1.0  # jitter width in bin widths: uniform over the drawn bin
ADAPTIVE_JITTER = 0.0  # pattern entropy does not widen the jitter unless asked

# ---------------------------------------------------------------- objective (training/objective.py)

LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")  # diffusers' compute_loss_weighting_for_sd3 names
KD_WEIGHT = 0.25  # weight of the base-weighted block KD
BLOCK_PENALTY_WEIGHT = 0.05  # weight of the lambda-weighted block KD
# w_b of down_blocks.0-3, mid_block, up_blocks.0-3: more weight toward the semantic middle of the UNet
BASE_BLOCK_WEIGHTS: tuple[float, ...] = (0.7, 0.9, 1.0, 1.1, 1.2, 1.1, 1.0, 0.9, 0.7)


def check_sigma_settings(density: str, shift: float, logit_std: float) -> None:
    """ValueError for an unknown density, a non-positive shift or logit std."""
    if density not in DENSITIES:
        raise ValueError(f"Unknown sigma density {density!r} (--weighting_scheme); choose one of {DENSITIES}.")
    if not shift > 0:
        raise ValueError(f"shift must be > 0 (--shift), got {shift}; use 1.0 for no shift.")
    if not logit_std > 0:
        raise ValueError(f"logit_std must be > 0 (--logit_std), got {logit_std}.")


# ---------------------------------------------------------------- fusion (training/fusion.py)


@dataclass
class FusionConfig:
    """Coefficients and bounds of the fusion; defaults are DESIGN.md section 6."""

    alpha: float = 0.5  # timestep error: the strongest sign that a block is confused about sigma
    beta: float = 0.25  # pattern entropy: weaker, content ambiguity is partly inherent
    delta: float = 0.25  # incoherence with the teacher's embedding
    lam_min: float = 0.5  # no block is ever switched off
    lam_max: float = 3.0  # no block dominates the penalty

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "delta", "lam_min", "lam_max"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ValueError(f"FusionConfig.{name} must be a finite number, got {value!r}.")
        for name in ("alpha", "beta", "delta"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"FusionConfig.{name} must be >= 0 (a signal can only raise a weight), got {getattr(self, name)}."
                )
        if self.lam_min < 0 or self.lam_min > self.lam_max:
            raise ValueError(
                f"Need 0 <= lam_min <= lam_max, got lam_min={self.lam_min}, lam_max={self.lam_max}; "
                "pass --lambda_min/--lambda_max in that order."
            )

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- the assessor (training/assessor*.py)

ASSESSOR_EMBED_DIM = 64  # small: coherence needs a direction, not a reconstruction
ASSESSOR_HIDDEN_DIM = 256  # keeps the assessor about 0.3% of the SD1.5 UNet at SD1.5 channel counts
ASSESSOR_NUM_BINS = 100  # equal sigma bins over [0, 1], the adaptive sampler's bins (DESIGN.md section 4)
ASSESSOR_NUM_PATTERNS = 10  # DESIGN.md section 6
INFONCE_TEMPERATURE = 0.1  # InfoNCE temperature, CLIP/SimCLR range
VIEW_SIGMA_JITTER = 0.05  # the second view's sigma is sigma + jitter * N(0, 1): "nearby"
VIEW_NOISE_MIX = 0.5  # eps2 = sqrt(1 - m^2) eps1 + m xi: partly fresh noise, same x0
TIMESTEP_LABEL_WIDTH = 2.0  # Gaussian soft targets over neighbouring bins (std, in bins); 0 = one-hot


# ---------------------------------------------------------------- sampling a student


@dataclass(frozen=True)
class SamplingRecommendation:
    """How to sample a Flow Lune student: the one recommendation the README, the model card, the single file's
    metadata and the ComfyUI workflow all give (``tests/test_sampling_recommendation.py`` checks the four)."""

    steps: int = 20  # Euler steps: the student keeps the teacher's DDIM trajectory, so DDIM's usual 20 steps
    guidance_scale: float = 4.5  # classifier-free guidance on velocities; SD1.5's 7.5 oversaturates a flow student
    shift: float = TRAINING_SHIFT  # sample on the shift the student was trained with


SAMPLING = SamplingRecommendation()
