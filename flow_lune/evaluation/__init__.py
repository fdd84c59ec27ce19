"""Evaluation of teachers and students: toy-world metrics (judge accuracy, toy FID, same-noise agreement),
torchmetrics' Inception FID and CLIP score for real models, sampling runners and the report writers.
``evaluate.py`` at the repository root is the command."""

from .metrics import (
    attribute_accuracy,
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

__all__ = [
    "SAMPLERS",
    "Runner",
    "attribute_accuracy",
    "clip_model_loader",
    "clip_score",
    "ddim_scheduler",
    "fixed_noise",
    "inception_fid",
    "judge_accuracy",
    "load_pipeline",
    "make_runner",
    "other_noise_partner",
    "prompt_labels",
    "psnr",
    "same_noise_agreement",
    "sample_all",
    "toy_fid",
    "write_chart",
    "write_grid",
    "write_json",
]
