"""train_flow_distill.py on tiny components, in the style of diffusers' example tests.

Runs call ``main(parse_args([...]))`` in this process (importing torch costs seconds per process);
only the SIGKILL test and the two-process test start subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO, load_script
from safetensors import safe_open
from safetensors.torch import load_file

from flow_lune.training.block_features import BLOCK_NAMES
from flow_lune.training.checkpoints import list_checkpoints, resolve_resume

train_flow_distill = load_script("train_flow_distill.py")

UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache_dir(trainer_cache) -> Path:
    """The session's trainer cache (tiny teacher, generated latents, embeddings), shared with the other modules."""
    return trainer_cache


def base_args(output_dir: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [
        "--output_dir", str(output_dir),
        "--cache_dir", str(cache_dir),
        "--pretrained_teacher_model", "tiny",  # the tiny random-weight teacher: fast
        "--num_generated", "8",  # 4 batches of 2 per epoch
        "--generation_steps", "2",
        "--train_batch_size", "2",
        "--report_to", "none",
        "--num_validation_inference_steps", "2",
        "--validation_prompts", "a red square",
        "--learning_rate", "1e-4",
        "--seed", "3",
        *extra,
    ]  # fmt: skip


def run(output_dir: Path, cache_dir: Path, *extra: str) -> Path:
    return train_flow_distill.main(train_flow_distill.parse_args(base_args(output_dir, cache_dir, *extra)))


def unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / UNET_FILE))


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# ---------------------------------------------------------------- a full run


def test_run_writes_everything(tmp_path, cache_dir):
    from diffusers import UNet2DConditionModel

    from flow_lune.pipelines import FlowLunePipeline
    from flow_lune.schedulers import FlowLuneScheduler

    out = tmp_path / "out"
    pipeline_dir = run(
        out, cache_dir, "--max_train_steps", "4", "--checkpointing_steps", "2", "--checkpoints_total_limit", "1",
        "--validation_steps", "3", "--report_to", "tensorboard", "--use_ema", "--ema_decay", "0.5",
    )  # fmt: skip
    # The pipeline folder loads as a FlowLunePipeline with the training shift, and holds the trained student.
    pipe = FlowLunePipeline.from_pretrained(pipeline_dir)
    assert isinstance(pipe.scheduler, FlowLuneScheduler) and pipe.scheduler.config.shift == 3.0
    teacher = UNet2DConditionModel.from_pretrained(cache_dir / "tiny-sd15-teacher", subfolder="unet")
    changed = [k for k, v in teacher.state_dict().items() if not torch.equal(v, pipe.unet.state_dict()[k])]
    assert changed, "the exported student equals the teacher: training did nothing"
    assert (pipeline_dir / "README.md").read_text().startswith("---")
    assert "flow-lune" in (pipeline_dir / "README.md").read_text()
    # The single file (LDM layout) and its ComfyUI workflow with the shift.
    single = load_file(str(out / "flow_lune.safetensors"))
    assert any(k.startswith("model.diffusion_model.") for k in single)
    workflow = json.loads((out / "flow_lune.workflow.json").read_text())
    assert any(
        node["class_type"] == "ModelSamplingSD3" and node["inputs"]["shift"] == 3.0 for node in workflow.values()
    )
    # Checkpoints: the limit kept only the newest; it holds the student and EMA in diffusers layout.
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-4"]
    assert not list(out.glob("*.tmp"))
    UNet2DConditionModel.from_pretrained(out / "checkpoint-4", subfolder="unet")
    UNet2DConditionModel.from_pretrained(out / "checkpoint-4", subfolder="unet_ema")
    # Logs: one metrics record per step with the per-block parts, validation grids, lambda plot, tensorboard.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert set(r["kd"]) == set(r["lambda"]) == set(BLOCK_NAMES)
        assert r["samples_per_second"] > 0 and r["loss"] >= r["flow_loss"] > 0
    assert (out / "validation" / "step-3.png").is_file() and (out / "validation" / "step-4.png").is_file()
    assert (out / "lambda.png").is_file()
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert json.loads((out / "args.json").read_text())["max_train_steps"] == 4


def test_lora_run_exports_a_plain_unet(tmp_path, cache_dir):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "lora"
    pipeline_dir = run(
        out, cache_dir, "--max_train_steps", "2", "--checkpointing_steps", "2", "--lora_rank", "4",
        "--gradient_accumulation_steps", "2", "--lr_scheduler", "linear", "--no_single_file",
    )  # fmt: skip
    assert (out / "checkpoint-2" / "unet_lora" / "pytorch_lora_weights.safetensors").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # 4 batches, 2 per optimizer step
    assert records[0]["lr"] == pytest.approx(0.5e-4) and records[1]["lr"] == 0.0  # linear decay over 2 real steps
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    assert not any("lora" in k for k in unet.state_dict())


