"""The trainer under accelerate's FSDP2 and DeepSpeed ZeRO-2 code on two CPU processes (gloo): KD block hooks, EMA,
checkpoints, exact resume, export.

accelerate 1.15 sets up neither on a machine without a GPU, so each worker corrects accelerate's state once the
trainer's Accelerator exists; from there accelerate's own code runs (``prepare``, ``save_state``/``load_state``,
``get_state_dict``):

- FSDP: ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` gives each process
  ``DistributedType.NO`` (no GPU), and ``--cpu``/``ACCELERATE_USE_CPU=1`` gives ``MULTI_CPU`` with the FSDP plugin
  dropped (``AcceleratorState.__init__`` takes its FSDP branch only for GPU-like types). The worker starts as
  ``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2`` and switches the state to FSDP with the plugin built from the
  shipped ``fsdp.yaml`` (mixed precision "no"). ``fully_shard`` then shards the ResNet and attention blocks.
- DeepSpeed (needs ``pip install deepspeed``; skipped without it): ``accelerate launch --config_file
  configs/accelerate/deepspeed_zero2.yaml`` runs as shipped (bf16, DeepSpeed's CPU accelerator over gloo), but
  accelerate finds no device backend and sets ``num_processes`` 1 and ``process_index`` 0 on both processes; the
  worker sets them from ``torch.distributed``.

What differs from a GPU run: NCCL, CUDA and, for FSDP, bf16 and the launcher. Each worker runs the trainer twice in
one launch: 4 steps with checkpoints at 2 and 4, then a resume from a copy of checkpoint-2 in a second folder (the
process group is kept between the two; everything else is built again and loaded from disk).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file

from flow_lune.training.block_features import BLOCK_NAMES

UNET_FILE = "diffusion_pytorch_model.safetensors"
CONFIGS = REPO / "configs" / "accelerate"

WORKER = textwrap.dedent(
    """
    import importlib.util, os, shutil, sys
    from pathlib import Path
    from unittest import mock

    import torch

    import flow_lune.training.cli as cli

    REPO = Path({repo!r})
    spec = importlib.util.spec_from_file_location("train_flow_distill", REPO / "train_flow_distill.py")
    t = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(t)
    start_run = t.start_run
    {fix}

    def start_run_fixed(args, gradient_accumulation_steps=1):
        accelerator = start_run(args, gradient_accumulation_steps)
        fix(accelerator)
        return accelerator


    t.start_run = start_run_fixed
    straight, resumed, *flags = sys.argv[1:]
    torch.set_num_threads(1)
    from accelerate import Accelerator

    end_training = Accelerator.end_training
    Accelerator.end_training = lambda self: None  # keep the process group for the second run
    t.main(t.parse_args(["--output_dir", straight, *flags]))
    if int(os.environ["RANK"]) == 0:
        shutil.copytree(Path(straight) / "checkpoint-2", Path(resumed) / "checkpoint-2")
    torch.distributed.barrier()
    Accelerator.end_training = end_training
    t.main(t.parse_args(["--output_dir", resumed, *flags, "--resume_from_checkpoint", "latest"]))
    """
)

FSDP_FIX = """
def fix(accelerator):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    argv = ["--config_file", str(REPO / "configs/accelerate/fsdp.yaml"), "--mixed_precision", "no", "x.py"]
    launch_args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    env = {k: v for k, v in prepare_multi_gpu_env(launch_args).items() if k.startswith("FSDP_")}
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState.__init__ ends
    assert accelerator.is_fsdp2
"""

DEEPSPEED_FIX = """
cli.check_process_count = lambda accelerator, launched: None  # accelerate's count is wrong here; fixed below


def fix(accelerator):
    from accelerate.state import AcceleratorState, PartialState

    for shared in (PartialState._shared_state, AcceleratorState._shared_state):
        shared["num_processes"] = torch.distributed.get_world_size()
        shared["process_index"] = torch.distributed.get_rank()
        shared["local_process_index"] = int(os.environ["LOCAL_RANK"])
    assert accelerator.distributed_type == "DEEPSPEED" and accelerator.mixed_precision == "bf16"
"""

FLAGS = [
    "--pretrained_teacher_model", "tiny", "--num_generated", "8", "--generation_steps", "2",
    "--train_batch_size", "2", "--report_to", "none", "--seed", "3", "--num_validation_inference_steps", "2",
    "--validation_prompts", "a red square", "--learning_rate", "1e-4", "--max_train_steps", "4",
    "--checkpointing_steps", "2", "--kd_weight", "0.1", "--use_ema", "--no_single_file",
]  # fmt: skip


def run_worker(tmp_path: Path, cache: Path, fix: str, launcher: list[str], **env: str) -> tuple[Path, Path]:
    """Launch the worker with ``fix`` (and ``env``); the straight and the resumed output folders."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(repo=str(REPO), fix=fix.strip()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}
    cmd = [*launcher, str(script), str(straight), str(resumed), "--cache_dir", str(cache), *FLAGS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return straight, resumed


def records(folder: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())}


