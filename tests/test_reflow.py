"""Reflow: the target, the pair sets (reproducible, resumable, split by process), training on them, straightness.

Pairs come from the embedded tiny teacher through ``generate_reflow_pairs.py``'s ``main`` in this process; trainer
runs call ``train_flow_distill.main`` in-process too, except the SIGKILL run (the pattern of test_trainer.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, load_script
from safetensors import safe_open
from safetensors.torch import load_file

from flow_lune.flow import flow_state, flow_timestep, reflow_target
from flow_lune.training import reflow_pairs
from flow_lune.training.block_features import BLOCK_NAMES
from flow_lune.training.checkpoints import list_checkpoints
from flow_lune.training.objective import ObjectiveConfig, reflow_loss
from flow_lune.training.reflow_pairs import (
    ReflowPairs,
    load_pairs_dataset,
    pair_noise,
    row_prompts,
    shards_for_process,
)

generate = load_script("generate_reflow_pairs.py")
train = load_script("train_flow_distill.py")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """The tiny teacher (built once under it) that both the pairs and the trainer load."""
    return tmp_path_factory.mktemp("reflow-cache")


def pair_args(output_dir: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [
        "--output_dir", str(output_dir), "--cache_dir", str(cache_dir), "--num_pairs", "8", "--steps", "3",
        "--shard_size", "3", "--batch_size", "2", "--guidance", "3", "--seed", "1",
        "--threads", "1",  # bytes are reproducible for the same thread count (float sums are split by threads)
        *extra,
    ]  # fmt: skip


def make_pairs(output_dir: Path, cache_dir: Path, *extra: str) -> Path:
    threads = torch.get_num_threads()
    try:
        generate.main(generate.parse_args(pair_args(output_dir, cache_dir, *extra)))
    finally:
        torch.set_num_threads(threads)
    return output_dir


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, cache_dir) -> Path:
    return make_pairs(tmp_path_factory.mktemp("pairs") / "set", cache_dir)


# ---------------------------------------------------------------- the target


@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (3, 1, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reflow_target_is_the_derivative_of_the_straight_line(shape, dtype):
    g = torch.Generator().manual_seed(0)
    x0, z = torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)
    sigma, h = 0.37, 1e-3
    # Independent: the line's slope in sigma from two points on it, written out element by element.
    a = (1 - sigma) * x0 + sigma * z
    b = (1 - (sigma + h)) * x0 + (sigma + h) * z
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    torch.testing.assert_close(reflow_target(x0, z), (b - a) / h, atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="same shape"):
        reflow_target(x0, z[:1])


class RecordingStudent(torch.nn.Module):
    """Returns a fixed velocity and records what the loss fed it."""

    def __init__(self, v):
        super().__init__()
        self.v = torch.nn.Parameter(v.clone())

    def forward(self, x, t, encoder_hidden_states, return_dict=False):
        self.seen = (x.detach().clone(), t.detach().clone())
        return (self.v * 1.0,)


class NoFeatures:
    features: list = []

    def clear(self):
        pass


class RefusingTeacher:
    def velocity(self, *args, **kwargs):
        raise AssertionError("the teacher must not run when the KD weights are 0")


def test_reflow_loss_is_the_mse_to_the_straight_line_and_skips_the_teacher():
    g = torch.Generator().manual_seed(1)
    x0_hat, z, v = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(3))
    sigma = torch.tensor([0.1, 0.5, 0.9])
    student = RecordingStudent(v)
    config = ObjectiveConfig(kd_weight=0.0, block_penalty_weight=0.0)
    out = reflow_loss(student, RefusingTeacher(), NoFeatures(), NoFeatures(), x0_hat, z, sigma, None, None, config)
    x_seen, t_seen = student.seen
    for i, s in enumerate(sigma.tolist()):  # element by element, not through flow_state
        torch.testing.assert_close(x_seen[i], (1 - s) * x0_hat[i] + s * z[i])
    torch.testing.assert_close(t_seen, sigma * 1000)
    expected = ((v - (z - x0_hat)) ** 2).mean()
    torch.testing.assert_close(out.loss, expected)
    assert out.loss is out.flow_loss and torch.equal(out.kd, torch.zeros(len(BLOCK_NAMES)))
    out.loss.backward()
    assert student.v.grad is not None and student.v.grad.abs().sum() > 0


def test_reflow_loss_with_kd_queries_the_teacher(tiny_components):
    from flow_lune.flow import EpsilonToFlowUNet
    from flow_lune.training.block_features import BlockFeatureHooks
    from flow_lune.training.block_penalty import build_block_penalty
    from flow_lune.training.fusion import FusionConfig

    comp = tiny_components
    import copy

    student = copy.deepcopy(comp.unet)
    torch.nn.init.normal_(student.conv_in.weight, std=0.1)  # not a copy of the teacher: KD > 0
    teacher = EpsilonToFlowUNet(comp.unet, comp.scheduler.config)
    config = ObjectiveConfig(kd_weight=0.25, block_penalty_weight=0.0)
    penalty = build_block_penalty("none", config.base_weights, FusionConfig(), "cpu")
    g = torch.Generator().manual_seed(2)
    x0_hat, z = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    embeds = torch.randn(2, 77, comp.text_encoder.config.hidden_size, generator=g)
    sigma = torch.tensor([0.3, 0.8])
    with BlockFeatureHooks(student) as sh, BlockFeatureHooks(comp.unet) as th:
        out = reflow_loss(student, teacher, sh, th, x0_hat, z, sigma, embeds, penalty, config)
    assert (out.kd > 0).all() and out.loss > out.flow_loss
    v_pred = student(flow_state(x0_hat, z, sigma), flow_timestep(sigma), embeds).sample
    torch.testing.assert_close(out.flow_loss, ((v_pred - (z - x0_hat)) ** 2).mean(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- pairs


def test_split_across_processes_is_disjoint_and_complete():
    for count in (0, 1, 5, 8):
        for n in (1, 2, 3):
            parts = [shards_for_process(count, p, n) for p in range(n)]
            assert sorted(k for part in parts for k in part) == list(range(count))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ValueError, match="process_index"):
        shards_for_process(4, 2, 2)


def test_pair_noise_is_per_row():
    a = pair_noise(range(0, 4), (4, 2, 2), seed=1)
    b = torch.cat([pair_noise([r], (4, 2, 2), seed=1) for r in (0, 1, 2, 3)])
    assert torch.equal(a, b) and not torch.equal(a, pair_noise(range(4), (4, 2, 2), seed=2))


def test_pair_set_holds_the_pipelines_ode_end(pairs, cache_dir):
    """Row by row: z from its seed, x0 = the FlowLunePipeline's end from latents=z, embeddings of its prompt."""
    from flow_lune.pipelines import FlowLunePipeline
    from flow_lune.training.models import default_teacher_dir, load_teacher

    index = json.loads((pairs / "index.json").read_text())
    assert index["num_rows"] == 8 and [s["rows"] for s in index["shards"]] == [3, 3, 2]
    data = ReflowPairs(pairs)
    assert len(data) == 8 and data.config["guidance"] == 3.0 and data.config["model_kind"] == "teacher"
    rows = [2, 7]
    teacher = load_teacher(str(default_teacher_dir(cache_dir)))
    pipe = FlowLunePipeline.from_teacher(teacher, shift=3.0)
    pipe.set_progress_bar_config(disable=True)
    prompts = generate.read_prompts(generate.parse_args(pair_args(pairs, cache_dir)), 8)
    texts = row_prompts(prompts, rows)
    z = pair_noise(rows, (4, 8, 8), seed=1)
    x0 = pipe(texts, latents=z, num_inference_steps=3, guidance_scale=3.0, output_type="latent").images
    scale = x0.abs().max().item()  # the random tiny teacher's x0 reach ~100: float32 rounding scales with them
    for j, r in enumerate(rows):
        assert torch.equal(data[r]["noise"], z[j])
        torch.testing.assert_close(data[r]["latents"], x0[j], rtol=0, atol=1e-4 * scale)  # batched differently
    ds = load_pairs_dataset(pairs).with_format("torch")
    assert ds.column_names == ["z", "x0", "prompt_embeds", "prompt"] and len(ds) == 8
    assert ds["prompt"] == row_prompts(prompts, range(8))
    for r in range(8):
        assert torch.equal(ds[r]["x0"], data[r]["latents"]) and torch.equal(
            ds[r]["prompt_embeds"], data[r]["prompt_embeds"]
        )


