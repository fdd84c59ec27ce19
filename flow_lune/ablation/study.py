"""The study's folders, its resumable steps (assessor, runs, evaluations) and their completion markers.

Layout of a study folder::

    study.json                    the shared settings; a restart with other settings is refused
    data/ cache/                  the toy images and the trainer's latent/embedding caches (shared by all runs)
    assessor/                     trained once by train_assessor.py, shared by the arms that use it
    reference/                    the teacher's reference images and figures (flow_lune.ablation.checkpoint_eval)
    untrained/eval.json           the student before training (the teacher's UNet): step 0 of every curve
    runs/<arm>-seed<S>/train/     the trainer's --output_dir
    runs/<arm>-seed<S>/done.json  written when the run has exported its pipeline and logged its last step
    runs/<arm>-seed<S>/eval/step-N.json   one evaluation, written atomically when complete
    report/                       report.md, results.json, charts

A step is skipped when its marker or output exists; a run killed after a checkpoint resumes from it
(``--resume_from_checkpoint latest``, bit-identical to an uninterrupted run), one killed before any
checkpoint starts again.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flow_lune.atomic import atomic_text

DONE = "done.json"
PIPELINE_INDEX = Path("pipeline") / "model_index.json"  # the trainer's final export (training/export.py)


def ablation_log(message: str) -> None:
    """A progress line of the study, prefixed ``[ablation]`` (other experiments pass their own ``log``)."""
    print(f"[ablation] {message}", flush=True)


def run_name(arm: str, seed: int) -> str:
    return f"{arm}-seed{seed}"


def checkpointing_interval(eval_at: Sequence[int]) -> int:
    """The trainer's ``--checkpointing_steps``: the greatest common divisor of the evaluation steps."""
    if not eval_at or any(s < 1 for s in eval_at):
        raise ValueError(f"evaluation steps must be ints >= 1, got {list(eval_at)}.")
    return math.gcd(*eval_at)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_json(path: Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_text(path, json.dumps(data, indent=2, default=str) + "\n")
    return path


def check_study_file(root: Path, shared: dict) -> None:
    """Write ``study.json`` on the first start; refuse a restart whose shared settings differ."""
    path = root / "study.json"
    shared = json.loads(json.dumps(shared, default=str))
    if path.is_file():
        saved = read_json(path)
        diff = sorted(k for k in set(saved) | set(shared) if saved.get(k) != shared.get(k))
        if diff:
            raise ValueError(
                f"{root} is a study with other settings ({', '.join(diff)} differ); "
                "restart it with the same options or use a new --output_dir."
            )
        return
    write_json(path, shared)


def parse_script_args(
    parse_args: Callable[[list[str]], argparse.Namespace], argv: list[str], what: str
) -> argparse.Namespace:
    """``parse_args(argv)`` of a training script; its argument errors (ValueError or parser exit) as ValueError."""
    try:
        return parse_args(list(argv))
    except SystemExit as err:
        raise ValueError(f"{what} rejected its arguments (exit {err.code}; see the error above): {argv}") from err
    except ValueError as err:
        raise ValueError(f"{what} rejected its arguments: {err}") from err


def resolved(namespace: argparse.Namespace) -> dict:
    """A parsed Namespace as the JSON values the trainer writes to ``args.json``."""
    return json.loads(json.dumps(vars(namespace), default=str))


def final_step_logged(metrics_file: Path, max_train_steps: int) -> bool:
    """Whether ``metrics.jsonl`` holds the record of the last step."""
    if not metrics_file.is_file():
        return False
    from flow_lune.training.metrics import read_metrics

    return any(r["step"] == max_train_steps for r in read_metrics(metrics_file))


@dataclass
class RunResult:
    name: str
    skipped: bool
    seconds: float


def run_training(
    trainer: Any, argv: list[str], run_dir: Path, max_train_steps: int, log: Callable[[str], None] = ablation_log
) -> RunResult:
    """Train one run through ``trainer.main(trainer.parse_args(argv + --output_dir))`` unless it is done.

    Done: ``done.json`` exists, or the export's ``model_index.json`` and the last step's metrics record
    do (then ``done.json`` is written). A run with checkpoints resumes from the latest; a run folder
    without any is started afresh.
    """
    from flow_lune.training.checkpoints import list_checkpoints

    train_dir = run_dir / "train"
    marker = run_dir / DONE
    if marker.is_file():
        return RunResult(run_dir.name, True, read_json(marker)["seconds"])
    exported = (train_dir / PIPELINE_INDEX).is_file()
    if exported and final_step_logged(train_dir / "metrics.jsonl", max_train_steps):
        write_json(marker, {"argv": argv, "seconds": None, "note": "found finished"})
        return RunResult(run_dir.name, True, 0.0)
    if exported:
        raise ValueError(f"{train_dir} holds an export but not the metrics of step {max_train_steps}; delete it.")
    full = [*argv, "--output_dir", str(train_dir)]
    checkpoints = list_checkpoints(train_dir)
    if checkpoints:
        full += ["--resume_from_checkpoint", "latest"]
        log(f"{run_dir.name}: resuming from {checkpoints[-1].name}")
    elif train_dir.exists():
        shutil.rmtree(train_dir)  # killed before its first checkpoint: nothing to keep
    log(f"{run_dir.name}: training")
    start = time.perf_counter()
    trainer.main(parse_script_args(trainer.parse_args, full, "train_flow_distill.py"))
    seconds = time.perf_counter() - start
    if not ((train_dir / PIPELINE_INDEX).is_file() and final_step_logged(train_dir / "metrics.jsonl", max_train_steps)):
        raise RuntimeError(f"{train_dir}: the trainer returned without exporting step {max_train_steps}.")
    resumed = checkpoints[-1].name if checkpoints else None
    write_json(marker, {"argv": full, "seconds": seconds, "resumed_from": resumed})
    return RunResult(run_dir.name, False, seconds)


def prune_checkpoints(train_dir: Path, keep_steps: Sequence[int]) -> list[Path]:
    """Delete the finished run's checkpoints that are not evaluated (their only use was resuming)."""
    from flow_lune.training.checkpoints import checkpoint_step, list_checkpoints

    removed = []
    for ckpt in list_checkpoints(train_dir):
        if checkpoint_step(ckpt) not in keep_steps:
            shutil.rmtree(ckpt)
            removed.append(ckpt)
    return removed


def student_folder(train_dir: Path, step: int, max_train_steps: int) -> Path:
    """The UNet folder of a run at ``step``: the exported pipeline's at the end, a checkpoint's before.

    A checkpoint's EMA weights (``unet_ema/``, with ``--use_ema``) are taken when present, as the export does.
    """
    if step == max_train_steps:
        folder = train_dir / "pipeline" / "unet"
    else:
        ckpt = train_dir / f"checkpoint-{step}"
        folder = ckpt / "unet_ema" if (ckpt / "unet_ema").is_dir() else ckpt / "unet"
    if not folder.is_dir():
        raise ValueError(f"{folder} is missing: the run did not save step {step} (check --checkpointing_steps).")
    return folder


def assessor_done(folder: Path) -> bool:
    return all((folder / n).is_file() for n in ("config.json", "model.safetensors", "profile.json"))


def train_assessor(script: Any, argv: list[str], folder: Path, log: Callable[[str], None] = ablation_log) -> RunResult:
    """Train the study's assessor once: into a temporary folder renamed when complete; skipped when present."""
    if assessor_done(folder):
        return RunResult(folder.name, True, 0.0)
    partial = folder.with_name(f".{folder.name}.partial")
    if partial.exists():
        shutil.rmtree(partial)
    log("assessor: training")
    start = time.perf_counter()
    script.main(parse_script_args(script.parse_args, [*argv, "--output_dir", str(partial)], "train_assessor.py"))
    seconds = time.perf_counter() - start
    if not assessor_done(partial):
        raise RuntimeError(f"{partial}: train_assessor.py returned without writing the assessor.")
    write_json(partial / "ablation_done.json", {"argv": argv, "seconds": seconds})
    if folder.exists():
        shutil.rmtree(folder)  # an empty stand-in made for the argument check
    os.replace(partial, folder)
    return RunResult(folder.name, False, seconds)


def load_script(repo: Path, name: str) -> Any:
    """A top-level script of the repository (``repo / name``) imported from its file; it is not an installed module."""
    stem = Path(name).stem
    spec = importlib.util.spec_from_file_location(f"flow_lune_experiment_{stem}", Path(repo) / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def git_state(repo: Path) -> dict:
    """The commit an experiment ran on and whether the work tree had changes."""

    def git(*cmd: str) -> str:
        out = subprocess.run(["git", *cmd], cwd=repo, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or "unknown", "dirty": bool(git("status", "--porcelain"))}


def prepare_models(teacher: str, judge: str, root: Path) -> tuple[Path, Path]:
    """The teacher and judge folders: 'toy' (shipped), 'tiny' (built once into ``root``) or a folder."""
    from flow_lune.atomic import atomic_folder
    from flow_lune.toy import judge_path, teacher_path

    if teacher == "toy":
        teacher_dir = teacher_path()
    elif teacher == "tiny":
        from flow_lune.tiny import save_tiny_sd_pipeline

        teacher_dir = root / "teacher"
        if not (teacher_dir / "model_index.json").is_file():
            atomic_folder(teacher_dir, lambda tmp: save_tiny_sd_pipeline(tmp, seed=0))
    else:
        teacher_dir = Path(teacher).resolve()
    if judge == "toy":
        judge_dir = judge_path()
    elif judge == "tiny":
        from flow_lune.toy import toy_arrays
        from flow_lune.toy.judge import save_judge, train_judge

        judge_dir = root / "judge"
        if not (judge_dir / "model.safetensors").is_file():
            data = toy_arrays("train", 48, seed=0)
            model = train_judge(data.images, data.labels, steps=5, batch_size=8, seed=0, log_every=0)
            atomic_folder(judge_dir, lambda tmp: save_judge(model, tmp))
    else:
        judge_dir = Path(judge).resolve()
    return teacher_dir, judge_dir
