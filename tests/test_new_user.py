"""What a new user meets with train_flow_distill.py (issue 12): a repeated command, --overwrite_output_dir, an
export killed half-way, and bad inputs that must fail early with one line and change nothing on disk.

Training runs are in-process (``main(parse_args([...]))``) on the tiny teacher; the command-line checks run the
script in a subprocess, which returns before torch is imported.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, load_script
from safetensors.torch import load_file, save_file

from flow_lune.training.run_state import COMPLETE_NAME, EXPORT_NAMES, PLAN_NAME, TrainingFailed, list_checkpoints

train_flow_distill = load_script("train_flow_distill.py")

pytestmark = pytest.mark.usefixtures("one_thread")


TEACHER: list[Path] = []  # the tiny teacher every run here names explicitly (set by the cache_dir fixture)


@pytest.fixture(scope="module")
def cache_dir(trainer_cache, tiny_pipeline_dir) -> Path:
    """The session's trainer cache, shared with the other modules; every run of this module names the session's
    tiny SD1.5 pipeline as its teacher with --pretrained_teacher_model, whatever the trainer's default is."""
    TEACHER[:] = [tiny_pipeline_dir]
    return trainer_cache


def tiny_args(output_dir: Path, cache_dir: Path, *extra: str) -> list[str]:
    """Explicit tiny flags: the session's tiny teacher, 8 generated latents, two steps."""
    return [
        "--pretrained_teacher_model", str(TEACHER[0]), "--output_dir", str(output_dir), "--cache_dir", str(cache_dir),
        "--num_generated", "8", "--generation_steps", "2", "--train_batch_size", "2", "--report_to", "none",
        "--num_validation_inference_steps", "2", "--validation_prompts", "a red square", "--max_train_steps", "2",
        "--learning_rate", "1e-4", "--seed", "3", *extra,
    ]  # fmt: skip


def run(output_dir: Path, cache_dir: Path, *extra: str) -> Path:
    return train_flow_distill.main(train_flow_distill.parse_args(tiny_args(output_dir, cache_dir, *extra)))


def script(*argv: str, cwd: Path | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(REPO / "train_flow_distill.py"), *argv],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout,
    )  # fmt: skip


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime: 'nothing on disk changed' is equality of two."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def assert_complete(out: Path) -> None:
    for name in EXPORT_NAMES:
        assert (out / name).exists(), name
    assert (out / "pipeline" / "README.md").is_file()
    record = json.loads((out / COMPLETE_NAME).read_text())
    assert record["files"] == list(EXPORT_NAMES)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*partial*"))


def one_error_line(result: subprocess.CompletedProcess) -> str:
    lines = [x for x in result.stderr.splitlines() if "error:" in x]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, cache_dir) -> Path:
    """One finished run with its export and checkpoints 1 and 2 (shared: several tests only read it)."""
    out = tmp_path_factory.mktemp("finished") / "out"
    run(out, cache_dir, "--checkpointing_steps", "1")
    return out


# ---------------------------------------------------------------- the same command twice; --overwrite_output_dir


def test_second_run_of_the_same_command_finishes_at_once(finished, cache_dir):
    assert_complete(finished)
    before = snapshot(finished)
    result = script(*tiny_args(finished, cache_dir, "--checkpointing_steps", "1"))
    assert result.returncode == 0, result.stderr
    assert "already holds the finished run" in result.stderr
    assert str(finished / "flow_lune.safetensors") in result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(finished) == before  # nothing retrained, nothing rewritten
    # The same folder with other flags: one parser error naming them, exit 2.
    other = script(*tiny_args(finished, cache_dir, "--max_train_steps", "3"))
    assert other.returncode == 2
    line = one_error_line(other)
    assert "--max_train_steps" in line and "--overwrite_output_dir" in line
    assert snapshot(finished) == before


def test_overwrite_output_dir_starts_over(tmp_path, finished, cache_dir):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    (out / "old-note.txt").write_text("from the old run")
    run(out, cache_dir, "--overwrite_output_dir", "--max_train_steps", "1")
    assert_complete(out)
    assert not (out / "old-note.txt").exists() and not list(out.glob("checkpoint-*"))
    assert json.loads((out / COMPLETE_NAME).read_text())["steps"] == 1
    assert not list(tmp_path.glob("out.overwritten-*"))  # the set-aside old folder is deleted once the run started


def test_overwrite_with_a_bad_flag_changes_nothing(tmp_path, finished, cache_dir):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    before = snapshot(out)
    result = script(*tiny_args(out, cache_dir, "--overwrite_output_dir", "--shift", "0"))
    assert result.returncode == 2 and "--shift" in one_error_line(result)
    assert snapshot(out) == before and not list(tmp_path.glob("out.overwritten-*"))


