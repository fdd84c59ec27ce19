"""The ablation's results: every number gathered into ``results.json``, ``report.md`` and the charts.

Per run the numbers are copied from its evaluation files and its ``metrics.jsonl``; per arm they are
the mean and 95% t-interval over seeds (``stats.mean_interval``) of those per-run numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .arms import ARM_DESCRIPTIONS
from .stats import loss_spread, mean_interval, steps_to_target

METRICS = ("accuracy", "toy_fid_real", "toy_fid_teacher", "same_noise_psnr")  # the table's columns
METRIC_LABELS = {
    "accuracy": "accuracy",
    "toy_fid_real": "toy FID (real)",
    "toy_fid_teacher": "toy FID (teacher)",
    "same_noise_psnr": "same-noise PSNR (dB)",
}
CHART_METRICS = ("accuracy", "toy_fid_real", "same_noise_psnr")  # quality.png rows
LOSS_KEYS = ("flow_loss", "loss")  # flow_loss is comparable across arms; loss includes each arm's KD terms


def run_summary(evals: Mapping[int, dict], records: Sequence[Mapping], target: float, target_steps: int,
                tail: float) -> dict:  # fmt: skip
    """One run's numbers: its evaluations by training step, steps to the target, the loss spread at the end."""
    curve = {step: e["by_steps"][str(target_steps)]["accuracy"] for step, e in evals.items()}
    return {
        "evals": {str(k): evals[k] for k in sorted(evals)},
        "steps_to_target": steps_to_target(curve, target),
        "loss_spread": {key: loss_spread(records, key, tail) for key in LOSS_KEYS},
    }


def _interval(values: Sequence[float]) -> dict:
    return mean_interval(values).as_dict()


def arm_summary(runs: Sequence[dict], euler_steps: Sequence[int], final_step: int) -> dict:
    """Mean and 95% interval over an arm's seeds: final quality per step count, curves, steps to target, spread."""
    steps = sorted({int(s) for r in runs for s in r["evals"]})
    final = {
        str(e): {m: _interval([r["evals"][str(final_step)]["by_steps"][str(e)][m] for r in runs]) for m in METRICS}
        for e in euler_steps
    }
    curves = {
        m: {
            str(e): {str(s): _interval([r["evals"][str(s)]["by_steps"][str(e)][m] for r in runs]) for s in steps}
            for e in euler_steps
        }
        for m in METRICS
    }
    reached = [r["steps_to_target"] for r in runs]
    hit = [s for s in reached if s is not None]
    return {
        "seeds": [r["seed"] for r in runs],
        "final": final,
        "curves": curves,
        "steps_to_target": {
            "per_seed": reached,
            "reached": len(hit),
            "of": len(reached),
            "interval": _interval(hit) if len(hit) == len(reached) and hit else None,
        },
        "loss_spread": {k: _interval([r["loss_spread"][k]["std"] for r in runs]) for k in LOSS_KEYS},
    }


def _fmt(i: Mapping[str, Any] | None, digits: int = 3) -> str:
    if i is None:
        return "-"
    if i["low"] is None:
        return f"{i['mean']:.{digits}f}"
    return f"{i['mean']:.{digits}f} [{i['low']:.{digits}f}, {i['high']:.{digits}f}]"


