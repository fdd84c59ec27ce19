"""The reflow experiment's report (``experiments/reflow.py``): tables, goals and the quality chart.

Every number comes from ``results.json``: the teacher's and the distilled student's evaluation (one run each)
and the reflowed runs' mean and 95% t-interval over seeds (``flow_lune.ablation.stats.mean_interval``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

LABELS = {
    "accuracy": "judge accuracy",
    "toy_fid_real": "toy FID vs real",
    "toy_fid_teacher": "toy FID vs teacher ref.",
    "same_noise_psnr": "same-noise PSNR (dB)",
}

_PAIR_SOURCES = {  # experiments/reflow.py --pairs_from (a results.json from before the option: the distilled)
    "teacher": "teacher's exact ODE (the bridge)",
    "distilled": "distilled student's ODE",
}


def _cell(value: Any, digits: int) -> str:
    """A number, or ``mean [low, high]`` for an interval (a single seed: the mean alone), or ``-``."""
    if value is None:
        return "-"
    if isinstance(value, Mapping):
        if value.get("low") is None:
            return f"{value['mean']:.{digits}f}"
        return f"{value['mean']:.{digits}f} [{value['low']:.{digits}f}, {value['high']:.{digits}f}]"
    return f"{value:.{digits}f}"


def _seconds(seconds: Mapping[str, Any]) -> str:
    """``distilled 312, pairs 465, reflow 480/471/466, ...``: each stage's recorded wall time (``-``: not recorded)."""

    def one(v: Any) -> str:
        if isinstance(v, Mapping):
            return "/".join(one(x) for x in v.values())
        return "-" if v is None else f"{v:.0f}"

    return ", ".join(f"{k.replace('_', ' ')} {one(v)}" for k, v in seconds.items() if k != "this_start")


def unet_calls(steps: int, guidance: float) -> int:
    """UNet evaluations per image: one per step, two with classifier-free guidance (scale > 1)."""
    return steps * (2 if guidance > 1 else 1)