def test_pairs_are_reproducible_and_resume_byte_identical(pairs, cache_dir, tmp_path, monkeypatch):
    killed = tmp_path / "killed"
    original = reflow_pairs.write_shard

    def die_after_first(folder, shard, *args, **kwargs):
        if shard > 0:
            raise KeyboardInterrupt("killed")
        return original(folder, shard, *args, **kwargs)

    monkeypatch.setattr(reflow_pairs, "write_shard", die_after_first)
    with pytest.raises(KeyboardInterrupt):
        make_pairs(killed, cache_dir)
    assert sorted(p.name for p in killed.glob("shard-*")) == ["shard-00000.safetensors"]
    assert not (killed / "index.json").exists() and not list(killed.glob(".*partial*"))
    with pytest.raises(ValueError, match="not a finished"):
        ReflowPairs(killed)

    written = []

    def counting(folder, shard, *args, **kwargs):
        written.append(shard)
        return original(folder, shard, *args, **kwargs)

    monkeypatch.setattr(reflow_pairs, "write_shard", counting)
    make_pairs(killed, cache_dir)
    assert written == [1, 2]  # the finished shard was kept
    for name in ("shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors", "index.json"):
        assert (killed / name).read_bytes() == (pairs / name).read_bytes(), name
    # Other settings in the same folder are refused; another seed gives other noise.
    with pytest.raises(ValueError, match="other settings"):
        make_pairs(killed, cache_dir, "--guidance", "2")
    other = make_pairs(tmp_path / "seed2", cache_dir, "--seed", "2", "--num_pairs", "3")
    with (
        safe_open(str(other / "shard-00000.safetensors"), "pt") as f,
        safe_open(str(pairs / "shard-00000.safetensors"), "pt") as g,
    ):
        assert not torch.equal(f.get_tensor("z"), g.get_tensor("z"))


