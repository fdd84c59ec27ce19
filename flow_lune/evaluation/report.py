"""The evaluator's outputs: ``eval.json``, a grid PNG with each prompt under its tile, a chart against steps."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from flow_lune.atomic import atomic_file, atomic_text

TILE = 128  # 64 px samples shown at 2x: the shapes stay legible in a viewer
CAPTION_LINES = 3  # a toy prompt wraps into at most 3 lines at this tile width
LABEL_WIDTH = 150  # room for "student euler 25 steps" left of each row


def write_json(path: str | os.PathLike, data: dict) -> Path:
    atomic_text(path, json.dumps(data, indent=2) + "\n")
    return Path(path)


def write_grid(
    path: str | os.PathLike, rows: Sequence[tuple[str, torch.Tensor]], prompts: Sequence[str], columns: int = 8
) -> Path:
    """One row per (label, images in [0, 1]); the first ``columns`` images, each prompt written under its tile."""
    from PIL import Image, ImageDraw

    if not rows:
        raise ValueError("write_grid needs at least one row of images.")
    columns = min(columns, len(prompts), *(len(x) for _, x in rows))
    from flow_lune.training.validation import label_font

    font = label_font(11)
    line_h = 13
    cell_h = TILE + CAPTION_LINES * line_h + 6
    canvas = Image.new("RGB", (LABEL_WIDTH + columns * TILE, len(rows) * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        y = r * cell_h
        for k, line in enumerate(textwrap.wrap(label, 20)[:4]):
            draw.text((4, y + TILE // 2 - 20 + k * line_h), line, fill="black", font=font)
        for c in range(columns):
            pixels = (images[c].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            tile = Image.fromarray(pixels, "RGB").resize((TILE, TILE), Image.NEAREST)
            x = LABEL_WIDTH + c * TILE
            canvas.paste(tile, (x, y))
            for k, line in enumerate(textwrap.wrap(prompts[c], 20)[:CAPTION_LINES]):
                draw.text((x + 3, y + TILE + 2 + k * line_h), line, fill="black", font=font)
    atomic_file(path, lambda tmp: canvas.save(tmp, format="PNG"))
    return Path(path)


def write_chart(path: str | os.PathLike, settings: Sequence[dict], metrics: Sequence[str]) -> Path:
    """Each metric against sampling steps (log axis), one line per (model, sampler, guidance)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in metrics if any(s.get(m) is not None for s in settings)]
    if not metrics:
        raise ValueError("write_chart: no setting holds any of the metrics to plot.")
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    lines: dict[tuple, list[dict]] = {}
    for s in settings:
        lines.setdefault((s["model"], s["sampler"], s["guidance"]), []).append(s)
    for ax, metric in zip(axes[0], metrics):
        for (model, sampler, guidance), points in lines.items():
            points = sorted((p for p in points if p.get(metric) is not None), key=lambda p: p["steps"])
            if points:
                style = "--" if model == "teacher" else "-"
                ax.plot([p["steps"] for p in points], [p[metric] for p in points], style, marker="o",
                        label=f"{model} {sampler} g={guidance:g}")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(metric.replace("_", " "))
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    atomic_file(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return Path(path)


def above_reference(row: dict) -> str:
    """A row's toy FID above the reference's, ``+16.0% +- 3.1`` (jackknife standard error), or ``-``."""
    above = row.get("toy_fid_real_vs_reference")
    if above is None:
        return "-"
    se = row.get("toy_fid_real_vs_reference_se")
    return f"{100 * above:+.1f}%" + ("" if se is None else f" +- {100 * se:.1f}")


SUMMARY_COLUMNS = (  # (eval.json key, header)
    ("accuracy", "accuracy"),
    ("toy_fid_real", "toy FID vs real"),
    ("toy_fid_real_vs_reference", "toy FID vs real, above the reference"),
    ("toy_fid_teacher", "toy FID vs teacher"),
    ("same_noise_psnr", "same-noise PSNR (dB)"),
    ("different_noise_psnr", "other-noise PSNR (dB)"),
)


def summary_table(settings: Sequence[dict], guidance: float, teacher_guidance: float | None = None) -> str:
    """A Markdown table of the settings at ``guidance`` (the teacher's at ``teacher_guidance`` when given, as
    ``evaluate.py --teacher_guidance`` samples them): the teacher's rows first, then the student's, most steps
    first; accuracy and toy FIDs as ``evaluate.py`` computed them, ``-`` where a metric does not apply."""

    def wanted(s: dict) -> float:
        return teacher_guidance if s["model"] == "teacher" and teacher_guidance is not None else guidance

    rows = sorted(
        (s for s in settings if s["guidance"] == wanted(s)),
        key=lambda s: (s["model"] != "teacher", s["sampler"], -s["steps"]),
    )
    if not rows:
        raise ValueError(f"summary_table: no setting at guidance {guidance}; evaluate at that guidance first.")
    lines = ["| model | sampler | steps | " + " | ".join(h for _, h in SUMMARY_COLUMNS) + " |"]
    lines.append("|---|---|---:|" + "---:|" * len(SUMMARY_COLUMNS))
    for s in rows:
        cells = []
        for key, _ in SUMMARY_COLUMNS:
            value = s.get(key)
            if key == "toy_fid_real_vs_reference":
                cells.append(above_reference(s))
            else:
                cells.append("-" if value is None else f"{100 * value:.1f}%" if key == "accuracy" else f"{value:.2f}")
        lines.append(f"| {s['model']} | {s['sampler']} | {s['steps']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
