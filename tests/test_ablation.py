"""experiments/ablation.py in --quick mode on the tiny teacher: the report's structure, every number traced back
to the run folders, the arm check, and a restart that redoes nothing finished.

The numbers of a quick study mean nothing (a random tiny teacher, a judge trained for 5 steps); the tests
check where they come from, not what they say.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, load_script
from safetensors.torch import load_file

from flow_lune.ablation import ARMS, ArmDifferenceError, check_arms, mean_interval, steps_to_target, t_quantile_975
from flow_lune.ablation.stats import loss_spread

ablation = load_script("experiments/ablation.py")

# every study runs with --threads 1: tiny models on a loaded 2-core machine (conftest.one_thread), and a resumed
# run matches an uninterrupted one bit for bit only at the same thread count

ARMS_RUN = ["a", "d"]  # a: no assessor; d: the assessor's lambda_b and its profile's sigmas (c's path and more)
UNET = "unet/diffusion_pytorch_model.safetensors"


def quick(root: Path, *extra: str) -> dict:
    argv = ["--quick", "--output_dir", str(root), "--arms", ",".join(ARMS_RUN), "--threads", "1", *extra]
    threads = torch.get_num_threads()
    try:
        return ablation.main(ablation.parse_args(argv))
    finally:
        torch.set_num_threads(threads)  # main sets the process's threads; give the other tests theirs back


def read(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("ablation") / "study"
    return root, quick(root)


# ---------------------------------------------------------------- statistics, by hand


def test_t_quantiles_and_interval_by_hand():
    assert t_quantile_975(2) == pytest.approx(4.303, abs=1e-3)
    assert t_quantile_975(1000) == pytest.approx(1.9623, abs=1e-3)  # the approximation beyond the table
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 29, 30, 31, 60, 200):
        assert t_quantile_975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-3)
    i = mean_interval([1.0, 2.0, 6.0])
    half = 4.303 * statistics.stdev([1.0, 2.0, 6.0]) / math.sqrt(3)
    assert (i.mean, i.low, i.high, i.n) == pytest.approx((3.0, 3.0 - half, 3.0 + half, 3))
    assert mean_interval([5.0]).low is None
    with pytest.raises(ValueError, match="finite"):
        mean_interval([1.0, float("nan")])
    assert steps_to_target({0: 0.1, 50: 0.9, 25: 0.95}, 0.9) == 25
    assert steps_to_target({0: 0.1, 25: 0.5}, 0.9) is None
    records = [{"step": s, "loss": float(s % 3)} for s in range(1, 11)]
    spread = loss_spread(records, "loss", 0.3)  # steps 8, 9, 10
    assert (spread["count"], spread["std"]) == (3, pytest.approx(statistics.stdev([2.0, 0.0, 1.0])))


def test_check_arms_names_a_forbidden_difference():
    base = {"seed": 0, "learning_rate": 1e-4, "assessor": "none", "output_dir": "x"}
    ok = check_arms({"a": {**base, "kd_weight": 0.0}, "b": {**base, "kd_weight": 0.25, "output_dir": "y"}})
    assert ok == {"a-b": ["kd_weight"]}
    with pytest.raises(ArmDifferenceError, match=r"a vs b: --learning_rate is 0.0001 vs 0.001"):
        check_arms({"a": base, "b": {**base, "learning_rate": 1e-3}})


# ---------------------------------------------------------------- the quick study


def test_report_structure(study):
    root, results = study
    out = root / "report"
    saved = read(out / "results.json")
    assert saved == json.loads(json.dumps(results, default=str))
    for name in ("quality.png", "lambda.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert saved["git"]["commit"] == head and saved["command"].startswith("python experiments/ablation.py --quick")
    assert set(saved["runs"]) == {f"{a}-seed{s}" for a in ARMS_RUN for s in (0, 1)}
    assert set(saved["arm_summaries"]) == set(ARMS_RUN) and saved["eval_steps"] == [0, 2, 4]
    euler = saved["config"]["eval"]["euler_steps"]
    text = (out / "report.md").read_text()
    for arm in ARMS_RUN:
        summary = saved["arm_summaries"][arm]
        assert set(summary["final"]) == {str(e) for e in euler}
        assert set(summary["final"]["2"]) == {"accuracy", "toy_fid_real", "toy_fid_teacher", "same_noise_psnr"}
        assert f"## Arm {arm}:" in text
        fid = summary["final"]["2"]["toy_fid_real"]
        assert "| 2 | " in text and f"{fid['mean']:.2f} [{fid['low']:.2f}, {fid['high']:.2f}]" in text
    # the arms as they ran differ exactly in the arm flags
    assert saved["arm_check"]["args_json"]["0"] == {
        "a-d": ["assessor", "block_penalty_weight", "kd_weight", "timestep_sampling"]
    }
    # lambda_b (charted in lambda.png for d) is w_b without an assessor and the fusion's with one
    from flow_lune.training.block_features import BASE_BLOCK_WEIGHTS, BLOCK_NAMES

    base = dict(zip(BLOCK_NAMES, BASE_BLOCK_WEIGHTS))
    for arm, guided in (("a", False), ("d", True)):
        lines = (root / "runs" / f"{arm}-seed0" / "train" / "metrics.jsonl").read_text().splitlines()
        lam = [json.loads(line)["lambda"] for line in lines]
        assert any(r[b] != pytest.approx(base[b]) for r in lam for b in BLOCK_NAMES) == guided


def test_every_number_traces_to_the_run_folders(study):
    root, results = study
    runs = root / "runs"
    assert results["untrained"] == read(root / "untrained" / "eval.json")
    assert results["teacher"] == read(root / "reference" / "teacher.json")["metrics"]
    target = results["target"]
    assert target["accuracy"] == results["teacher"]["by_steps"]["4"]["accuracy"]  # DDIM 4: the quick reference
    for name, run in results["runs"].items():
        for step in ("2", "4"):
            assert run["evals"][step] == read(runs / name / "eval" / f"step-{step}.json")
        records = [json.loads(line) for line in (runs / name / "train" / "metrics.jsonl").read_text().splitlines()]
        tail = [r["flow_loss"] for r in records if r["step"] > 2]  # the last 50% of 4 steps
        assert run["loss_spread"]["flow_loss"]["std"] == pytest.approx(statistics.stdev(tail), rel=1e-12)
        curve = {int(s): e["by_steps"]["4"]["accuracy"] for s, e in run["evals"].items()}
        assert run["steps_to_target"] == steps_to_target(curve, target["accuracy"])
    # an arm's cell = mean and t-interval over the seeds' eval files, recomputed here
    for arm in ARMS_RUN:
        values = [
            read(runs / f"{arm}-seed{s}" / "eval" / "step-4.json")["by_steps"]["2"]["same_noise_psnr"] for s in (0, 1)
        ]
        cell = results["arm_summaries"][arm]["final"]["2"]["same_noise_psnr"]
        half = 12.706 * statistics.stdev(values) / math.sqrt(2)
        assert (cell["mean"], cell["low"], cell["high"]) == pytest.approx(
            (statistics.mean(values), statistics.mean(values) - half, statistics.mean(values) + half), rel=1e-9
        )
        curve = results["arm_summaries"][arm]["curves"]["toy_fid_teacher"]["4"]["2"]
        values = [
            read(runs / f"{arm}-seed{s}" / "eval" / "step-2.json")["by_steps"]["4"]["toy_fid_teacher"] for s in (0, 1)
        ]
        assert curve["mean"] == pytest.approx(statistics.mean(values), rel=1e-12)
    # the end-of-training evaluation is of the exported pipeline: the same weights as the last checkpoint
    a, b = (load_file(str(runs / "a-seed0" / "train" / d / UNET)) for d in ("pipeline", "checkpoint-4"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_jobs_split_the_arms_and_give_the_same_numbers(study, tmp_path):
    assert ablation.split_arms(["a", "b", "c", "d"], 2) == [["a", "c"], ["b", "d"]]
    assert ablation.split_arms(["a", "d"], 3) == [["a"], ["d"]]
    assert ablation._without(["--quick", "--arms", "a,d", "--seeds=2", "--threads", "1"], "--arms", "--seeds") == [
        "--quick", "--threads", "1"
    ]  # fmt: skip
    _, serial = study
    root = tmp_path / "study"
    parallel = quick(root, "--jobs", "2")  # a and d each in a child process, then the report here
    assert sorted(p.name for p in (root / "jobs").iterdir()) == ["job-0.log", "job-1.log"]
    assert "[ablation] a-seed0: training" in (root / "jobs" / "job-0.log").read_text()
    assert parallel["command"].endswith("--jobs 2")
    for name, run in serial["runs"].items():  # 1 thread everywhere: the numbers are the same, bit for bit
        assert _numbers(parallel["runs"][name]["evals"]) == _numbers(run["evals"])
    assert parallel["arm_summaries"] == serial["arm_summaries"]


def _numbers(record):
    """A record without its wall times, speeds and paths (what differs between two runs of the same study)."""
    if isinstance(record, dict):
        return {k: _numbers(v) for k, v in record.items() if k not in ("seconds", "images_per_second", "unet")}
    return record


def test_restart_redoes_nothing_finished_and_resumes_a_killed_run(study, capsys):
    root, _ = study
    runs = root / "runs"
    finished = {p: p.stat().st_mtime_ns for p in runs.glob("*/done.json")}
    # kill a-seed1 after its checkpoint at step 2: no export, no later checkpoint, metrics cut at step 2
    killed = runs / "a-seed1" / "train"
    final_before = load_file(str(killed / "pipeline" / UNET))
    (runs / "a-seed1" / "done.json").unlink()
    for path in killed.iterdir():  # what a kill after checkpoint-2 leaves: that checkpoint, the args, the logs
        if path.name not in ("checkpoint-2", "metrics.jsonl", "args.json", "logs"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    (killed / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= 2))
    (runs / "a-seed1" / "eval" / "step-4.json").unlink()
    (runs / "d-seed0" / "eval" / "step-2.json").unlink()  # an evaluation lost alone
    capsys.readouterr()

    quick(root)
    log = capsys.readouterr().out
    assert "a-seed1: resuming from checkpoint-2" in log
    assert [line for line in log.splitlines() if line.endswith(": training")] == ["[ablation] a-seed1: training"]
    evaluated = sorted(line for line in log.splitlines() if ": evaluating step" in line)
    assert evaluated == ["[ablation] a-seed1: evaluating step 4", "[ablation] d-seed0: evaluating step 2"]
    assert "assessor: training" not in log
    for path, mtime in finished.items():
        if path.parent.name != "a-seed1":
            assert path.stat().st_mtime_ns == mtime
    final_after = load_file(str(killed / "pipeline" / UNET))
    assert all(torch.equal(final_before[k], final_after[k]) for k in final_before)  # the resume is exact


def test_a_study_whose_arms_differ_elsewhere_is_refused(tmp_path, monkeypatch):
    monkeypatch.setitem(ARMS, "d", (*ARMS["d"], "--learning_rate", "1e-3"))
    with pytest.raises(ArmDifferenceError, match="a vs d: --learning_rate"):
        quick(tmp_path / "study")
    assert not (tmp_path / "study" / "runs").exists() and not (tmp_path / "study" / "assessor").exists()


def test_a_restart_with_other_settings_and_bad_flags_are_refused(study, capsys):
    root, _ = study
    with pytest.raises(ValueError, match="other settings .*max_train_steps"):
        quick(root, "--max_train_steps", "6")
    for argv, message in [
        (["--arms", "a,x"], "--arms x: choose from a,b,c,d"),
        (["--eval_at", "9"], "--eval_at steps must be in [1, --max_train_steps=4]"),
        (["--target_euler", "8"], "--target_euler 8 must be one of --euler_steps [2, 4]"),
    ]:
        with pytest.raises(SystemExit) as exc:
            ablation.parse_args(["--quick", *argv])
        assert exc.value.code == 2 and f"error: {message}" in capsys.readouterr().err
