"""Flow Lune's defaults and flag choices, held once and importable without torch.

The scripts build their argument parsers from this module and check their flags with it before importing
torch, diffusers or accelerate, so ``--help`` and argument errors return at once. The modules that do the
work (``flow_lune.flow``, ``flow_lune.training``) take their defaults from here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

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
    """How to sample a Flow Lune student: what the README, the model card, the single file's metadata and the
    ComfyUI workflow of one run all give (``tests/test_sampling_recommendation.py`` checks the four). There is one
    per recipe (``Recipe.sampling``): an exported run recommends its teacher's recipe's, reflow overrides it
    (``training.export.recommended_sampling``)."""

    steps: int  # Euler steps
    guidance_scale: float  # classifier-free guidance on velocities
    shift: float = TRAINING_SHIFT  # sample on the shift the student was trained with
    basis: str = ""  # where the numbers come from, one line for the model card ("" in a plan that predates it)


# The toy world's recommendation, MEASURED by the evaluator (flow_lune/evaluation, evaluate.py) on the default job:
# `accelerate launch train_flow_distill.py --output_dir DIR --seed S` (shipped toy teacher, 500 steps, S = 0, 1, 2;
# commits 18ed32f and bfc3642), its eval/summary.md (96 held-out prompts, guidance 2, shift 3; README):
# student Euler 25 / 8 / 4 reached judge accuracy 100% / 100% / 100% on every seed and mean toy FID
# 12.7 / 14.0 / 16.6 (teacher DDIM 25: 98.6%, 10.1; its DDIM 8: 10.8). Rule: the fewest Euler steps within 1 point
# of the best accuracy and within 10% of the best toy FID: 25 (8 steps are 10.3% above: 11%, 7%, 14% on seeds 0, 1,
# 2; 4 steps 30%). The student follows the teacher's ODE, whose own 8-step sampling has about the same gap; 8 steps
# remain the fast choice at equal accuracy, and reflow is the way to fewer. (Before commit 5f5dbab changed the
# target above sigma(999), one seed gave 12.1 / 12.8 / 14.1, and the rule gave 8.) Guidance 2 and shift 3 are the
# only ones the student was measured at: guidance 2 is the toy teacher's accuracy/FID trade-off (DESIGN.md: FID
# about 21, 66, 167 at guidance 2, 3, 4.5), shift 3 the training shift.
TOY_SAMPLING = SamplingRecommendation(
    steps=25,
    guidance_scale=2.0,
    basis=(
        "measured on the toy world (default job, 3 seeds, 96 held-out prompts, guidance 2): judge accuracy 100% at "
        "Euler 25, 8 and 4 steps, mean toy FID 12.7, 14.0, 16.6; 8 steps keep the accuracy at 10% more toy FID"
    ),
)
# SD1.5's recommendation is NOT MEASURED: Flow Lune's evaluator needs a GPU and SD1.5 weights to score an SD1.5
# student, and the machines this was built on have neither. 20 Euler steps: the student learns the teacher's DDIM
# trajectory, and 20 is DDIM's usual step count for SD1.5. Guidance 4.5: below SD1.5's usual 7.5, which is
# expected to oversaturate a flow student (the usual advice for flow models; on the toy teacher FID rose steeply
# with guidance, DESIGN.md) -- a judgement, not a measurement. Measure it with evaluate.py --prompts_file on a GPU.
SD15_SAMPLING = SamplingRecommendation(
    steps=20,
    guidance_scale=4.5,
    basis=(
        "not measured (Flow Lune's evaluator needs a GPU and SD1.5 weights): DDIM's usual 20 steps; a guidance "
        "below SD1.5's usual 7.5, which is expected to oversaturate a flow student"
    ),
)
SAMPLING = SD15_SAMPLING  # a model whose recipe is unknown (the converter on a source without a recommendation)


# ---------------------------------------------------------------- recipes: the defaults that depend on the teacher

TOY_TEACHER = "toy"  # --pretrained_teacher_model spelling of the shipped toy teacher (flow_lune.toy.teacher_path())
TINY_TEACHER = "tiny"  # --pretrained_teacher_model spelling of the tiny random-weight teacher: fast tests only
TOY_DATA = "toy"  # --train_data_dir / --prompts_file spelling of the toy world's training images / captions
TOY_TEACHER_DIR = Path(__file__).parent / "toy" / "assets" / "teacher"  # flow_lune.toy.teacher_path(), torch-free
TOY_WORLD_SEED = 0  # the toy world's seed the shipped teacher was trained on (its manifest's "seed")
TOY_TRAIN_IMAGES = 4800  # the shipped teacher's whole train split: 100 images per attribute combination

# Eight held-out toy captions for the validation grid: every shape, colour and position, in varied pairings.
TOY_VALIDATION_PROMPTS = (
    "a red circle at the left",
    "a green circle at the bottom",
    "a yellow circle at the top",
    "a green square at the right",
    "a yellow square at the left",
    "a red triangle at the bottom",
    "a blue triangle at the top",
    "a yellow triangle at the bottom",
)
SD15_VALIDATION_PROMPTS = (
    "a photograph of a lighthouse on a cliff at sunset",
    "a watercolor painting of a red fox in a snowy forest",
)


@dataclass(frozen=True)
class Recipe:
    """The trainer's defaults that depend on the teacher; ``train_flow_distill.py`` fills every flag the user did
    not give from the recipe of its teacher (``recipe_for``), and its log's first lines say which one is in force."""

    name: str
    train_batch_size: int
    learning_rate: float
    max_train_steps: int | None  # None: --num_train_epochs decides
    validation_steps: int
    validation_prompts: tuple[str, ...]
    num_validation_inference_steps: int
    validation_guidance_scale: float
    train_data_dir: str | None  # None with no other source: the built-in synthetic prompts
    num_generated: int
    generation_guidance: float
    judge_prompts: int  # held-out toy prompts the judge reads at each validation (0: no judge)
    eval_prompts: int  # toy prompts of the evaluation after training (0: none)
    torch_threads: int  # torch.set_num_threads for the run (0: torch's default)
    sampling: SamplingRecommendation  # what the exported student recommends (model card, file header, workflow)
    reflow_sampling_steps: int  # Euler steps a reflowed student recommends (training.export.recommended_sampling)
    reflow_steps_basis: str  # where that number comes from, one line for the model card

    def to_dict(self) -> dict:
        return asdict(self)