# ---------------------------------------------------------------- training


def train_args(output_dir: Path, cache_dir: Path, pairs: Path, *extra: str) -> list[str]:
    return [
        "--output_dir", str(output_dir), "--cache_dir", str(cache_dir), "--pretrained_teacher_model", "tiny",
        "--objective", "reflow",
        "--reflow_data", str(pairs), "--train_batch_size", "2", "--report_to", "none",
        "--num_validation_inference_steps", "2", "--validation_prompts", "a red square", "--learning_rate", "1e-4",
        "--seed", "3", *extra,
    ]  # fmt: skip


def test_objective_defaults_and_bad_flags(tmp_path, cache_dir, pairs, capsys):
    args = train.parse_args(train_args(tmp_path / "a", cache_dir, pairs))
    assert (args.kd_weight, args.block_penalty_weight, args.uncond_prob) == (0.0, 0.0, 0.0)  # guided pairs
    args = train.parse_args(train_args(tmp_path / "a", cache_dir, pairs, "--kd_weight", "0.1", "--uncond_prob", "0.2"))
    assert (args.kd_weight, args.uncond_prob) == (0.1, 0.2)
    args = train.parse_args(["--output_dir", str(tmp_path / "b"), "--cache_dir", str(cache_dir)])
    assert (args.objective, args.kd_weight, args.block_penalty_weight, args.uncond_prob) == ("distill", 0.25, 0.05, 0.1)
    with pytest.raises(SystemExit) as exit_info:  # parser.error: one line, exit 2
        train.parse_args(["--output_dir", str(tmp_path / "c"), "--objective", "reflow"])
    assert exit_info.value.code == 2 and "needs --reflow_data" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # parser.error: one line, exit 2
        train.parse_args(train_args(tmp_path / "d", cache_dir, tmp_path))
    assert exit_info.value.code == 2 and "not a finished reflow pair set" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # parser.error: one line, exit 2
        train.parse_args(["--output_dir", str(tmp_path / "e"), "--reflow_data", str(pairs)])
    assert exit_info.value.code == 2 and "for --objective reflow" in capsys.readouterr().err


