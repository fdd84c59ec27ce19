"""Evaluating the students of an ablation with ``flow_lune.evaluation``, all against one fixed reference.

Every student (every run, every checkpoint) is sampled with Euler at each step count from the same
prompts and the same starting noise, and compared with the teacher's DDIM images from that noise. The
teacher's images are made once per study and cached, so a resumed study compares against the very same
reference.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from flow_lune.atomic import atomic_file, atomic_text


@dataclass
class EvalSettings:
    """What every evaluation of one study shares."""

    euler_steps: list[int] = field(default_factory=lambda: [2, 4, 8, 25])  # few steps show the differences
    guidance: float = 2.0  # DESIGN: the toy teacher's DDIM 25 accuracy is ~93% here, its FID lowest
    reference_steps: int = 25  # the teacher's DDIM steps of the reference images (and of the target)
    num_prompts: int = 96  # held-out captions: each of the 48 combinations twice
    heldout_images: int = 480  # real held-out images for the toy FID (10 per combination)
    seed: int = 0  # noise seed: image i starts from the same z for every model
    batch_size: int = 48  # images per pipeline call

    def check(self) -> None:
        if not self.euler_steps or any(s < 1 for s in self.euler_steps):
            raise ValueError(f"euler_steps must be a non-empty list of ints >= 1, got {self.euler_steps}.")
        if self.guidance < 1.0:
            raise ValueError(f"guidance must be >= 1 (1 disables it), got {self.guidance}.")
        for name in ("reference_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("num_prompts", "heldout_images"):
            if getattr(self, name) < 2:
                raise ValueError(
                    f"{name} must be >= 2 (a Frechet distance needs two images), got {getattr(self, name)}."
                )


@dataclass
class EvalContext:
    """The loaded teacher and judge, the prompts, the noise, the real images and the teacher's reference."""

    settings: EvalSettings
    teacher: Any  # StableDiffusionPipeline
    judge: Any  # ToyJudge
    prompts: list[str]
    noise: torch.Tensor
    real: torch.Tensor  # held-out real images in [0, 1]
    reference: torch.Tensor  # teacher DDIM images at reference_steps, same noise
    teacher_metrics: dict  # the teacher's own figures (DDIM at each step count)


def _setting_metrics(context: EvalContext, images: torch.Tensor, ips: float, with_reference: bool) -> dict:
    from flow_lune.evaluation import judge_accuracy, same_noise_agreement, toy_fid

    acc = judge_accuracy(context.judge, images, context.prompts)
    row = {
        "accuracy": acc["all"],
        "accuracy_per_attribute": {k: v for k, v in acc.items() if k != "all"},
        "toy_fid_real": toy_fid(context.judge, context.real, images),
        "images_per_second": ips,
    }
    if with_reference:
        row["toy_fid_teacher"] = toy_fid(context.judge, context.reference, images)
        row.update(same_noise_agreement(images, context.reference, context.prompts))
    return row


def load_context(teacher_dir: str | os.PathLike, judge_dir: str | os.PathLike, settings: EvalSettings,
                 cache: str | os.PathLike) -> EvalContext:  # fmt: skip
    """Load the teacher and judge; make (or read back from ``cache``) the teacher's reference images and figures."""
    from safetensors.torch import load_file, save_file

    from flow_lune.evaluation import fixed_noise, load_pipeline, make_runner, sample_all
    from flow_lune.toy import heldout_prompts, toy_arrays
    from flow_lune.toy.judge import load_judge

    settings.check()
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    teacher = load_pipeline(teacher_dir)
    judge = load_judge(judge_dir)
    prompts = heldout_prompts(settings.num_prompts)
    unet = teacher.unet
    side = unet.config.sample_size
    noise = fixed_noise(len(prompts), (unet.config.in_channels, side, side), settings.seed)
    real = toy_arrays("heldout", settings.heldout_images, seed=0).images.float() / 255.0
    images_file, metrics_file = cache / "teacher_reference.safetensors", cache / "teacher.json"
    key = json.dumps(asdict(settings), sort_keys=True)
    if images_file.is_file() and metrics_file.is_file():
        saved = json.loads(metrics_file.read_text(encoding="utf-8"))
        if saved.get("settings_key") != key:
            raise ValueError(f"{cache} holds a reference made with other evaluation settings; use a new study folder.")
        reference = load_file(str(images_file))["images"]
        return EvalContext(settings, teacher, judge, prompts, noise, real, reference, saved["metrics"])

    runner = make_runner("teacher", teacher, "ddim")
    reference, ips = sample_all(
        runner, prompts, noise, settings.reference_steps, settings.guidance, settings.batch_size
    )
    context = EvalContext(settings, teacher, judge, prompts, noise, real, reference, {})
    metrics = {str(settings.reference_steps): _setting_metrics(context, reference, ips, with_reference=False)}
    for steps in settings.euler_steps:
        if steps != settings.reference_steps:
            images, ips = sample_all(runner, prompts, noise, steps, settings.guidance, settings.batch_size)
            metrics[str(steps)] = _setting_metrics(context, images, ips, with_reference=True)
    context.teacher_metrics = {"sampler": "ddim", "guidance": settings.guidance, "by_steps": metrics}
    atomic_file(images_file, lambda tmp: save_file({"images": reference.contiguous()}, str(tmp)))
    atomic_text(metrics_file, json.dumps({"settings_key": key, "metrics": context.teacher_metrics}, indent=2) + "\n")
    return context


def student_pipeline(context: EvalContext, unet: Any, shift: float) -> Any:
    """A ``FlowLunePipeline`` of ``unet`` over the teacher's VAE, text encoder and tokenizer (no copies)."""
    from flow_lune.pipelines import FlowLunePipeline
    from flow_lune.schedulers import FlowLuneScheduler

    pipe = FlowLunePipeline(
        vae=context.teacher.vae,
        text_encoder=context.teacher.text_encoder,
        tokenizer=context.teacher.tokenizer,
        unet=unet,
        scheduler=FlowLuneScheduler(shift=shift),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_unet(folder: str | os.PathLike) -> Any:
    """A student UNet in diffusers layout (``checkpoint-N/unet`` or ``pipeline/unet``), fp32, eval mode."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(folder)).float().eval()


def evaluate_student(context: EvalContext, unet: Any, shift: float, guidance: float | None = None) -> dict:
    """Per Euler step count: judge accuracy, toy FID (real, teacher), same-noise agreement, speed.

    ``guidance`` overrides the settings' CFG scale for this student (a reflowed student trained on guided pairs
    samples at 1); the reference stays the teacher's images at the settings' guidance.
    """
    from flow_lune.evaluation import make_runner, sample_all

    runner = make_runner("student", student_pipeline(context, unet, shift), "euler")
    out = {}
    s = context.settings
    scale = s.guidance if guidance is None else guidance
    for steps in s.euler_steps:
        images, ips = sample_all(runner, context.prompts, context.noise, steps, scale, s.batch_size)
        out[str(steps)] = _setting_metrics(context, images, ips, with_reference=True)
    return {"sampler": "euler", "guidance": scale, "shift": shift, "by_steps": out}