TOY_RECIPE = Recipe(
    name="toy world",
    train_batch_size=32,  # DESIGN.md: 500 steps of batch 32 reach the toy teacher's accuracy at Euler 8
    learning_rate=2e-4,  # DESIGN.md: a 2M-parameter UNet from a copy of the teacher; 1e-5 barely moves it in 500 steps
    max_train_steps=500,  # about 5-6 minutes on 2 CPU cores (DESIGN.md), inside the 10-minute default job
    validation_steps=100,  # five validations: the judge's accuracy shows the student learning
    validation_prompts=TOY_VALIDATION_PROMPTS,  # held-out captions, every attribute value
    num_validation_inference_steps=8,  # Euler 8: the few-step setting the default job is judged on
    validation_guidance_scale=2.0,  # DESIGN.md: the toy teacher's accuracy/FID trade-off (FID rises with guidance)
    train_data_dir=TOY_DATA,  # real toy images noised: measured to reach the teacher's accuracy at Euler 8 (README)
    num_generated=960,  # --prompts_file toy: 20 per attribute combination, about 3 minutes of teacher DDIM 25
    generation_guidance=2.0,  # the toy teacher's own guidance (SD1.5's 7.5 oversaturates it)
    judge_prompts=48,  # each of the 48 attribute combinations once: about 2 s per validation
    eval_prompts=96,  # each combination twice: within about 2 points of accuracy (DESIGN.md), about a minute
    # Measured on the 2-core machine under load: a toy UNet forward+backward at batch 32 took 0.43 s on 1 thread
    # and 30 s on 2 (threads spin-waiting for a busy core); DESIGN.md saw 2-4x on a calmer machine.
    torch_threads=1,
    sampling=TOY_SAMPLING,  # measured by the evaluator on the default job (see TOY_SAMPLING)
    # MEASURED by experiments/reflow.py (docs/reflow/report.md, commit 776a561: pairs from the teacher's ODE at
    # guidance 2, 3 reflow seeds, sampled at cfg 1): Euler 1 / 2 / 4 / 8 / 25 steps gave judge accuracy 100% at
    # every count and toy FID 9.80 / 8.70 / 8.76 / 8.73 / 8.78.
    # Rule: the fewest steps within 1 point of the best accuracy and 10% of the best toy FID: 2 (1 step is 13% above).
    reflow_sampling_steps=2,
    reflow_steps_basis="measured on the toy world (docs/reflow/report.md): at cfg 1, Euler 1 / 2 / 4 steps gave "
    "judge accuracy 100% / 100% / 100% and toy FID 9.8 / 8.7 / 8.8",
)

SD15_RECIPE = Recipe(
    name="Stable Diffusion 1.5",
    train_batch_size=4,  # per process: fits one 24 GB GPU at 512x512 with the frozen teacher beside it
    learning_rate=1e-5,  # full fine-tuning of SD1.5's UNet from the teacher's weights
    max_train_steps=None,  # --num_train_epochs over the user's data
    validation_steps=500,  # a grid every 500 steps: SD1.5 sampling is costly
    validation_prompts=SD15_VALIDATION_PROMPTS,
    num_validation_inference_steps=SD15_SAMPLING.steps,  # the recommended sampling
    validation_guidance_scale=SD15_SAMPLING.guidance_scale,
    train_data_dir=None,  # the user's data; without it, the built-in synthetic prompts
    num_generated=64,  # enough variety for a short run
    generation_guidance=7.5,  # SD1.5's usual CFG scale
    judge_prompts=0,  # no judge outside the toy world
    eval_prompts=0,  # evaluate.py with --prompts_file evaluates real models
    torch_threads=0,  # torch's default: large models use every core (GPU runs do not care)
    sampling=SD15_SAMPLING,  # not measured here (see SD15_SAMPLING)
    # NOT MEASURED: a reflowed SD1.5 student needs a GPU to make pairs and to evaluate. 4 is a judgement: on the
    # toy world one reflow made 2 steps as good as 25 (docs/reflow/report.md); SD1.5's images are far richer,
    # and InstaFlow-style one-step SD1.5 models needed distillation on top of reflow.
    reflow_sampling_steps=4,
    reflow_steps_basis="not measured (a reflowed SD1.5 student needs a GPU); 4 is a judgement from the toy world, "
    "where 2 steps sufficed",
)


def is_toy_teacher(teacher: str | None) -> bool:
    """Whether ``--pretrained_teacher_model`` names the shipped toy teacher: absent, ``toy``, or its folder."""
    if teacher in (None, TOY_TEACHER):
        return True
    path = Path(teacher).expanduser()
    return path.is_dir() and path.resolve() == TOY_TEACHER_DIR.resolve()


def recipe_for(teacher: str | None) -> Recipe:
    """The toy world's recipe for the toy teacher (the default), SD1.5's for any other (``tiny`` included)."""
    return TOY_RECIPE if is_toy_teacher(teacher) else SD15_RECIPE