def report_markdown(results: Mapping[str, Any]) -> str:
    """``report.md``: the settings, the teacher's reference, one table per arm, steps to target, loss spread."""
    cfg = results["config"]
    target = results["target"]
    lines = [
        "# Does the assessor help? Ablation report",
        "",
        f"- command: `{results['command']}`",
        f"- commit: `{results['git']['commit']}`" + (" (with uncommitted changes)" if results["git"]["dirty"] else ""),
        f"- written: {results['written_utc']} UTC",
        f"- arms x seeds: {', '.join(results['arms'])} x {cfg['seeds']}; {cfg['max_train_steps']} training steps; "
        f"evaluated at steps {results['eval_steps']} (step 0: the untrained student)",
        f"- evaluation: {cfg['eval']['num_prompts']} held-out prompts, guidance {cfg['eval']['guidance']:g}, "
        f"Euler {cfg['eval']['euler_steps']} steps, same noise for every model (seed {cfg['eval']['seed']}); "
        f"reference: teacher DDIM {cfg['eval']['reference_steps']}",
        f"- target: accuracy >= {target['accuracy']:.4f} ({target['source']}) at Euler {target['euler_steps']}",
        "",
        "Cells are the mean over seeds and its 95% t-interval `[low, high]` (n - 1 degrees of freedom).",
        "",
        "## Teacher (DDIM, same prompts and noise)",
        "",
        "| steps | accuracy | toy FID (real) | toy FID (teacher ref.) | same-noise PSNR (dB) |",
        "|---|---|---|---|---|",
    ]
    for steps, row in sorted(results["teacher"]["by_steps"].items(), key=lambda kv: int(kv[0])):
        fid_t = f"{row['toy_fid_teacher']:.3f}" if "toy_fid_teacher" in row else "(reference)"
        psnr = f"{row['same_noise_psnr']:.2f}" if "same_noise_psnr" in row else "-"
        lines.append(f"| {steps} | {row['accuracy']:.4f} | {row['toy_fid_real']:.3f} | {fid_t} | {psnr} |")
    for arm, summary in results["arm_summaries"].items():
        lines += [
            "",
            f"## Arm {arm}: {ARM_DESCRIPTIONS.get(arm, arm)}",
            "",
            f"Seeds {summary['seeds']}; at the end of training (step {cfg['max_train_steps']}):",
            "",
            "| Euler steps | " + " | ".join(METRIC_LABELS[m] for m in METRICS) + " |",
            "|---" * (len(METRICS) + 1) + "|",
        ]
        for e, row in summary["final"].items():
            lines.append(f"| {e} | " + " | ".join(_fmt(row[m], 2 if m != "accuracy" else 4) for m in METRICS) + " |")
        stt = summary["steps_to_target"]
        lines += [
            "",
            f"- training steps to the target: {stt['per_seed']} per seed ({stt['reached']} of {stt['of']} reached it"
            f" within the evaluated steps){'; mean ' + _fmt(stt['interval'], 1) if stt['interval'] else ''}",
        ]
        for key, interval in summary["loss_spread"].items():
            lines.append(f"- std of `{key}` over the last {cfg['loss_tail']:.0%} of training: {_fmt(interval, 5)}")
    lines += ["", "## Arm check", ""]
    for seed, pairs in results["arm_check"]["args_json"].items():
        text = "; ".join(f"{p}: {', '.join(k) or 'nothing'}" for p, k in pairs.items())
        lines.append(f"- seed {seed}, `args.json` keys that differ between arms: {text}")
    lines += [
        "",
        "## Charts",
        "",
        "- `quality.png`: accuracy, toy FID (real) and same-noise PSNR against training step, one panel per Euler "
        "step count, mean over seeds with the 95% band.",
        "- `lambda.png`: lambda_b per block over training (mean over seeds) for the arms with an assessor.",
        "",
        "This report gives the numbers; it draws no conclusion.",
        "",
    ]
    return "\n".join(lines)


