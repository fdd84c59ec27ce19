"""Training logs: ``metrics.jsonl`` records, the lambda_b plot, and side-by-side validation grids (PIL only)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flow_lune.atomic import atomic_file

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


FONT_SIZE = 13  # px; at Pillow's default 10 px the space and '.' are 2 px wide and labels read run together
DASH = (8, 6)  # px on, px off: up blocks are dashed so a down block with the same lambda shows through


def label_font(size: int = FONT_SIZE) -> Any:
    """Pillow's built-in scalable font at ``size`` px (Pillow >= 10.1 with FreeType), else its bitmap font."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument, only the fixed bitmap font
        return ImageFont.load_default()


def dashed_polyline(draw: Any, points: Sequence[tuple[float, float]], fill: Any, width: int, dash=DASH) -> None:
    """Draw ``points`` as one dashed line: the on/off pattern runs on along the whole path, across its corners."""
    on, off = dash
    pos = 0.0  # where in the on+off period the pen is
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        length = math.hypot(x1 - x0, y1 - y0)
        done = 0.0
        while done < length:
            in_on = pos < on
            step = min((on - pos) if in_on else (on + off - pos), length - done)
            if in_on and step > 0:
                a, b = done / length, (done + step) / length
                draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))],
                          fill=fill, width=width)  # fmt: skip
            done += step
            pos = (pos + step) % (on + off)


def same_as(values: Sequence[Sequence[float]]) -> dict[int, int]:
    """``{b: a}`` for each series ``b`` equal, value for value, to an earlier series ``a`` (its line hides ``a``'s)."""
    first: dict[tuple[float, ...], int] = {}
    out = {}
    for b, series in enumerate(values):
        key = tuple(series)
        if key in first:
            out[b] = first[key]
        else:
            first[key] = b
    return out


def plot_lambda(records: Sequence[dict], path: str | os.PathLike, size: tuple[int, int] = (640, 360)) -> Path:
    """A PNG of lambda_b per block over training steps (one line per block, legend on the right).

    Down blocks and the mid block are solid lines, up blocks dashed and drawn last, so that lines that
    coincide (down_blocks.i and up_blocks.(3-i) share their base weight; without an assessor lambda_b = w_b)
    both show; the legend names every block whose line equals another's exactly ("up_blocks.3 = down_blocks.0").
    """
    from PIL import Image, ImageDraw

    font = label_font()
    line_h = font.getbbox("Ag_")[3] + 4  # one text line plus spacing
    width, height = size
    legend_w, margin = 230, 40
    pad = 8  # px between the frame and the extreme values, so a line at the minimum does not hide in the frame
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
        y = height - margin - pad - (value - lo) / (hi - lo) * (height - 2 * margin - 2 * pad)
        return x, y

    def text(pos: tuple[float, float], label: str, anchor: str = "la") -> None:
        draw.text(pos, label, fill="black", font=font, anchor=anchor)

    def stroke(points: list[tuple[float, float]], colour: tuple, width: int, dashed: bool, dash=DASH) -> None:
        if dashed:
            dashed_polyline(draw, points, colour, width, dash)
        else:
            draw.line(points, fill=colour, width=width, joint="curve")

    draw.rectangle([margin, margin, width - margin, height - margin], outline=(128, 128, 128))
    text((margin, margin - 8), "lambda_b over training", anchor="ld")
    for value in (hi, lo):  # ticks at the extreme values, labelled on the left
        y = xy(s_lo, value)[1]
        draw.line([(margin - 3, y), (margin, y)], fill=(128, 128, 128))
        text((margin - 5, y), f"{value:.3g}", anchor="rm")
    text((margin, height - margin + 6), f"step {s_lo}")
    text((width - margin, height - margin + 6), f"step {s_hi}", anchor="ra")
    hidden = same_as(values)
    solid = [b for b, name in enumerate(BLOCK_NAMES) if not name.startswith("up_blocks")]
    order = solid + [b for b in range(len(BLOCK_NAMES)) if b not in solid]  # dashed up blocks on top
    for b in order:
        colour, dashed = BLOCK_COLOURS[b], b not in solid
        points = [xy(s, v) for s, v in zip(steps, values[b])]
        if len(points) > 1:
            stroke(points, colour, 2, dashed)
        elif points:
            x, y = points[0]  # one step: a disk for solid blocks, a wider ring around it for dashed ones
            r = 5 if dashed else 3
            draw.ellipse([x - r, y - r, x + r, y + r], fill=None if dashed else colour, outline=colour, width=2)
        y = margin + line_h * b + line_h // 2
        legend = [(width + 5, y), (width + 30, y)]
        stroke(legend, colour, 3, dashed, dash=(6, 4))
        label = BLOCK_NAMES[b] + (f" = {BLOCK_NAMES[hidden[b]]}" if b in hidden else "")
        text((width + 36, y), label, anchor="lm")
    note_y = margin + line_h * len(BLOCK_NAMES) + 6
    text((width + 5, note_y), "solid: down, mid; dashed: up")
    if hidden:
        text((width + 5, note_y + line_h), "a = b: same values, lines overlap")
    path = Path(path)
    atomic_file(path, lambda tmp: image.save(tmp, format="PNG"))
    return path


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

    from .export import student_pipeline

    unet = accelerator.unwrap_model(student)
    was_training = unet.training
    unet.eval()
    if ema is not None:
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
    try:
        student_pipe = student_pipeline(unet, teacher, shift)
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
    atomic_file(path, lambda tmp: grid.save(tmp, format="PNG"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.asarray(grid)[None], step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(grid, caption=" | ".join(prompts))]}, step=step)
    return path