def model_rows(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per model label: ``by_steps`` (metric -> number or interval) and the sampling guidance."""
    guidance = results["config"]["guidance"]
    return {
        f"teacher DDIM, cfg {guidance:g}": {"guidance": guidance, "by_steps": results["teacher"]["by_steps"]},
        f"distilled Euler, cfg {guidance:g}": {"guidance": guidance, "by_steps": results["distilled"]["by_steps"]},
        "reflowed Euler, cfg 1": {"guidance": 1.0, "by_steps": results["reflowed"]},
    }


def report_markdown(results: Mapping[str, Any]) -> str:
    """``report.md``: the settings, quality against steps per model, straightness, the goals, per-seed numbers."""
    cfg = results["config"]
    git = results["git"]
    pairs = results["pairs"]["config"]
    steps = [str(s) for s in cfg["euler_steps"]]
    ref = cfg["reference_steps"]
    distilled = (
        f"`{cfg['distilled']}` (given)"
        if cfg["distilled"]
        else f"`train_flow_distill.py` with the default job's recipe, {cfg['distill_steps']} steps, seed 0"
    )
    lines = [
        "# Reflow on the toy world: teacher, distilled student, reflowed student",
        "",
        f"- command: `{results['command']}`",
        f"- commit: `{git['commit']}`{' (with uncommitted changes)' if git['dirty'] else ''}; "
        f"written {results['written_utc']} UTC; {results['seconds']['this_start']:.0f} s for this start",
        f"- wall times (s): {_seconds(results['seconds'])}",
        f"- teacher: `{cfg['teacher']}`; judge: `{cfg['judge']}`; distilled student: {distilled}",
        f"- pairs: {results['pairs']['num_rows']} from the {_PAIR_SOURCES[cfg.get('pairs_from', 'distilled')]} at "
        f"{cfg['pair_steps']} Euler steps (shift {pairs['shift']:g}), guidance {cfg['guidance']:g}, seed "
        f"{pairs.get('seed', 0)}",
        f"- reflow: {cfg['reflow_steps']} steps, batch {cfg['reflow_batch_size']}, learning rate "
        f"{cfg['reflow_learning_rate']:g}, from the distilled student; seeds {cfg['seeds']}; sampled at cfg 1",
        f"- evaluation: {cfg['num_prompts']} held-out toy prompts, the same noise for every model (seed "
        f"{cfg['eval_seed']}); toy FID against {cfg['heldout_images']} held-out real images; the reference is the "
        f"teacher's DDIM {ref} at cfg {cfg['guidance']:g}",
        "",
        "Reflowed cells are the mean over seeds and its 95% t-interval `[low, high]`; the teacher and the "
        "distilled student are one run each.",
        "",
    ]
    rows = model_rows(results)
    for metric, digits in (("accuracy", 4), ("toy_fid_real", 2), ("toy_fid_teacher", 2), ("same_noise_psnr", 2)):
        lines += [f"## {LABELS[metric]}", "", "| steps | " + " | ".join(rows) + " |", "|---" * (len(rows) + 1) + "|"]
        for s in steps:
            cells = [_cell(row["by_steps"].get(s, {}).get(metric), digits) for row in rows.values()]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "UNet evaluations per image at each step count: "
        + "; ".join(
            f"{label}: {', '.join(str(unet_calls(int(s), row['guidance'])) for s in steps)}"
            for label, row in rows.items()
        ),
        "",
        "## Straightness",
        "",
        "Mean over paths of `mean_k ||x_k - ((1 - s_k) x_K + s_k x_0)||^2 / ||x_0 - x_K||^2` (docs/reflow.md), "
        f"{results['distilled']['straightness']['steps']}-step paths from "
        f"{results['distilled']['straightness']['paths']} evaluation noises; 0 is a straight line.",
        "",
        "| model | straightness |",
        "|---|---|",
        f"| teacher (flow bridge), cfg {cfg['guidance']:g} | {_cell(results['straightness']['teacher'], 5)} |",
        f"| distilled, cfg {cfg['guidance']:g} | {_cell(results['straightness']['distilled'], 5)} |",
        f"| reflowed, cfg 1 | {_cell(results['straightness']['reflowed'], 5)} |",
        "",
        "## Goals (issues 11 and 9)",
        "",
    ]
    for goal in results["goals"]:
        values = ", ".join(f"{k} {v:.4f}" for k, v in goal["values"].items())
        lines.append(f"- {'met' if goal['met'] else 'NOT met'}: {goal['goal']} ({values})")
    lines += ["", "## Reflowed runs, per seed (accuracy)", "", "| seed | " + " | ".join(steps) + " |"]
    lines.append("|---" * (len(steps) + 1) + "|")
    for seed, run in results["reflowed_runs"].items():
        lines.append(f"| {seed} | " + " | ".join(f"{run['by_steps'][s]['accuracy']:.4f}" for s in steps) + " |")
    lines += ["", "Charts: `quality.png` (accuracy and toy FID against steps, one line per model).", ""]
    return "\n".join(lines)


def plot_quality(results: Mapping[str, Any], path: Path) -> Path:
    """Accuracy and toy FID against sampling steps, one line per model (the reflowed one with its band)."""
    from flow_lune.training.plots import new_figure, save_figure

    steps = [int(s) for s in results["config"]["euler_steps"]]
    figure = new_figure((1000, 380))
    axes = figure.subplots(1, 2)
    for ax, metric in zip(axes, ("accuracy", "toy_fid_real")):
        for label, row in model_rows(results).items():
            xs = [s for s in steps if metric in row["by_steps"].get(str(s), {})]
            values = [row["by_steps"][str(s)][metric] for s in xs]
            mean = [v["mean"] if isinstance(v, Mapping) else v for v in values]
            (line,) = ax.plot(xs, mean, marker="o", markersize=4, label=label)
            if values and isinstance(values[0], Mapping):
                low = [v["low"] if v["low"] is not None else v["mean"] for v in values]
                high = [v["high"] if v["high"] is not None else v["mean"] for v in values]
                ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xscale("log", base=2)
        ax.set_xticks(steps, labels=[str(s) for s in steps])
        if metric.startswith("toy_fid"):
            ax.set_yscale("log")  # from hundreds at one step to about 10: the differences at many steps show
        ax.set(xlabel="sampling steps", title=LABELS[metric])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small", frameon=False)
    return save_figure(figure, path)