def plot_quality(results: Mapping[str, Any], path: Path) -> Path:
    """Quality against training step, rows = metrics, columns = Euler step counts, one band per arm."""
    from flow_lune.training.plots import new_figure, save_figure

    euler = results["config"]["eval"]["euler_steps"]
    figure = new_figure((330 * len(euler) + 120, 260 * len(CHART_METRICS)))
    axes = figure.subplots(len(CHART_METRICS), len(euler), squeeze=False)
    for row, metric in enumerate(CHART_METRICS):
        for col, e in enumerate(euler):
            ax = axes[row, col]
            for arm, summary in results["arm_summaries"].items():
                points = summary["curves"][metric][str(e)]
                xs = sorted(int(s) for s in points)
                mean = [points[str(s)]["mean"] for s in xs]
                low = [
                    points[str(s)]["low"] if points[str(s)]["low"] is not None else points[str(s)]["mean"] for s in xs
                ]
                high = [
                    points[str(s)]["high"] if points[str(s)]["high"] is not None else points[str(s)]["mean"] for s in xs
                ]
                (line,) = ax.plot(xs, mean, marker="o", markersize=3, label=f"arm {arm}")
                ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
            ticks = [int(s) for s in results["eval_steps"]]
            ax.set_xscale("symlog", linthresh=min([s for s in ticks if s > 0], default=1))  # 0 linear, then log
            ax.set_xticks(ticks, labels=[str(s) for s in ticks], fontsize="x-small")
            ax.grid(alpha=0.3)
            ax.set_title(f"{METRIC_LABELS[metric]}, Euler {e}", fontsize="small")
            if row == len(CHART_METRICS) - 1:
                ax.set_xlabel("training step")
    axes[0, -1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    return save_figure(figure, path)


def plot_lambda_arms(lambda_records: Mapping[str, Sequence[Mapping]], path: Path) -> Path | None:
    """lambda_b per block over training, one panel per guided arm (records averaged over its seeds)."""
    if not lambda_records:
        return None
    from flow_lune.training.plots import lambda_series, new_figure, save_figure

    figure = new_figure((900, 320 * len(lambda_records)))
    axes = figure.subplots(len(lambda_records), 1, squeeze=False)[:, 0]
    for ax, (arm, records) in zip(axes, lambda_records.items()):
        for s in lambda_series(records):
            ax.plot(
                s.x, s.y, label=s.label, color=s.color, linestyle=s.linestyle, linewidth=s.linewidth, zorder=s.zorder
            )
        ax.set(title=f"arm {arm}: lambda_b (mean over seeds)", xlabel="training step", ylabel="lambda_b")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    return save_figure(figure, path)


def mean_lambda_records(runs_records: Sequence[Sequence[Mapping]]) -> list[dict]:
    """Per step, lambda_b of each block averaged over the runs that logged that step."""
    by_step: dict[int, list[Mapping]] = {}
    for records in runs_records:
        for r in records:
            if "lambda" in r:
                by_step.setdefault(int(r["step"]), []).append(r["lambda"])
    out = []
    for step in sorted(by_step):
        rows = by_step[step]
        out.append({"step": step, "lambda": {b: sum(r[b] for r in rows) / len(rows) for b in rows[0]}})
    return out


def load_run(run_dir: Path, eval_steps: Sequence[int], untrained: dict) -> tuple[dict[int, dict], list[dict]]:
    """A finished run's evaluations by training step (step 0: the shared untrained student) and its metrics."""
    from flow_lune.training.metrics import read_metrics

    from .study import read_json

    evals = {0: untrained}
    for step in eval_steps:
        evals[int(step)] = read_json(run_dir / "eval" / f"step-{step}.json")
    return evals, read_metrics(run_dir / "train" / "metrics.jsonl")


def build_results(root: Path, arms: Sequence[str], seeds: Sequence[int], eval_steps: Sequence[int],
                  target: dict, tail: float, untrained: dict, guided: Sequence[str]) -> tuple[dict, dict]:  # fmt: skip
    """Per run and per arm summaries read from the study folder; and the lambda records of each arm."""
    from .study import read_json, run_name

    runs, arm_summaries, lambdas = {}, {}, {}
    for arm in arms:
        arm_runs, records_of_arm = [], []
        for seed in seeds:
            name = run_name(arm, seed)
            evals, records = load_run(root / "runs" / name, eval_steps, untrained)
            summary = run_summary(evals, records, target["accuracy"], target["euler_steps"], tail)
            summary.update(
                arm=arm,
                seed=seed,
                train_seconds=read_json(root / "runs" / name / "done.json").get("seconds"),
                files={"metrics": f"runs/{name}/train/metrics.jsonl", "evals": f"runs/{name}/eval/"},
            )
            runs[name] = summary
            arm_runs.append(summary)
            records_of_arm.append(records)
        euler = sorted(int(e) for e in untrained["by_steps"])
        arm_summaries[arm] = arm_summary(arm_runs, euler, max(eval_steps))
        if arm in guided:
            lambdas[arm] = mean_lambda_records(records_of_arm)
    return {"runs": runs, "arm_summaries": arm_summaries}, lambdas
