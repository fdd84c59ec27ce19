"""Training metrics: one ``metrics.jsonl`` object per logged step, its tracker form, and reading it back."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .block_features import BLOCK_NAMES

if TYPE_CHECKING:
    from .step import DistillationStep


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
    """The records of a ``metrics.jsonl``, one per step: a step's records are merged (its validation metrics join
    its training record), and a resumed run's repeated steps keep their last values."""
    by_step: dict[int, dict] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            by_step.setdefault(record["step"], {}).update(record)
    return [by_step[s] for s in sorted(by_step)]


class TrainingLog:
    """The trainer's log at optimizer steps: the step's means since the last record, lambda_b and the speed,
    to ``metrics.jsonl`` (main process) and to the trackers."""

    def __init__(self, accelerator: Any, path: str | os.PathLike, total_batch_size: int, global_step: int):
        self.accelerator = accelerator
        self.writer = MetricsWriter(path) if accelerator.is_main_process else None
        self.total_batch_size = total_batch_size  # samples per optimizer step over all processes
        self.last_time, self.last_step = time.perf_counter(), global_step

    def log(self, global_step: int, lr: float, step: DistillationStep) -> dict | None:
        """Write one record from ``step``'s sums (reset here); None before any finite micro-batch."""
        means = step.take_means()
        now = time.perf_counter()
        speed = (global_step - self.last_step) * self.total_batch_size / max(now - self.last_time, 1e-9)
        self.last_time, self.last_step = now, global_step
        if step.last_out is None:
            return None
        record = metrics_record(
            global_step, lr, means[0], means[1], means[2:], step.last_out.block_weights, speed, step.skipped_steps
        )
        if self.writer is not None:
            self.writer.write(record)
        self.accelerator.log(tracker_scalars(record), step=global_step)
        return record

    def log_values(self, global_step: int, values: dict[str, Any]) -> None:
        """One extra record at ``global_step`` (e.g. the judge's accuracy at a validation): ``metrics.jsonl``
        (``read_metrics`` merges it with the step's training record) and the trackers."""
        record = {"step": int(global_step), **values}
        if self.writer is not None:
            self.writer.write(record)
        self.accelerator.log(tracker_scalars(record), step=global_step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class PhaseTimes:
    """Wall-clock seconds per phase of a run (``timings.json``): ``with times.phase("data/latents"): ...``; a phase
    entered several times adds up. ``bench/bench_default_job.py`` reports them."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - begin

    def as_dict(self) -> dict[str, float]:
        """The phases in seconds (rounded to 0.1) and ``total``, since this object was made."""
        out = {k: round(v, 1) for k, v in self.seconds.items()}
        out["total"] = round(time.perf_counter() - self.start, 1)
        return out