def test_reflow_run_writes_the_usual_outputs(tmp_path, cache_dir, pairs):
    out = tmp_path / "out"
    pipeline_dir = train.main(train.parse_args(train_args(
        out, cache_dir, pairs, "--max_train_steps", "3", "--checkpointing_steps", "2", "--validation_steps", "2",
        "--use_ema", "--ema_decay", "0.5",
    )))  # fmt: skip
    from flow_lune.pipelines import FlowLunePipeline

    FlowLunePipeline.from_pretrained(pipeline_dir)
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2"]
    assert (out / "checkpoint-2" / "unet_ema").is_dir()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["loss"] == r["flow_loss"] > 0 and not any(r["kd"].values()) for r in records)
    assert (out / "validation" / "step-2.png").is_file() and (out / "validation" / "step-3.png").is_file()
    # Guided pairs: the workflow and the file's header recommend cfg 1 and few steps.
    workflow = json.loads((out / "flow_lune.workflow.json").read_text())
    sampler = next(n["inputs"] for n in workflow.values() if n["class_type"] == "KSampler")
    assert (sampler["cfg"], sampler["steps"]) == (1.0, 4)
    with safe_open(str(out / "flow_lune.safetensors"), "pt") as f:
        meta = f.metadata()
    assert float(meta["flow_lune.cfg"]) == 1.0 and meta["flow_lune.steps"] == "4"
    assert "reflow_pair_guidance" in (pipeline_dir / "README.md").read_text()
    # The exported student makes pairs too (a FlowLunePipeline folder, its own shift).
    student_pairs = make_pairs(tmp_path / "student-pairs", cache_dir, "--model", str(pipeline_dir), "--num_pairs", "2")
    config = ReflowPairs(student_pairs).config
    assert (config["model_kind"], config["shift"], len(ReflowPairs(student_pairs))) == ("student", 3.0, 2)


def test_reflow_resume_after_sigkill_is_bit_identical(tmp_path, cache_dir, pairs):
    from test_trainer import KILLER

    extra = ("--max_train_steps", "6", "--checkpointing_steps", "2", "--uncond_prob", "0.5", "--use_ema",
             "--ema_decay", "0.9", "--lr_scheduler", "cosine", "--no_single_file")  # fmt: skip
    straight = tmp_path / "straight"
    train.main(train.parse_args(train_args(straight, cache_dir, pairs, *extra)))
    killed = tmp_path / "killed"
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(script=str(REPO / "train_flow_distill.py"), kill_step=4))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), *train_args(killed, cache_dir, pairs, *extra)], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert [p.name for p in list_checkpoints(killed)] == ["checkpoint-2"]
    train.main(train.parse_args(train_args(killed, cache_dir, pairs, *extra, "--resume_from_checkpoint", "latest")))
    a = load_file(str(straight / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(killed / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = []
    for folder in (straight, killed):  # the killed run's log holds steps 3-4 twice: the resumed records come last
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        losses.append({r["step"]: r["loss"] for r in records})
    assert losses[0] == losses[1] and sorted(losses[0]) == [1, 2, 3, 4, 5, 6]
