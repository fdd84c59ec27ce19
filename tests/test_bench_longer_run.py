"""``bench/bench_longer_run.py``'s target checks on hand-made evaluation results (the chain itself is a bench)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location(
    "bench_longer_run", Path(__file__).resolve().parents[1] / "bench" / "bench_longer_run.py"
)
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


def evaluation(student8_fid: float, student4_accuracy: float, floor_gap: float) -> dict:
    def student(steps: int, fid: float, accuracy: float, gap: float) -> dict:
        return {"model": "student", "sampler": "euler", "steps": steps, "toy_fid_real": fid, "accuracy": accuracy,
                "gap_db": gap, "toy_fid_real_vs_reference": fid / 3.0 - 1}  # fmt: skip

    return {
        "settings": [
            {"model": "teacher", "sampler": "ddim", "steps": 25, "toy_fid_real": 3.0, "accuracy": 0.99},
            {"model": "teacher", "sampler": "ddim", "steps": 8, "toy_fid_real": 3.9, "accuracy": 1.0, "gap_db": 17.0},
            student(8, student8_fid, 1.0, 10.0),
            student(4, 3.5, student4_accuracy, floor_gap),
        ]
    }


def test_targets_met() -> None:
    result = bench.targets(evaluation(3.3, 0.95, 3.0))
    assert result["euler8_fid_above_teacher_ddim25"]["value"] == pytest.approx(0.1)
    assert all(t["met"] for t in result.values())


@pytest.mark.parametrize(
    ("args", "missed"),
    [
        ((3.31, 1.0, 10.0), "euler8_fid_above_teacher_ddim25"),
        ((3.0, 0.93, 10.0), "ddim25_minus_euler4_accuracy"),
        ((3.0, 1.0, 2.9), "same_noise_db_above_floor_min"),  # the teacher's own rows do not count
    ],
)
def test_each_target_can_fail(args: tuple, missed: str) -> None:
    result = bench.targets(evaluation(*args))
    assert [name for name, t in result.items() if not t["met"]] == [missed]


def test_chain_records_each_stage_and_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stages run in the output folder, in order; each one's time is on disk as it ends; the report reads the
    evaluation the last stage wrote; a second run into the same folder is refused, ``--read`` reports it."""
    write_eval = (
        f"import json, os; os.makedirs({str(bench.EVAL_JSON.parent)!r}); "
        f"json.dump({evaluation(3.6, 1.0, 10.0)!r}, open({str(bench.EVAL_JSON)!r}, 'w'))"
    )
    monkeypatch.setattr(bench, "STAGES", [("first", [sys.executable, "-c", "open('first', 'w')"]),
                                          ("evaluation", [sys.executable, "-c", write_eval])])  # fmt: skip
    root = tmp_path / "chain"
    bench.main(["--output_dir", str(root)])
    result = json.loads((root / "bench_longer_run.json").read_text(encoding="utf-8"))
    assert list(result["stage_seconds"]) == ["first", "evaluation"] and (root / "first").is_file()
    assert result["budget_met"] and result["total_s"] == pytest.approx(sum(result["stage_seconds"].values()))
    assert not result["targets"]["euler8_fid_above_teacher_ddim25"]["met"]  # 3.6 / 3.0 - 1
    with pytest.raises(SystemExit):
        bench.main(["--output_dir", str(root)])
    bench.main(["--output_dir", str(root), "--read"])
    assert json.loads((root / "bench_longer_run.json").read_text(encoding="utf-8")) == result


def test_failed_stage_keeps_the_finished_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "STAGES", [("first", [sys.executable, "-c", "pass"]),
                                          ("broken", [sys.executable, "-c", "raise SystemExit(3)"])])  # fmt: skip
    root = tmp_path / "chain"
    with pytest.raises(subprocess.CalledProcessError):
        bench.main(["--output_dir", str(root)])
    assert list(json.loads((root / "bench_longer_run.json").read_text(encoding="utf-8"))["stage_seconds"]) == ["first"]