# ---------------------------------------------------------------- an export killed half-way


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing on the way catches it."""


def test_export_killed_after_pipeline_is_finished_by_rerunning(tmp_path, cache_dir, monkeypatch):
    from flow_lune.training import export

    out = tmp_path / "out"

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(export, "export_single_file", killed)  # dies right after pipeline/ is renamed into place
    with pytest.raises(Killed):
        run(out, cache_dir, "--checkpointing_steps", "2")
    assert (out / "pipeline" / "model_index.json").is_file() and (out / PLAN_NAME).is_file()
    assert not (out / COMPLETE_NAME).exists() and not (out / "flow_lune.safetensors").exists()
    pipeline_before = snapshot(out / "pipeline")
    monkeypatch.undo()
    # Re-running the same command (here with --resume_from_checkpoint latest, as a user would after a kill)
    # writes what is missing from pipeline/ and marks the run complete; no training step is repeated.
    run(out, cache_dir, "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest")
    assert_complete(out)
    assert snapshot(out / "pipeline") == pipeline_before
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert run(out, cache_dir, "--checkpointing_steps", "2") == out / "pipeline"  # and now it is finished


def test_export_killed_after_the_single_file_is_finished_by_rerunning(tmp_path, finished, cache_dir):
    """Killed after flow_lune.safetensors, before its workflows and the completion record (no training needed to
    stage that: the finished run's folder without them is what such a kill leaves)."""
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    for name in (COMPLETE_NAME, "flow_lune.workflow.json", "flow_lune.workflow-editor.json"):
        (out / name).unlink()
    pipeline_before = snapshot(out / "pipeline")
    run(out, cache_dir, "--checkpointing_steps", "1")  # the same command again
    assert_complete(out)
    assert snapshot(out / "pipeline") == pipeline_before
    graph = json.loads((out / "flow_lune.workflow.json").read_text())
    assert any(n["class_type"] == "ModelSamplingSD3" for n in graph.values())


# ---------------------------------------------------------------- inputs that must fail early


def test_a_run_without_a_single_update_fails_and_exports_nothing(tmp_path, cache_dir, tiny_pipeline_dir):
    teacher = tmp_path / "nan-teacher"
    shutil.copytree(tiny_pipeline_dir, teacher)
    weights = teacher / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(str(weights)).items()}, str(weights))
    out = tmp_path / "out"
    with pytest.raises(TrainingFailed, match="No optimizer step was taken: all 4 steps"):
        run(out, cache_dir, "--pretrained_teacher_model", str(teacher), "--max_train_steps", "4",
            "--max_nonfinite_steps", "100", "--latents_dataset", str(make_latents(tmp_path)))  # fmt: skip
    assert not any((out / name).exists() for name in (*EXPORT_NAMES, PLAN_NAME, COMPLETE_NAME))


def make_latents(tmp_path: Path) -> Path:
    """A tiny latents dataset (the NaN teacher cannot generate latents), 8 rows of (4, 8, 8)."""
    import datasets

    folder = tmp_path / "latents"
    rows = {"latents": [torch.randn(4, 8, 8).tolist() for _ in range(8)], "prompt": ["a red square"] * 8}
    datasets.Dataset.from_dict(rows).save_to_disk(str(folder))
    return folder


def test_a_corrupt_image_is_named(tmp_path, cache_dir):
    from PIL import Image

    data = tmp_path / "images"
    data.mkdir()
    rows = []
    for i in range(3):
        Image.new("RGB", (40, 40), (60 * i, 100, 200)).save(data / f"good{i}.jpg")
        rows.append({"file_name": f"good{i}.jpg", "text": f"colour {i}"})
    good = (data / "good0.jpg").read_bytes()
    (data / "broken.jpg").write_bytes(good[: len(good) // 3])  # a truncated JPEG
    rows.append({"file_name": "broken.jpg", "text": "broken"})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"Cannot read the image .*broken\.jpg"):
        run(out, cache_dir, "--train_data_dir", str(data), "--resolution", "32")
    assert not list_checkpoints(out) and not (out / "metrics.jsonl").exists()


def test_resume_from_a_truncated_checkpoint_names_it_and_the_previous_one(tmp_path, finished, cache_dir):
    out = tmp_path / "out"
    out.mkdir()
    for ckpt in list_checkpoints(finished):
        shutil.copytree(ckpt, out / ckpt.name)
    optimizer = out / "checkpoint-2" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[:-200])
    before = snapshot(out)
    with pytest.raises(ValueError) as err:
        run(out, cache_dir, "--checkpointing_steps", "1", "--max_train_steps", "3", "--resume_from_checkpoint",
            "latest")  # fmt: skip
    message = str(err.value)
    assert "checkpoint-2" in message and "optimizer.bin is truncated" in message
    assert f"--resume_from_checkpoint {out / 'checkpoint-1'}" in message
    assert snapshot(out) == before


