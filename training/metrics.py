"""Training metrics: one ``metrics.jsonl`` object per logged step, its tracker form, and reading it back."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .block_features import BLOCK_NAMES


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
