"""Every chart Flow Lune writes, drawn with matplotlib's Agg canvas (no display, no global backend switch).

- ``line_chart``: curves over a shared x axis (training steps, sigma, ...), one style per series;
- ``heatmaps``: stacked heat maps over the same rows and columns, one colour scale;
- ``plot_lambda``, ``plot_losses``, ``plot_profile``: the trainer's and the assessor's charts built on them.

Files are PNGs written atomically. Pillow stays for image grids (``validation.py``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flow_lune.atomic import atomic_file

from .block_features import BLOCK_NAMES

DPI = 100  # figure sizes are given in pixels: size / DPI inches


@dataclass
class Series:
    """One curve of a line chart."""

    x: Sequence[float]
    y: Sequence[float]
    label: str
    color: Any = None  # any matplotlib colour; None: the next of the default cycle
    linestyle: str = "-"  # "-" solid, "--" dashed, ":" dotted
    zorder: float = 2.0  # higher is drawn on top
    linewidth: float = 2.0  # points


def new_figure(size: tuple[int, int] = (800, 450)) -> Any:
    """A matplotlib ``Figure`` of ``size`` pixels on the Agg canvas, laid out so that labels never overlap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Any, path: str | os.PathLike) -> Path:
    """Write ``figure`` as a PNG to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_file(path, lambda tmp: figure.savefig(tmp, format="png"))
    return path


def line_chart(
    series: Sequence[Series],
    path: str | os.PathLike,
    title: str,
    xlabel: str,
    ylabel: str,
    size: tuple[int, int] = (800, 450),
    logy: bool = False,
) -> Path:
    """Curves in one axes with a legend outside on the right; a series of one point is drawn as a marker."""
    figure = new_figure(size)
    ax = figure.add_subplot()
    for s in series:
        marker = "o" if len(s.x) == 1 else None
        style = dict(color=s.color, linestyle=s.linestyle, zorder=s.zorder, marker=marker, linewidth=s.linewidth)
        ax.plot(s.x, s.y, label=s.label, **style)
    if logy:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return save_figure(figure, path)


def heatmaps(
    panels: Sequence[tuple[str, Any]],
    row_labels: Sequence[str],
    path: str | os.PathLike,
    xlabel: str,
    extent_x: tuple[float, float] = (0.0, 1.0),
    vmin: float = 0.0,
    vmax: float = 1.0,
    cmap: str = "viridis",
) -> Path:
    """Heat maps stacked vertically, ``(title, rows x columns table)`` each, rows labelled, one shared colour bar."""
    import numpy as np

    figure = new_figure((900, 80 + 190 * len(panels)))
    axes = figure.subplots(len(panels), 1, squeeze=False, sharex=True)[:, 0]
    image = None
    for ax, (title, table) in zip(axes, panels):
        table = np.asarray(table, dtype=float)
        image = ax.imshow(
            table, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest",
            extent=(extent_x[0], extent_x[1], len(row_labels) - 0.5, -0.5),
        )  # fmt: skip
        ax.set_yticks(range(len(row_labels)), labels=row_labels, fontsize="small")
        ax.set_title(title)
    axes[-1].set_xlabel(xlabel)
    figure.colorbar(image, ax=list(axes), fraction=0.03, pad=0.01)
    return save_figure(figure, path)


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


def lambda_series(records: Sequence[Mapping]) -> list[Series]:
    """lambda_b per block over steps: down blocks blue, mid black, up blocks red and dashed on top.

    down_blocks.i and up_blocks.(3-i) share their base weight (without an assessor lambda_b = w_b), so the dashed
    line is drawn over a wider solid one, and the legend names every block whose values equal another's exactly.
    """
    from matplotlib import colormaps

    rows = [r for r in records if "lambda" in r]
    steps = [r["step"] for r in rows]
    values = [[float(r["lambda"][b]) for r in rows] for b in BLOCK_NAMES]
    hidden = same_as(values)
    out = []
    for b, name in enumerate(BLOCK_NAMES):
        up = name.startswith("up_blocks")
        if name.startswith("down_blocks"):
            color = colormaps["Blues"](0.35 + 0.6 * b / 3)
        elif up:
            color = colormaps["Reds"](0.95 - 0.6 * (b - 5) / 3)
        else:
            color = "black"
        label = name + (f" = {BLOCK_NAMES[hidden[b]]}" if b in hidden else "")
        # the solid line is wider than the dashed one drawn over it, so both stay visible where they coincide
        out.append(Series(steps, values[b], label, color, "--" if up else "-", 3.0 if up else 2.0, 2.0 if up else 4.0))
    return out


def plot_lambda(records: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """``lambda.png``: lambda_b per block over training steps (``lambda_series``)."""
    return line_chart(lambda_series(records), path, "lambda_b over training", "step", "lambda_b")


def plot_losses(records: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """``loss.png``: the total loss and the flow loss over training steps, log scale when both stay positive."""
    records = [r for r in records if "loss" in r]  # validation-only records (the judge at step 0) hold no loss
    steps = [r["step"] for r in records]
    series = [Series(steps, [r[k] for r in records], k) for k in ("loss", "flow_loss") if all(k in r for r in records)]
    positive = all(v > 0 and math.isfinite(v) for s in series for v in s.y)
    return line_chart(series, path, "training loss", "step", "loss", logy=positive and bool(series))


def plot_profile(block_names: Sequence[str], tables: Sequence[tuple[str, Any]], path: str | os.PathLike) -> Path:
    """The assessor's profile: one heat map per table (blocks x sigma bins, left clean, right pure noise)."""
    return heatmaps(tables, block_names, path, xlabel="sigma (bins; 0 = clean, 1 = pure noise)")


def plot_training(records: Sequence[Mapping], output_dir: str | os.PathLike) -> list[Path]:
    """The trainer's charts from its metrics records: ``lambda.png`` and ``loss.png`` in ``output_dir``."""
    if not records:
        return []
    output_dir = Path(output_dir)
    return [plot_lambda(records, output_dir / "lambda.png"), plot_losses(records, output_dir / "loss.png")]