def test_a_checkpoint_of_another_unet_is_named_foreign(finished):
    from flow_lune.tiny import tiny_unet
    from flow_lune.training.checkpoints import check_checkpoint_files

    other = tiny_unet(0, block_out_channels=(32, 64, 64, 64))
    with pytest.raises(ValueError, match=r"checkpoint-2: unet/diffusion_pytorch_model.safetensors is from another "
                       r"UNet configuration.*Resume from the previous complete checkpoint.*checkpoint-1"):  # fmt: skip
        check_checkpoint_files(finished / "checkpoint-2", finished, other)
    check_checkpoint_files(finished / "checkpoint-2", finished, tiny_unet(0))  # its own UNet passes


def test_an_assessor_of_another_unet_is_refused_before_training(tmp_path, cache_dir):
    from flow_lune.training.assessor import Assessor, AssessorConfig
    from flow_lune.training.block_features import BLOCK_NAMES

    assessor = tmp_path / "assessor"
    Assessor(AssessorConfig([320, 640, 1280, 1280, 1280, 1280, 1280, 640, 320], list(BLOCK_NAMES))).save_pretrained(
        assessor
    )
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"built for a UNet with block channels \[320, 640.*this student has"):
        run(out, cache_dir, "--assessor", str(assessor))
    assert not list_checkpoints(out) and not (out / "metrics.jsonl").exists() and not (out / "args.json").exists()


@pytest.mark.parametrize("name", ["flow_lune.safetensors", "flow_lune.workflow.json", "pipeline"])
def test_an_output_folder_with_a_users_export_file_is_refused_before_training(tmp_path, cache_dir, name):
    out = tmp_path / "out"
    out.mkdir()
    (out / name).mkdir() if name == "pipeline" else (out / name).write_text("the user's own file")
    before = snapshot(out)
    result = script(*tiny_args(out, cache_dir))
    assert result.returncode == 2
    line = one_error_line(result)
    assert name in line and "move it away" in line
    assert snapshot(out) == before


@pytest.mark.parametrize("flag", ["--prompts_file", "--pretrained_teacher_model"])
def test_a_folder_where_a_file_is_expected_says_so(tmp_path, cache_dir, flag):
    folder = tmp_path / ("teacher.safetensors" if flag == "--pretrained_teacher_model" else "prompts")
    folder.mkdir()
    result = script(*tiny_args(tmp_path / "never", cache_dir, flag, str(folder)))
    assert result.returncode == 2
    assert "is a folder, not a file" in one_error_line(result)
    assert not (tmp_path / "never").exists()


# ---------------------------------------------------------------- the README's Python blocks


def readme_python_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_blocks_run_after_a_training_run(tmp_path, finished):
    """Every ```python block of the README, run as written in a folder holding the quickstart's output folder."""
    blocks = readme_python_blocks()
    assert any("flow-lune-output/pipeline" in b for b in blocks)
    (tmp_path / "flow-lune-output").symlink_to(finished, target_is_directory=True)
    runner = tmp_path / "run_blocks.py"
    runner.write_text(
        "import json, sys, warnings\n"
        "warnings.simplefilter('error', FutureWarning)  # a deprecated keyword in the README fails the test\n"
        "for i, block in enumerate(json.load(open(sys.argv[1]))):\n"
        "    exec(compile(block, f'README block {i}', 'exec'), {'__name__': '__main__'})\n"
    )
    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(runner), "blocks.json"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    from PIL import Image

    assert Image.open(tmp_path / "red-circle.png").size == (64, 64)  # the example saves its image


def test_final_samples_carry_the_comfyui_graph_of_the_exported_file(finished):
    from PIL import Image

    image = Image.open(finished / "samples" / "prompt-0.png")
    api = json.loads(image.text["prompt"])
    (loader,) = [n["inputs"] for n in api.values() if n["class_type"] == "CheckpointLoaderSimple"]
    assert loader["ckpt_name"] == "flow_lune.safetensors"
    texts = [n["inputs"]["text"] for n in api.values() if n["class_type"] == "CLIPTextEncode"]
    assert "a red square" in texts
    assert "nodes" in json.loads(image.text["workflow"])  # the editor format ComfyUI prefers on drop
    assert not any("prompt" in Image.open(p).text for p in (finished / "validation").glob("*.png"))
