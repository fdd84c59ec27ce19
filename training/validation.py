"""Validation during training: teacher (through the flow bridge) above student, same prompts and seeds.

``log_validation`` samples both with ``FlowLunePipeline`` and writes ``validation/step-N.png`` (a Pillow grid), and
logs it to tensorboard or wandb.
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


def image_grid(rows: Sequence[Sequence[Any]], row_labels: Sequence[str]) -> Any:
    """Images in a grid, one labelled row per model (e.g. teacher above student), columns = prompts."""
    from PIL import Image, ImageDraw

    font = label_font()
    cols = max(len(r) for r in rows)
    w, h = rows[0][0].size
    label_h = font.getbbox("Ag_()")[3] + 4
    grid = Image.new("RGB", (cols * w, len(rows) * (h + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (images, label) in enumerate(zip(rows, row_labels)):
        top = r * (h + label_h)
        draw.text((2, top + 1), label, fill="black", font=font)
        for c, img in enumerate(images):
            grid.paste(img.convert("RGB"), (c * w, top + label_h))
    return grid


def log_validation(
    accelerator: Any,
    student: Any,
    teacher: Any,
    prompts: Sequence[str],
    step: int,
    output_dir: str | os.PathLike,
    shift: float,
    resolution: int,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
    ema: Any | None = None,
    samples_for: str | None = None,
) -> Path:
    """Sample teacher and student on the same prompts and seeds; save ``validation/step-N.png`` and log it.

    ``samples_for``: the name of the single file the student is exported to (at the end of training). Then each
    student image is also saved alone as ``samples/prompt-K.png`` with the ComfyUI graph that samples that file
    with the same prompt, steps, guidance, shift and size in its PNG metadata (``comfyui_pnginfo``): dropped on
    ComfyUI it rebuilds the graph. ComfyUI draws its own noise for the seed, so it gives an image of the same
    model and settings, not the same pixels. The grids carry no graph: they mix the teacher in, and a grid
    during training shows a student that is not the exported one.

    Both pipelines reuse the training modules (the unwrapped student, the teacher's UNet through
    ``FlowLunePipeline.from_teacher``, its VAE, text encoder and tokenizer): no model is copied. With ``ema``
    the student is sampled with its EMA weights
    (swapped in and back out). Main process only.
    """
    import numpy as np
    import torch

    from flow_lune.pipelines import FlowLunePipeline

    from .export import student_pipeline

    unet = accelerator.unwrap_model(student)
    was_training = unet.training
    unet.eval()
    if ema is not None:
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
    try:
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
    finally:
        if ema is not None:
            ema.restore(unet.parameters())
        unet.train(was_training)
    grid = image_grid(rows, ["teacher (flow bridge)", f"student step {step}"])
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
