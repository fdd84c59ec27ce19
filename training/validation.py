"""Validation during training: teacher (through the flow bridge) above student, same prompts and seeds.

``log_validation`` samples both with ``FlowLunePipeline`` and writes ``validation/step-N.png`` (a Pillow grid, each
prompt under its tiles), and logs it to tensorboard or wandb. ``judge_validation`` (toy teacher only) reads the
student's samples of held-out toy prompts with the judge. Both take the student as
``sharding.sampling_weights`` gives it to the main process: unsharded, in eval mode, with its EMA weights if any.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flow_lune.atomic import atomic_file

FONT_SIZE = 13  # px; at Pillow's default 10 px the space and '.' are 2 px wide and labels read run together


def label_font(size: int = FONT_SIZE) -> Any:
    """Pillow's built-in scalable font at ``size`` px (Pillow >= 10.1 with FreeType), else its bitmap font."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument, only the fixed bitmap font
        return ImageFont.load_default()


MIN_TILE = 128  # px: small samples (the toy world's 64 px) are enlarged so a prompt fits under them


def image_grid(rows: Sequence[Sequence[Any]], row_labels: Sequence[str], captions: Sequence[str] = ()) -> Any:
    """Images in a grid, one labelled row per model (e.g. teacher above student), columns = prompts; with
    ``captions``, each column's caption is written under each of its tiles. Tiles narrower than ``MIN_TILE`` are
    enlarged (nearest neighbour) so the caption fits."""
    import textwrap

    from PIL import Image, ImageDraw

    font = label_font()
    cols = max(len(r) for r in rows)
    w, h = rows[0][0].size
    scale = max(1, -(-MIN_TILE // w))
    w, h = w * scale, h * scale
    label_h = font.getbbox("Ag_()")[3] + 4
    chars = max(8, int(w / max(font.getlength("abcdefghij") / 10, 1)))  # characters per caption line
    wrapped = [textwrap.wrap(c, chars) for c in captions]
    caption_h = max((len(x) for x in wrapped), default=0) * label_h
    grid = Image.new("RGB", (cols * w, len(rows) * (h + label_h + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (images, label) in enumerate(zip(rows, row_labels)):
        top = r * (h + label_h + caption_h)
        draw.text((2, top + 1), label, fill="black", font=font)
        for c, img in enumerate(images):
            img = img.convert("RGB")
            if scale > 1:
                img = img.resize((w, h), Image.NEAREST)
            grid.paste(img, (c * w, top + label_h))
            for k, line in enumerate(wrapped[c] if c < len(wrapped) else []):
                draw.text((c * w + 2, top + label_h + h + k * label_h), line, fill="black", font=font)
    return grid


def judge_validation(
    accelerator: Any,
    unet: Any,
    teacher: Any,
    judge: Any,
    prompts: Sequence[str],
    shift: float,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
    with_teacher: bool = False,
    batch_size: int = 48,
) -> dict[str, float]:
    """The judge's accuracy on the student ``unet``'s images of toy ``prompts`` (Euler, fixed noise ``z_i`` seeded by
    ``(seed, i)``): ``judge_accuracy`` (all attributes right) and ``judge_accuracy/<attribute>``; with
    ``with_teacher``, the same for the teacher through the flow bridge at the same steps (``teacher_...``)."""
    import torch

    from flow_lune.evaluation import fixed_noise, judge_accuracy
    from flow_lune.pipelines import FlowLunePipeline

    from .export import student_pipeline

    size = int(teacher.unet.config.sample_size)
    noise = fixed_noise(len(prompts), (int(teacher.unet.config.in_channels), size, size), seed)
    out: dict[str, float] = {}
    pipes = [("", student_pipeline(unet, teacher, shift))]
    if with_teacher:
        pipes.append(("teacher_", FlowLunePipeline.from_teacher(teacher, shift=shift)))
    for prefix, pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
        images = []
        for i in range(0, len(prompts), batch_size):
            z = noise[i : i + batch_size].to(accelerator.device, pipe.unet.dtype)
            with torch.no_grad():
                result = pipe(list(prompts[i : i + batch_size]), num_inference_steps=num_inference_steps,
                              guidance_scale=guidance_scale, latents=z, height=size * 8, width=size * 8,
                              output_type="pt")  # fmt: skip
            images.append(result.images.float().clamp(0, 1).cpu())
        acc = judge_accuracy(judge, torch.cat(images), prompts)
        out[f"{prefix}judge_accuracy"] = acc.pop("all")
        out.update({f"{prefix}judge_accuracy/{k}": v for k, v in acc.items()})
    return out


def log_validation(
    accelerator: Any,
    unet: Any,
    teacher: Any,
    prompts: Sequence[str],
    step: int,
    output_dir: str | os.PathLike,
    shift: float,
    resolution: int,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
    samples_for: str | None = None,
) -> Path:
    """Sample teacher and student (``unet``) on the same prompts and seeds; save ``validation/step-N.png`` and log it.

    ``samples_for``: the name of the single file the student is exported to (at the end of training). Then each
    student image is also saved alone as ``samples/prompt-K.png`` with the ComfyUI graph that samples that file
    with the same prompt, steps, guidance, shift and size in its PNG metadata (``comfyui_pnginfo``): dropped on
    ComfyUI it rebuilds the graph. ComfyUI draws its own noise for the seed, so it gives an image of the same
    model and settings, not the same pixels. The grids carry no graph: they mix the teacher in, and a grid
    during training shows a student that is not the exported one.

    Both pipelines reuse the given modules (``unet``, the teacher's UNet through ``FlowLunePipeline.from_teacher``,
    its VAE, text encoder and tokenizer): no model is copied. Main process only.
    """
    import numpy as np
    import torch

    from flow_lune.pipelines import FlowLunePipeline

    from .export import student_pipeline

    student_pipe = student_pipeline(unet, teacher, shift)
    teacher_pipe = FlowLunePipeline.from_teacher(teacher, shift=shift)
    rows = []
    for pipe in (teacher_pipe, student_pipe):
        pipe.set_progress_bar_config(disable=True)
        images = []
        for k, prompt in enumerate(prompts):
            generator = torch.Generator(device=accelerator.device).manual_seed(seed + k)
            with torch.autocast(accelerator.device.type, enabled=teacher.unet.dtype != torch.float32):
                images.append(
                    pipe(
                        prompt,
                        height=resolution,
                        width=resolution,
                        num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale,
                        generator=generator,
                    ).images[0]
                )
        rows.append(images)
    grid = image_grid(rows, ["teacher (flow bridge)", f"student step {step}"], captions=prompts)
    if samples_for is not None:
        save_student_samples(
            Path(output_dir) / "samples", rows[1], prompts, samples_for, seed, num_inference_steps, guidance_scale,
            shift, resolution,
        )  # fmt: skip
    folder = Path(output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step}.png"
    atomic_file(path, lambda tmp: grid.save(tmp, format="PNG"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.asarray(grid)[None], step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(grid, caption=" | ".join(prompts))]}, step=step)
    return path


def save_student_samples(
    folder: Path,
    images: Sequence[Any],
    prompts: Sequence[str],
    ckpt_name: str,
    seed: int,
    steps: int,
    guidance_scale: float,
    shift: float,
    resolution: int,
) -> list[Path]:
    """``folder/prompt-K.png`` for each student image, with the ComfyUI graph for ``ckpt_name`` in its metadata."""
    from flow_lune.convert import comfyui_pnginfo

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, (image, prompt) in enumerate(zip(images, prompts)):
        info = comfyui_pnginfo(
            ckpt_name, prompt=prompt, seed=seed + k, steps=steps, cfg=guidance_scale, shift=shift, width=resolution,
            height=resolution,
        )  # fmt: skip
        path = folder / f"prompt-{k}.png"
        atomic_file(path, lambda tmp, image=image, info=info: image.save(tmp, format="PNG", pnginfo=info))
        paths.append(path)
    return paths


class JudgeReadings:
    """The toy judge's accuracy on the student's samples of ``num_prompts`` held-out toy prompts, read at each
    validation (:func:`judge_validation`) and logged to ``metrics.jsonl``, the trackers and the log. Main process
    only; with ``num_prompts`` 0 (any teacher but the toy one) a reading does nothing."""

    def __init__(
        self,
        num_prompts: int,
        accelerator: Any,
        teacher: Any,
        training_log: Any,
        shift: float,
        num_inference_steps: int,
        guidance_scale: float,
        seed: int,
        log: Any = print,
    ) -> None:
        self.judge = self.prompts = None
        self.active = num_prompts > 0  # on every process: whether readings are taken (by the main process)
        if num_prompts and accelerator.is_main_process:
            from flow_lune.toy import heldout_prompts, judge_path
            from flow_lune.toy.judge import load_judge

            self.judge, self.prompts = load_judge(judge_path()), heldout_prompts(num_prompts)
        self.accelerator, self.teacher, self.training_log, self.log = accelerator, teacher, training_log, log
        self.shift, self.steps, self.guidance_scale, self.seed = shift, num_inference_steps, guidance_scale, seed

    def __call__(self, unet: Any, at_step: int, with_teacher: bool = False) -> None:
        """Read the student ``unet`` (as ``sharding.sampling_weights`` gives it; None on other processes)."""
        if self.judge is None:
            return
        values = judge_validation(
            self.accelerator, unet, self.teacher, self.judge, self.prompts, self.shift, self.steps,
            self.guidance_scale, self.seed, with_teacher=with_teacher,
        )  # fmt: skip
        self.training_log.log_values(at_step, values)
        teacher_part = f"; teacher (bridge, same steps) {values['teacher_judge_accuracy']:.1%}" if with_teacher else ""
        self.log(
            f"Judge at step {at_step}: student accuracy {values['judge_accuracy']:.1%} on {len(self.prompts)} "
            f"held-out prompts, Euler {self.steps} steps, guidance {self.guidance_scale:g}{teacher_part}"
        )