def check_runs(straight: Path, resumed: Path, cache: Path, saved_by_accelerate: dict[str, torch.Tensor]) -> None:
    """What both strategies must give: finite non-zero KD terms, a trained float32 student in ``unet/`` equal to the
    one accelerate saved, an EMA that is an average, a bit-identical resume, an export that loads."""
    from diffusers import UNet2DConditionModel

    from flow_lune.pipelines import FlowLunePipeline

    logged = records(straight)
    assert sorted(logged) == [1, 2, 3, 4]
    for record in logged.values():
        assert list(record["kd"]) == list(BLOCK_NAMES)
        assert all(math.isfinite(v) and v > 0 for v in record["kd"].values()), record["kd"]
        assert math.isfinite(record["loss"]) and record["skipped_steps"] == 0

    ckpt = straight / "checkpoint-4"
    student = load_file(str(ckpt / "unet" / UNET_FILE))
    ema = load_file(str(ckpt / "unet_ema" / UNET_FILE))
    assert student.keys() == saved_by_accelerate.keys() == ema.keys()
    assert all(v.dtype == torch.float32 for v in (*student.values(), *ema.values()))
    assert all(torch.equal(student[k], saved_by_accelerate[k]) for k in student)
    assert any(not torch.equal(student[k], ema[k]) for k in student)
    start = load_file(str(cache / "tiny-sd15-teacher" / "unet" / UNET_FILE))
    assert any(not torch.equal(student[k], start[k]) for k in student)  # trained

    again = records(resumed)
    assert sorted(again) == [3, 4] and all(again[s]["loss"] == logged[s]["loss"] for s in (3, 4))
    for sub, reference in (("unet", student), ("unet_ema", ema)):
        resumed_weights = load_file(str(resumed / "checkpoint-4" / sub / UNET_FILE))
        assert [k for k in reference if not torch.equal(reference[k], resumed_weights[k])] == [], sub

    for out in (straight, resumed):  # the export holds the EMA weights (--use_ema)
        exported = load_file(str(out / "pipeline" / "unet" / UNET_FILE))
        assert all(torch.equal(exported[k], ema[k]) for k in ema)
    pipe = FlowLunePipeline.from_pretrained(straight / "pipeline")
    assert isinstance(pipe.unet, UNet2DConditionModel) and pipe.unet.dtype == torch.float32
    assert (straight / "validation" / "step-4.png").is_file() and (straight / "run-complete.json").is_file()


def test_fsdp_run_with_kd_and_ema_checkpoints_resumes_exactly_and_exports(tmp_path, trainer_cache):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    straight, resumed = run_worker(tmp_path, trainer_cache, FSDP_FIX, launcher, ACCELERATE_USE_CPU="1")
    ckpt = straight / "checkpoint-4"
    assert (ckpt / "optimizer.bin").is_file()
    check_runs(straight, resumed, trainer_cache, torch.load(ckpt / "pytorch_model_fsdp.bin", weights_only=True))


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_zero2_bf16_run_saves_float32_weights_resumes_exactly_and_exports(tmp_path, trainer_cache):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS / "deepspeed_zero2.yaml"),
    ]
    straight, resumed = run_worker(tmp_path, trainer_cache, DEEPSPEED_FIX, launcher)
    ckpt = straight / "checkpoint-4"
    optimizer_parts = sorted(p.name for p in (ckpt / "pytorch_model").glob("*optim_states.pt"))
    assert len(optimizer_parts) == 2  # ZeRO-2: the optimizer state split over the two processes
    # unet/ holds DeepSpeed's float32 weights (as its zero_to_fp32 rebuilds them), not the module's bf16 copies.
    float32 = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="pytorch_model")
    check_runs(straight, resumed, trainer_cache, {k: v.float() for k, v in float32.items()})


def test_a_launch_whose_processes_accelerate_does_not_join_stops_with_one_line():
    """Without a GPU, ``accelerate launch`` with a GPU config starts N processes that accelerate sets up alone
    (``DistributedType.NO``): each would train into the same folder. The trainer stops instead."""
    from types import SimpleNamespace

    from flow_lune.training.cli import check_process_count

    alone = SimpleNamespace(num_processes=1, distributed_type="DistributedType.NO")
    with pytest.raises(
        ValueError, match=r"2 processes were launched \(WORLD_SIZE=2\) but accelerate set up 1 .*torchrun"
    ):
        check_process_count(alone, 2)
    check_process_count(alone, 1)  # one process: nothing to join
    check_process_count(SimpleNamespace(num_processes=2, distributed_type="DistributedType.MULTI_CPU"), 2)
