"""The default job (issue 9): no teacher given -> the toy world's recipe, data, judge and evaluation.

The resolution tests only parse flags (no torch work); one short run on the shipped toy teacher checks the
plumbing end to end (judge records in metrics.jsonl, captioned grids, the evaluation table). No test here needs
the toy teacher's quality: the figures of the full default job are measured by ``bench/bench_default_job.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, load_script

from flow_lune.settings import (
    SD15_RECIPE,
    TOY_RECIPE,
    TOY_TEACHER_DIR,
    TOY_VALIDATION_PROMPTS,
    recipe_for,
)

train_flow_distill = load_script("train_flow_distill.py")


def parse(tmp_path: Path, *extra: str):
    return train_flow_distill.parse_args(["--output_dir", str(tmp_path / "out"), *extra])


# ---------------------------------------------------------------- the recipe in force


def test_no_teacher_gives_the_toy_recipe_and_the_toy_data(tmp_path):
    args = parse(tmp_path)
    assert args.pretrained_teacher_model == "toy"
    assert args.train_data_dir == "toy" and args.prompts_file is None  # real toy images, noised
    assert (args.train_batch_size, args.learning_rate, args.max_train_steps) == (32, 2e-4, 500)
    assert args.validation_prompts == list(TOY_VALIDATION_PROMPTS)
    assert (args.num_validation_inference_steps, args.validation_guidance_scale) == (8, 2.0)
    assert (args.judge_prompts, args.eval_prompts, args.eval_steps) == (48, 96, [25, 8, 4])
    assert args.torch_threads == 1  # small models on a shared 2-core machine
    assert args.recipe_log[0].startswith("Recipe: toy world")
    assert "train_batch_size=32" in args.recipe_log[1] and "learning_rate=0.0002" in args.recipe_log[1]


@pytest.mark.parametrize("teacher", ["tiny", "runwayml/stable-diffusion-v1-5", "FOLDER"])
def test_a_teacher_given_gives_the_sd15_recipe(tmp_path, teacher):
    if teacher == "FOLDER":
        teacher = str(tmp_path)  # any local folder other than the toy teacher's
    args = parse(tmp_path, "--pretrained_teacher_model", teacher)
    assert args.pretrained_teacher_model == teacher
    assert (args.train_batch_size, args.learning_rate, args.max_train_steps, args.num_train_epochs) == (
        4,
        1e-5,
        None,
        1,
    )
    assert args.train_data_dir is None and args.prompts_file is None  # the built-in synthetic prompts
    assert (args.judge_prompts, args.eval_prompts, args.torch_threads) == (0, 0, 0)
    assert args.validation_guidance_scale == SD15_RECIPE.validation_guidance_scale
    assert (args.num_generated, args.generation_guidance) == (64, 7.5)
    assert args.recipe_log[0].startswith("Recipe: Stable Diffusion 1.5")


def test_the_toy_teachers_folder_is_the_toy_teacher(tmp_path):
    assert recipe_for(str(TOY_TEACHER_DIR)) is TOY_RECIPE and recipe_for("toy") is TOY_RECIPE
    assert recipe_for(None) is TOY_RECIPE and recipe_for("tiny") is SD15_RECIPE


def test_flags_given_win_over_the_recipe(tmp_path):
    args = parse(
        tmp_path, "--learning_rate", "1e-3", "--train_batch_size", "2", "--validation_guidance_scale", "3",
        "--prompts_file", "toy", "--num_generated", "48", "--eval_prompts", "0",
        "--validation_prompts", "a red circle at the left",
    )  # fmt: skip
    assert (args.learning_rate, args.train_batch_size, args.validation_guidance_scale) == (1e-3, 2, 3.0)
    assert args.prompts_file == "toy" and args.train_data_dir is None  # teacher latents from toy captions
    assert (args.num_generated, args.generation_guidance) == (48, TOY_RECIPE.generation_guidance)
    assert args.eval_prompts == 0 and args.judge_prompts == 48 and args.max_train_steps == 500
    assert args.validation_prompts == ["a red circle at the left"]
    assert "given (these win): " in args.recipe_log[2] and "learning_rate" in args.recipe_log[2]
    epochs = parse(tmp_path, "--num_train_epochs", "2")  # epochs given: the recipe's step count stays out
    assert (epochs.num_train_epochs, epochs.max_train_steps) == (2, None)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pretrained_teacher_model", "tiny", "--eval_prompts", "4"], "needs the toy teacher"),
        (["--pretrained_teacher_model", "tiny", "--judge_prompts", "4"], "needs the toy teacher"),
        (["--pretrained_teacher_model", "tiny", "--train_data_dir", "toy"], "toy world's data"),
        (["--eval_prompts", "1"], "0 or >= 2"),
        (["--eval_steps", "0"], "--eval_steps"),
        (["--revision", "main"], "need --pretrained_teacher_model"),
    ],
)
def test_toy_only_flags_are_refused_through_the_parser(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as info:
        parse(tmp_path, *extra)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_toy_validation_prompts_are_toy_captions():
    from flow_lune.toy import parse_caption

    labels = [tuple(parse_caption(p).values()) for p in TOY_VALIDATION_PROMPTS]
    assert len(set(labels)) == len(labels)
    for k in range(3):  # every value of every attribute is shown
        assert len({x[k] for x in labels}) == (3, 4, 4)[k]


def test_help_and_errors_do_not_import_torch():
    code = (
        "import sys, runpy; sys.argv = ['train_flow_distill.py', '--help']\n"
        "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--judge_prompts" in result.stdout and "--eval_steps" in result.stdout


# ---------------------------------------------------------------- a short run on the shipped toy teacher


@pytest.mark.usefixtures("one_thread")
def test_short_toy_run_logs_the_judge_and_writes_the_eval_table(tmp_path):
    from flow_lune.training.metrics import read_metrics

    out = tmp_path / "out"
    args = train_flow_distill.parse_args([
        "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"), "--prompts_file", "toy",
        "--num_generated", "8", "--generation_steps", "2", "--max_train_steps", "2", "--train_batch_size", "4",
        "--validation_steps", "1", "--num_validation_inference_steps", "2", "--validation_prompts",
        *TOY_VALIDATION_PROMPTS[:2], "--judge_prompts", "4", "--eval_prompts", "4", "--eval_steps", "2", "1",
        "--report_to", "none", "--no_single_file",
    ])  # fmt: skip
    assert train_flow_distill.main(args) == out / "pipeline"

    records = read_metrics(out / "metrics.jsonl")
    judged = {r["step"]: r for r in records if "judge_accuracy" in r}
    assert sorted(judged) == [0, 1, 2]  # the untrained student, each validation, the final one
    assert "teacher_judge_accuracy" in judged[0] and "teacher_judge_accuracy" not in judged[2]
    assert all(0.0 <= r["judge_accuracy"] <= 1.0 for r in judged.values())
    assert {"loss", "judge_accuracy/shape"} <= set(judged[2])  # validation merged into the step's record
    assert (out / "validation" / "step-1.png").is_file() and (out / "loss.png").is_file()

    report = json.loads((out / "eval" / "eval.json").read_text())
    rows = {(s["model"], s["sampler"], s["steps"]): s for s in report["settings"]}
    assert set(rows) == {
        ("teacher", "ddim", 2),
        ("teacher", "ddim", 1),
        ("student", "euler", 2),
        ("student", "euler", 1),
    }
    assert all(s["guidance"] == TOY_RECIPE.validation_guidance_scale for s in report["settings"])
    assert report["reference_steps"] == 2 and len(report["prompts"]) == 4
    summary = (out / "eval" / "summary.md").read_text()
    assert "| student | euler | 1 |" in summary and "| teacher | ddim | 2 |" in summary
    assert (out / "eval" / "grid.png").is_file()

    # An evaluation that crashed after the run completed: the same command runs it again, and only it.
    import shutil

    shutil.rmtree(out / "eval")
    weights = (out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert train_flow_distill.main(args) == out / "pipeline"
    again = json.loads((out / "eval" / "eval.json").read_text())["settings"]

    def measured(settings):  # the same student and noise give the same figures; only the speed differs
        return [{k: v for k, v in s.items() if k != "images_per_second"} for s in settings]

    assert measured(again) == measured(report["settings"])
    assert (out / "eval" / "summary.md").is_file()
    assert (out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == weights


@pytest.mark.usefixtures("one_thread")
def test_short_toy_reflow_run_is_evaluated_against_the_teacher_at_the_pairs_guidance(tmp_path):
    """A student reflowed on pairs guided at 2 samples at cfg 1; its reference is the teacher at 2, not at 1."""
    generate = load_script("generate_reflow_pairs.py")  # its --threads 1 is undone by the one_thread fixture
    generate.main(generate.parse_args([
        "--model", "toy", "--prompts", "toy", "--num_pairs", "4", "--steps", "2", "--guidance", "2",
        "--output_dir", str(tmp_path / "pairs"), "--threads", "1",
    ]))  # fmt: skip
    out = tmp_path / "out"
    args = train_flow_distill.parse_args([
        "--output_dir", str(out), "--objective", "reflow", "--reflow_data", str(tmp_path / "pairs"),
        "--max_train_steps", "1", "--train_batch_size", "2", "--validation_guidance_scale", "1",
        "--validation_prompts", *TOY_VALIDATION_PROMPTS[:1], "--num_validation_inference_steps", "1",
        "--judge_prompts", "0", "--eval_prompts", "2", "--eval_steps", "1", "--report_to", "none", "--no_single_file",
    ])  # fmt: skip
    assert train_flow_distill.main(args) == out / "pipeline"
    report = json.loads((out / "eval" / "eval.json").read_text())
    scales = {(s["model"], s["guidance"]) for s in report["settings"]}
    assert scales == {("teacher", 2.0), ("student", 1.0)}
    student = next(s for s in report["settings"] if s["model"] == "student")
    assert student["reference"] == "teacher ddim 1 steps g=2" and "same_noise_psnr" in student
    summary = (out / "eval" / "summary.md").read_text()
    assert "guidance 1 (teacher 2)" in summary and "| teacher | ddim | 1 |" in summary

    # An evaluation that did not finish is rerun by the same command, with the same reference.
    import shutil

    shutil.rmtree(out / "eval")
    assert train_flow_distill.main(args) == out / "pipeline"
    again = json.loads((out / "eval" / "eval.json").read_text())
    assert {(s["model"], s["guidance"]) for s in again["settings"]} == scales
    assert "guidance 1 (teacher 2)" in (out / "eval" / "summary.md").read_text()


class _OneProcess:
    """Stands in for the Accelerator in ``materialize_toy_data``: the main process, no one to wait for."""

    is_main_process = True

    def main_process_first(self):
        import contextlib

        return contextlib.nullcontext()


def test_toy_data_is_written_once_and_read_as_an_image_source(tmp_path, monkeypatch):
    import argparse

    import flow_lune.training.recipe as recipe
    from flow_lune.toy import parse_caption
    from flow_lune.training.data import DataConfig
    from flow_lune.training.sources import resolve_source

    monkeypatch.setattr(recipe, "TOY_TRAIN_IMAGES", 48)  # the real default writes 4800 (~10 s)
    args = argparse.Namespace(train_data_dir="toy", prompts_file=None, cache_dir=str(tmp_path / "cache"))
    recipe.materialize_toy_data(args, _OneProcess())
    folder = Path(args.train_data_dir)
    assert folder.parent == tmp_path / "cache" / "toy-world" and (folder / "train" / "metadata.jsonl").is_file()
    stamp = (folder / "train" / "metadata.jsonl").stat().st_mtime_ns
    again = argparse.Namespace(train_data_dir="toy", prompts_file=None, cache_dir=str(tmp_path / "cache"))
    recipe.materialize_toy_data(again, _OneProcess())
    assert again.train_data_dir == args.train_data_dir
    assert (folder / "train" / "metadata.jsonl").stat().st_mtime_ns == stamp  # written once

    source = resolve_source(DataConfig(train_data_dir=args.train_data_dir, resolution=64, cache_dir=args.cache_dir))
    assert source.kind == "images" and len(source.prompts) == 48
    assert len({tuple(parse_caption(p).values()) for p in source.prompts}) == 48  # every combination once

    captions = argparse.Namespace(train_data_dir=None, prompts_file="toy", cache_dir=str(tmp_path / "cache"))
    recipe.materialize_toy_data(captions, _OneProcess())
    lines = Path(captions.prompts_file).read_text().splitlines()
    assert len(lines) == len(set(lines)) == 48 and all(parse_caption(line) for line in lines)