# ---------------------------------------------------------------- resume


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_flow_distill", {script!r})
    t = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(t)

    import flow_lune.training.checkpoints as c  # main() imports save_checkpoint from here when it runs

    def save_then_die(accelerator, output_dir, step, total_limit, _orig=c.save_checkpoint):
        if step == {kill_step}:  # killed while writing: the state is in checkpoint-N.tmp, never renamed
            accelerator.save_state(str(Path(output_dir) / f"checkpoint-{{step}}.tmp"))
            os.kill(os.getpid(), signal.SIGKILL)
        return _orig(accelerator, output_dir, step, total_limit)

    c.save_checkpoint = save_then_die
    t.main(t.parse_args(sys.argv[1:]))
    """
)


def test_resume_after_sigkill_is_bit_identical(tmp_path, cache_dir):
    extra = (
        "--max_train_steps", "12", "--checkpointing_steps", "3", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2",
        "--uncond_prob", "0.5", "--use_ema", "--ema_decay", "0.9", "--no_single_file",
    )  # fmt: skip
    straight = tmp_path / "straight"
    run(straight, cache_dir, *extra)

    killed = tmp_path / "killed"
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(script=str(REPO / "train_flow_distill.py"), kill_step=9))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), *base_args(killed, cache_dir, *extra)], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert [p.name for p in list_checkpoints(killed)] == ["checkpoint-3", "checkpoint-6"]
    assert (killed / "checkpoint-9.tmp").is_dir()
    assert resolve_resume("latest", killed).name == "checkpoint-6"

    run(killed, cache_dir, *extra, "--resume_from_checkpoint", "latest")
    assert_bit_identical(unet_weights(straight / "pipeline"), unet_weights(killed / "pipeline"))
    for step in (9, 12):  # the checkpoints written after the resume match too (student and EMA)
        for sub in ("unet", "unet_ema"):
            a = load_file(str(straight / f"checkpoint-{step}" / sub / "diffusion_pytorch_model.safetensors"))
            b = load_file(str(killed / f"checkpoint-{step}" / sub / "diffusion_pytorch_model.safetensors"))
            assert_bit_identical(a, b)
    assert not (killed / "checkpoint-9.tmp").exists()
    losses = {}
    for folder in (straight, killed):
        for line in (folder / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            losses.setdefault(folder.name, {})[r["step"]] = r["loss"]
    assert losses["straight"] == losses["killed"]


def test_resume_latest_without_checkpoints_starts_fresh_and_refuses_overwrites(tmp_path, cache_dir):
    out = tmp_path / "fresh"
    run(out, cache_dir, "--max_train_steps", "2", "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest",
        "--no_single_file")  # fmt: skip
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    # The same command again (with or without --resume_from_checkpoint) is a finished run: accepted, and main
    # says so at once; other flags on the same folder are refused through the parser.
    args = train_flow_distill.parse_args(base_args(out, cache_dir, "--max_train_steps", "2", "--checkpointing_steps",
                                                   "1", "--no_single_file"))  # fmt: skip
    assert train_flow_distill.main(args) == out / "pipeline"
    with pytest.raises(SystemExit) as exc:
        train_flow_distill.parse_args(base_args(out, cache_dir, "--resume_from_checkpoint", "latest"))
    assert exc.value.code == 2


# ---------------------------------------------------------------- non-finite losses


def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path, cache_dir, monkeypatch):
    from flow_lune.training import step

    real = step.distillation_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] in bad:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(step, "distillation_loss", sometimes_nan)
    bad = {2}
    out = tmp_path / "nan"
    run(out, cache_dir, "--max_train_steps", "3", "--no_single_file")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in unet_weights(out / "pipeline").values())

    calls["n"], bad = 0, set(range(1, 100))
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row"):
        run(tmp_path / "nan2", cache_dir, "--max_train_steps", "6", "--max_nonfinite_steps", "3")


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--timestep_sampling", "adaptive"], "needs --assessor"),
        (["--push_to_hub"], "needs --hub_model_id"),
        (["--lora_rank", "4", "--use_ema"], "not supported"),
        (["--uncond_prob", "1.5"], "uncond_prob"),
        (["--prompts_file", "p.txt", "--latents_dataset", "x"], "one data source"),
        (["--shift", "0"], "shift"),
        (["--lambda_min", "4"], "lam_min"),
        (["--assessor", "/nonexistent/assessor"], "not a folder"),
        (["--revision", "main"], "need --pretrained_teacher_model"),
        (["--pretrained_teacher_model", "/nonexistent/teacher.safetensors"], "does not exist"),
    ],
)
def test_contradictory_flags_fail_before_any_work(tmp_path, cache_dir, extra, match, capsys):
    """Through the parser: one "error:" line naming the flag, exit 2, nothing written."""
    with pytest.raises(SystemExit) as exc:
        train_flow_distill.parse_args(base_args(tmp_path / "never", cache_dir, *extra))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert re.search(match, line), line
    assert "Traceback" not in err
    assert not (tmp_path / "never").exists()


def test_non_epsilon_or_non_sd15_teacher_is_refused(tmp_path, cache_dir, tiny_pipeline_dir):
    import shutil

    from flow_lune.tiny import tiny_unet
    from flow_lune.training.models import check_sd15_unet

    teacher = tmp_path / "vpred-teacher"
    shutil.copytree(tiny_pipeline_dir, teacher)
    cfg_path = teacher / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "prediction_type": "v_prediction"}))
    with pytest.raises(ValueError, match="epsilon"):
        run(tmp_path / "out", cache_dir, "--pretrained_teacher_model", str(teacher))
    assert not list((tmp_path / "out").glob("checkpoint-*"))
    with pytest.raises(ValueError, match="SD1.5-layout"):
        check_sd15_unet(tiny_unet(0, down_block_types=("DownBlock2D",) * 4, up_block_types=("UpBlock2D",) * 4))


# ---------------------------------------------------------------- a single-file teacher

WEIGHT_FILES = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}


def test_single_file_teacher_trains_with_the_original_weights(tmp_path, cache_dir, tiny_pipeline_dir, monkeypatch):
    """to-single-file --prediction-type epsilon, then --pretrained_teacher_model FILE --teacher_config FOLDER."""
    from diffusers import DDPMScheduler

    from flow_lune.convert import convert_to_single_file
    from flow_lune.pipelines import FlowLunePipeline
    from flow_lune.training import models

    teacher_file = tmp_path / "teacher.safetensors"
    convert_to_single_file(tiny_pipeline_dir, teacher_file, prediction_type="epsilon", progress=False)
    used = []

    def recording_load_teacher(*args, **kwargs):
        used.append(real_load_teacher(*args, **kwargs))
        return used[-1]

    real_load_teacher = models.load_teacher
    monkeypatch.setattr(models, "load_teacher", recording_load_teacher)
    out = tmp_path / "out"
    pipeline_dir = run(
        out, cache_dir, "--pretrained_teacher_model", str(teacher_file), "--teacher_config", str(tiny_pipeline_dir),
        "--max_train_steps", "2", "--checkpointing_steps", "2", "--validation_steps", "2",
    )  # fmt: skip
    # The teacher the trainer used is the original one, bit for bit, with the original's scheduler.
    (teacher,) = used
    for name, rel in WEIGHT_FILES.items():
        original = load_file(str(tiny_pipeline_dir / rel))
        state = getattr(teacher, name).state_dict()
        assert_bit_identical(original, {k: state[k] for k in original})
        assert set(state) - set(original) <= {"text_model.embeddings.position_ids"}, name
    expected_scheduler = DDPMScheduler.load_config(tiny_pipeline_dir, subfolder="scheduler")
    assert teacher.scheduler_config == expected_scheduler
    assert type(teacher.scheduler).__name__ == expected_scheduler["_class_name"] == "PNDMScheduler"
    # The output folder is complete: trained student pipeline, its flow single file and workflow, checkpoint, logs.
    pipe = FlowLunePipeline.from_pretrained(pipeline_dir)
    changed = [
        k
        for k, v in load_file(str(tiny_pipeline_dir / UNET_FILE)).items()
        if not torch.equal(v, pipe.unet.state_dict()[k])
    ]
    assert changed, "the exported student equals the teacher: training did nothing"
    with safe_open(str(out / "flow_lune.safetensors"), "pt") as f:
        assert f.metadata()["modelspec.prediction_type"] == "flow"
    assert (out / "flow_lune.workflow.json").is_file()
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert (out / "validation" / "step-2.png").is_file() and (out / "lambda.png").is_file()
    assert json.loads((out / "args.json").read_text())["pretrained_teacher_model"] == str(teacher_file)
    assert not list(out.glob("*.tmp"))


def test_single_file_teacher_needs_its_config_and_must_be_epsilon(tmp_path, cache_dir, tiny_pipeline_dir):
    from flow_lune.convert import convert_to_single_file
    from flow_lune.training.models import load_teacher

    teacher_file = tmp_path / "teacher.safetensors"
    convert_to_single_file(tiny_pipeline_dir, teacher_file, prediction_type="epsilon", progress=False)
    teacher_cache = tmp_path / "teacher-cache"
    with pytest.raises(ValueError, match="single file, which holds no tokenizer.*--teacher_config"):
        load_teacher(str(teacher_file), cache_dir=str(teacher_cache))
    with pytest.raises(ValueError, match="has no tokenizer/ folder"):
        load_teacher(str(teacher_file), cache_dir=str(teacher_cache), config_dir=str(tiny_pipeline_dir / "unet"))
    # Through the trainer too: refused before any training output.
    with pytest.raises(ValueError, match="--teacher_config"):
        run(tmp_path / "out", cache_dir, "--pretrained_teacher_model", str(teacher_file))
    assert not list((tmp_path / "out").glob("checkpoint-*"))
    # A flow student's file is no teacher, whatever --teacher_config says.
    student_file = tmp_path / "student.safetensors"
    convert_to_single_file(tiny_pipeline_dir, student_file, shift=3.0, write_workflow=False, progress=False)
    with pytest.raises(ValueError, match="is a Flow Lune flow student.*'flow'.*not an epsilon teacher"):
        load_teacher(str(student_file), cache_dir=str(teacher_cache), config_dir=str(tiny_pipeline_dir))
    assert not teacher_cache.exists()  # nothing converted for any refused teacher


# ---------------------------------------------------------------- several processes


def test_two_process_cpu_run_writes_one_set_of_checkpoints(tmp_path, cache_dir):
    """ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 (DESIGN.md section 9); ~25 s here, so not marked slow."""
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = base_args(out, cache_dir, "--max_train_steps", "4", "--checkpointing_steps", "2", "--no_single_file")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / "train_flow_distill.py")]
    cmd += args
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "MULTI_CPU" in proc.stderr and "Num processes: 2" in proc.stderr
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    ckpt = out / "checkpoint-4"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    weights = sorted(str(p.relative_to(out)) for p in out.glob("checkpoint-*/**/*.safetensors"))
    assert weights == [f"checkpoint-{n}/{UNET_FILE}" for n in (2, 4)]  # one copy of the student per checkpoint
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert json.loads((out / "pipeline" / "model_index.json").read_text())["_class_name"] == "FlowLunePipeline"


# ---------------------------------------------------------------- training works


def held_out_flow_loss(unet, teacher, dataset, seed: int = 123) -> float:
    """Flow MSE against v* on fixed states: every cached x0, fresh noise, a fixed sigma grid in [0.05, 0.8]."""
    from flow_lune.flow import EpsilonToFlowUNet, flow_state, flow_timestep
    from flow_lune.tiny import SD15_SCHEDULER_CONFIG
    from flow_lune.training.objective import flow_matching_loss

    rows = [dataset[i] for i in range(len(dataset))]
    x0 = torch.stack([r["latents"] for r in rows])
    cond = torch.stack([r["prompt_embeds"] for r in rows])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    sigma = torch.linspace(0.05, 0.8, len(rows))
    x_sigma = flow_state(x0, eps, sigma)
    with torch.no_grad():
        v_star = EpsilonToFlowUNet(teacher, SD15_SCHEDULER_CONFIG).velocity(x_sigma, sigma, cond)
        v = unet(x_sigma, flow_timestep(sigma), cond).sample
    return float(flow_matching_loss(v, v_star, sigma))


def test_training_lowers_the_held_out_flow_loss(tmp_path, cache_dir):
    from diffusers import UNet2DConditionModel

    from flow_lune.training.data import DataConfig, prepare_training_data
    from flow_lune.training.models import load_teacher

    out = tmp_path / "works"
    pipeline_dir = run(
        out, cache_dir, "--max_train_steps", "40", "--learning_rate", "1e-3", "--uncond_prob", "0",
        "--shift", "1", "--checkpointing_steps", "1000", "--no_single_file",
    )  # fmt: skip
    teacher = load_teacher(str(cache_dir / "tiny-sd15-teacher"))
    cfg = DataConfig(cache_dir=str(cache_dir), num_generated=8, generation_steps=2, resolution=64, seed=3,
                     teacher_id="flow_lune.tiny(seed=0)")  # fmt: skip
    dataset = prepare_training_data(cfg, teacher)  # the run's cache, reused
    before = held_out_flow_loss(teacher.unet, teacher.unet, dataset)
    student = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet").eval()
    after = held_out_flow_loss(student, teacher.unet, dataset)
    print(f"held-out flow loss: teacher copy {before:.4f} -> after 40 steps {after:.4f}")
    assert after < 0.6 * before
