"""Training logs: ``metrics.jsonl`` records, the lambda_b plot, and side-by-side validation grids (PIL only)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .block_features import BLOCK_NAMES

# One colour per block, distinguishable on white (down: blues, mid: black, up: reds).
BLOCK_COLOURS = (
    (158, 202, 225),
    (107, 174, 214),
    (49, 130, 189),
    (8, 81, 156),
    (0, 0, 0),
    (165, 15, 21),
    (222, 45, 38),
    (251, 106, 74),
    (252, 174, 145),
)


def _to_list(x: Any) -> list[float] | None:
    return None if x is None else [float(v) for v in x.detach().float().cpu().reshape(-1)]


def metrics_record(
    step: int,
    lr: float,
    loss: float,
    flow_loss: float,
    kd: Any,
    block_weights: Any,
    samples_per_second: float,
    skipped_steps: int = 0,
) -> dict:
    """One ``metrics.jsonl`` object: step, lr, loss, flow_loss, per-block kd and lambda (+ e_t/e_p/coh), speed."""
    record = {
        "step": int(step),
        "lr": float(lr),
        "loss": float(loss),
        "flow_loss": float(flow_loss),
        "kd": dict(zip(BLOCK_NAMES, _to_list(kd))),
        "lambda": dict(zip(BLOCK_NAMES, _to_list(block_weights.lam))),
        "samples_per_second": float(samples_per_second),
        "skipped_steps": int(skipped_steps),
    }
    for name in ("e_t", "e_p", "coh"):
        values = _to_list(getattr(block_weights, name, None))
        if values is not None:
            record[name] = dict(zip(BLOCK_NAMES, values))
    return record


def tracker_scalars(record: dict) -> dict[str, float]:
    """The record flattened for ``accelerator.log``: ``kd/down_blocks.0`` etc."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update({f"{key}/{block}": v for block, v in value.items()})
        elif key != "step":
            out[key] = value
    return out


class MetricsWriter:
    """Appends one JSON object per line to ``path`` and flushes, so a killed run keeps what it logged."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # append: a resumed run continues the same file

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl``; a resumed run's repeated steps keep their last record."""
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def plot_lambda(records: Sequence[dict], path: str | os.PathLike, size: tuple[int, int] = (640, 360)) -> Path:
    """A PNG of lambda_b per block over training steps (one line per block, legend on the right)."""
    from PIL import Image, ImageDraw

    width, height = size
    legend_w, margin = 130, 40
    image = Image.new("RGB", (width + legend_w, height), "white")
    draw = ImageDraw.Draw(image)
    steps = [r["step"] for r in records if "lambda" in r]
    values = [[r["lambda"][b] for r in records if "lambda" in r] for b in BLOCK_NAMES]
    flat = [v for series in values for v in series if math.isfinite(v)]
    lo, hi = (min(flat), max(flat)) if flat else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    s_lo, s_hi = (min(steps), max(steps)) if steps else (0, 1)
    s_span = max(s_hi - s_lo, 1)

    def xy(step: float, value: float) -> tuple[float, float]:
        x = margin + (step - s_lo) / s_span * (width - 2 * margin)
        y = height - margin - (value - lo) / (hi - lo) * (height - 2 * margin)
        return x, y

    draw.rectangle([margin, margin, width - margin, height - margin], outline=(128, 128, 128))
    draw.text((margin, 8), "lambda_b over training", fill="black")
    draw.text((4, margin - 12), f"{hi:.3g}", fill="black")
    draw.text((4, height - margin - 4), f"{lo:.3g}", fill="black")
    draw.text((margin, height - margin + 6), f"step {s_lo}", fill="black")
    draw.text((width - margin - 60, height - margin + 6), f"step {s_hi}", fill="black")
    for b, (name, series) in enumerate(zip(BLOCK_NAMES, values)):
        colour = BLOCK_COLOURS[b]
        points = [xy(s, v) for s, v in zip(steps, series)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        elif points:
            x, y = points[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        draw.line([width + 5, margin + 16 * b + 6, width + 25, margin + 16 * b + 6], fill=colour, width=3)
        draw.text((width + 30, margin + 16 * b), name, fill="black")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def image_grid(rows: Sequence[Sequence[Any]], row_labels: Sequence[str]) -> Any:
    """Images in a grid, one labelled row per model (e.g. teacher above student), columns = prompts."""
    from PIL import Image, ImageDraw

    cols = max(len(r) for r in rows)
    w, h = rows[0][0].size
    label_h = 14
    grid = Image.new("RGB", (cols * w, len(rows) * (h + label_h)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (images, label) in enumerate(zip(rows, row_labels)):
        top = r * (h + label_h)
        draw.text((2, top + 1), label, fill="black")
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
) -> Path:
    """Sample teacher and student on the same prompts and seeds; save ``validation/step-N.png`` and log it.

    Both pipelines reuse the training modules (the unwrapped student, the teacher's UNet, VAE, text
    encoder and tokenizer): no model is copied. With ``ema`` the student is sampled with its EMA weights
    (swapped in and back out). Main process only.
    """
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    from flow_lune.pipelines import FlowLunePipeline
    from flow_lune.schedulers import FlowLuneScheduler

    unet = accelerator.unwrap_model(student)
    was_training = unet.training
    unet.eval()
    if ema is not None:
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
    try:
        student_pipe = FlowLunePipeline(
            vae=teacher.vae,
            text_encoder=teacher.text_encoder,
            tokenizer=teacher.tokenizer,
            unet=unet,
            scheduler=FlowLuneScheduler(shift=shift),
        )
        sd_pipe = StableDiffusionPipeline(
            vae=teacher.vae,
            text_encoder=teacher.text_encoder,
            tokenizer=teacher.tokenizer,
            unet=teacher.unet,
            scheduler=teacher.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        teacher_pipe = FlowLunePipeline.from_teacher(sd_pipe, shift=shift)
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
    folder = Path(output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step}.png"
    tmp = path.with_name(path.name + ".tmp")
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.asarray(grid)[None], step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(grid, caption=" | ".join(prompts))]}, step=step)
    return path
