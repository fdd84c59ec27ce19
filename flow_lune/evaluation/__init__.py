"""Evaluation of teachers and students: toy-world metrics (judge accuracy, toy FID, same-noise agreement),
torchmetrics' Inception FID and CLIP score for real models, the straightness of sampling paths, sampling runners
and the report writers.
``evaluate.py`` at the repository root is the command."""

from .metrics import (
    GroupedFID,
    attribute_accuracy,
    jackknife_se,
    judge_accuracy,
    other_noise_partner,
    prompt_labels,
    psnr,
    same_noise_agreement,
    toy_fid,
)
from .real_metrics import clip_model_loader, clip_score, inception_fid
from .report import write_chart, write_grid, write_json
from .sampling import SAMPLERS, Runner, ddim_scheduler, fixed_noise, load_pipeline, make_runner, sample_all
from .straightness import (
    Trajectory,
    TrajectoryRecorder,
    sample_trajectory,
    straightness,
    straightness_summary,
    trajectory_straightness,
)

__all__ = [
    "SAMPLERS",
    "GroupedFID",
    "Runner",
    "Trajectory",
    "TrajectoryRecorder",
    "attribute_accuracy",
    "clip_model_loader",
    "clip_score",
    "ddim_scheduler",
    "fixed_noise",
    "inception_fid",
    "jackknife_se",
    "judge_accuracy",
    "load_pipeline",
    "make_runner",
    "other_noise_partner",
    "prompt_labels",
    "psnr",
    "same_noise_agreement",
    "sample_all",
    "sample_trajectory",
    "straightness",
    "straightness_summary",
    "toy_fid",
    "trajectory_straightness",
    "write_chart",
    "write_grid",
    "write_json",
]
