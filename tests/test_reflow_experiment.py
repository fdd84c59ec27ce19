"""experiments/reflow.py in --quick mode on the tiny teacher: the report's structure, every number traced to
the evaluation files it came from, the goals computed from those numbers, and a restart that redoes nothing.

The experiment's finding is the full run's to make (docs/reflow/); these tests check the plumbing.
"""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, load_script

reflow = load_script("experiments/reflow.py")


def quick(root: Path, *extra: str) -> dict:
    threads = torch.get_num_threads()
    try:
        return reflow.main(reflow.parse_args(["--quick", "--output_dir", str(root), "--threads", "1", *extra]))
    finally:
        torch.set_num_threads(threads)  # main sets the process's threads; give the other tests theirs back


def read(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("reflow") / "study"
    return root, quick(root)


def test_report_structure(experiment):
    root, results = experiment
    out = root / "report"
    saved = read(out / "results.json")
    assert saved == json.loads(json.dumps(results, default=str))
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert saved["git"]["commit"] == head and saved["command"].startswith("python experiments/reflow.py --quick")
    assert set(saved["reflowed_runs"]) == {"0", "1"} and saved["pairs"]["num_rows"] == 8
    assert saved["pairs"]["config"]["guidance"] == 2.0  # the pairs are the guided ODE's ends
    # by default of the teacher's ODE (through the bridge), on the distilled student's step grid
    assert saved["pairs"]["config"]["model_kind"] == "teacher" and saved["config"]["pairs_from"] == "teacher"
    assert saved["pairs"]["config"]["shift"] == reflow.scheduler_shift(root / "distilled" / "train" / "pipeline")
    text = (out / "report.md").read_text()
    for heading in ("## judge accuracy", "## toy FID vs real", "## Straightness", "## Goals (issues 11 and 9)"):
        assert heading in text
    # the reflowed student samples at cfg 1, the distilled one at the pairs' guidance
    assert saved["distilled"]["guidance"] == 2.0
    assert all(run["guidance"] == 1.0 for run in saved["reflowed_runs"].values())
    # every reflow run trained from the distilled student on the pairs
    for seed in (0, 1):
        args = read(root / "reflow" / f"seed{seed}" / "train" / "args.json")
        assert args["objective"] == "reflow" and args["seed"] == seed
        assert Path(args["student_model"]) == root / "distilled" / "train" / "pipeline"
        assert Path(args["reflow_data"]) == root / "pairs"


def test_every_number_traces_to_the_evaluation_files(experiment):
    root, results = experiment
    assert read(root / "eval" / "distilled.json")["by_steps"] == results["distilled"]["by_steps"]
    assert read(root / "eval" / "teacher.json")["by_steps"] == results["teacher"]["by_steps"]
    runs = [read(root / "eval" / f"reflow-seed{s}.json") for s in (0, 1)]
    for steps in ("1", "2"):
        for metric in ("accuracy", "toy_fid_real", "toy_fid_teacher", "same_noise_psnr"):
            values = [r["by_steps"][steps][metric] for r in runs]
            cell = results["reflowed"][steps][metric]
            assert cell["mean"] == pytest.approx(statistics.mean(values))
            assert cell["std"] == pytest.approx(statistics.stdev(values))
            half = 12.706 * statistics.stdev(values) / 2**0.5  # t_{0.975, 1}
            assert (cell["low"], cell["high"]) == pytest.approx((cell["mean"] - half, cell["mean"] + half), abs=1e-6)
    straight = results["straightness"]
    assert straight["distilled"] == read(root / "eval" / "distilled.json")["straightness"]["mean"]
    assert straight["reflowed"]["mean"] == pytest.approx(statistics.mean(r["straightness"]["mean"] for r in runs))
    goal = next(g for g in results["goals"] if g["goal"].startswith("straightness"))
    assert goal["met"] == (straight["reflowed"]["mean"] < straight["distilled"])
    text = (root / "report" / "report.md").read_text()
    fid = results["reflowed"]["2"]["toy_fid_real"]
    assert f"{fid['mean']:.2f} [{fid['low']:.2f}, {fid['high']:.2f}]" in text


def test_goals_compare_the_named_numbers():
    teacher = {"25": {"accuracy": 0.99}}
    distilled = {"8": {"accuracy": 0.95}}
    reflowed = {"2": {"accuracy": 0.95}, "4": {"accuracy": 0.955}}
    goals = reflow.goals(teacher, distilled, reflowed, {"distilled": 0.02, "reflowed": 0.03}, 25)
    assert [g["met"] for g in goals] == [True, False, False]  # 0.95 >= 0.95; 0.955 < 0.96; 0.03 > 0.02
    reflowed["4"]["accuracy"] = 0.97
    assert reflow.goals(teacher, distilled, reflowed, {"distilled": 0.02, "reflowed": 0.01}, 25)[1]["met"]
    # issue 9's few-step target: reflowed Euler 8 toy FID at most 10% above the teacher's DDIM 25
    teacher["25"]["toy_fid_real"], reflowed["8"] = 5.0, {"toy_fid_real": 5.5}
    fid = reflow.goals(teacher, distilled, reflowed, {"distilled": 0.02, "reflowed": 0.01}, 25)[2]
    assert fid["met"] and fid["values"] == {"reflowed_8": 5.5, "teacher_ddim_25": 5.0}
    reflowed["8"]["toy_fid_real"] = 5.51
    assert not reflow.goals(teacher, distilled, reflowed, {"distilled": 0.02, "reflowed": 0.01}, 25)[2]["met"]


def test_restart_redoes_nothing_and_other_settings_are_refused(experiment, capsys):
    root, results = experiment
    stamps = {p: p.stat().st_mtime_ns for p in (root / "eval").glob("*.json")}
    stamps[root / "pairs" / "index.json"] = (root / "pairs" / "index.json").stat().st_mtime_ns
    capsys.readouterr()
    again = quick(root)
    log = capsys.readouterr().out
    work = [line for line in log.splitlines() if line.endswith((": training", "generating")) or "evaluating" in line]
    assert not work
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert again["reflowed"] == results["reflowed"] and again["goals"] == results["goals"]
    with pytest.raises(ValueError, match="reflow_steps"):
        quick(root, "--reflow_steps", "3")
