"""The trainer under accelerate's FSDP2 code on two CPU processes: KD block hooks, sharded EMA, checkpoints, exact
resume, export.

accelerate 1.15 sets up FSDP only on a GPU: on CPU ``accelerate launch --config_file configs/accelerate/fsdp.yaml``
gives each process ``DistributedType.NO`` (or ``MULTI_CPU`` with ``--cpu``/``ACCELERATE_USE_CPU=1``, the FSDP
plugin dropped; ``AcceleratorState.__init__`` takes the FSDP branch only for GPU-like distributed types). So the
worker starts as ``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2`` (gloo) and, once the trainer's Accelerator
exists, switches accelerate's state to FSDP with the plugin built from the shipped ``fsdp.yaml`` (mixed precision
"no": CPU). From there accelerate's own FSDP2 code runs: ``fully_shard`` of the ResNet and attention blocks in
``prepare``, ``save_state``/``load_state`` (``pytorch_model_fsdp.bin``, the sharded optimizer),
``get_state_dict``. What differs from a GPU run: NCCL, CUDA, bf16 and the launcher.

One torchrun runs the trainer twice: 4 steps with checkpoints at 2 and 4, then a resume from a copy of checkpoint-2
in a second folder (the process group is kept between the two; everything else is built again and loaded from disk).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from conftest import REPO
from safetensors.torch import load_file

from flow_lune.training.block_features import BLOCK_NAMES

UNET_FILE = "diffusion_pytorch_model.safetensors"

WORKER = textwrap.dedent(
    """
    import importlib.util, os, shutil, sys
    from pathlib import Path
    from unittest import mock

    import torch

    REPO = Path({repo!r})
    spec = importlib.util.spec_from_file_location("train_flow_distill", REPO / "train_flow_distill.py")
    t = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(t)
    start_run = t.start_run


    def start_run_under_fsdp(args, gradient_accumulation_steps=1):
        from accelerate.commands.launch import _validate_launch_command, launch_command_parser
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
        from accelerate.utils.launch import prepare_multi_gpu_env

        accelerator = start_run(args, gradient_accumulation_steps)
        argv = ["--config_file", str(REPO / "configs/accelerate/fsdp.yaml"), "--mixed_precision", "no", "x.py"]
        launch_args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
        env = {{k: v for k, v in prepare_multi_gpu_env(launch_args).items() if k.startswith("FSDP_")}}
        with mock.patch.dict(os.environ, env):
            plugin = FullyShardedDataParallelPlugin()
        accelerator.state.fsdp_plugin = plugin
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState.__init__ ends
        assert accelerator.is_fsdp2
        return accelerator


    t.start_run = start_run_under_fsdp
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


def losses(folder: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())}


def test_fsdp_run_with_kd_and_ema_checkpoints_resumes_exactly_and_exports(tmp_path, trainer_cache):
    from diffusers import UNet2DConditionModel

    from flow_lune.pipelines import FlowLunePipeline

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    script = tmp_path / "fsdp_worker.py"
    script.write_text(WORKER.format(repo=str(REPO)))
    flags = [
        "--cache_dir", str(trainer_cache), "--pretrained_teacher_model", "tiny", "--num_generated", "8",
        "--generation_steps", "2", "--train_batch_size", "2", "--report_to", "none", "--seed", "3",
        "--num_validation_inference_steps", "2", "--validation_prompts", "a red square", "--learning_rate", "1e-4",
        "--max_train_steps", "4", "--checkpointing_steps", "2", "--kd_weight", "0.1", "--use_ema",
        "--no_single_file",
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run([*cmd, str(straight), str(resumed), *flags], env=env, capture_output=True, text=True,
                          timeout=900, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "Num processes: 2" in proc.stderr

    # The KD terms of the hooked blocks, logged at every step: finite and non-zero for all nine blocks.
    records = losses(straight)
    assert sorted(records) == [1, 2, 3, 4]
    for record in records.values():
        assert list(record["kd"]) == list(BLOCK_NAMES)
        assert all(math.isfinite(v) and v > 0 for v in record["kd"].values()), record["kd"]
        assert math.isfinite(record["loss"]) and record["skipped_steps"] == 0

    # Checkpoints: accelerate's FSDP files beside the student and its EMA in diffusers layout; the student written
    # from the gathered shards is the one accelerate saved, and the EMA is an average, not a copy.
    ckpt = straight / "checkpoint-4"
    assert (ckpt / "pytorch_model_fsdp.bin").is_file() and (ckpt / "optimizer.bin").is_file()
    student = load_file(str(ckpt / "unet" / UNET_FILE))
    ema = load_file(str(ckpt / "unet_ema" / UNET_FILE))
    fsdp_state = torch.load(ckpt / "pytorch_model_fsdp.bin", weights_only=True)
    assert student.keys() == fsdp_state.keys() == ema.keys()
    assert all(torch.equal(student[k], fsdp_state[k]) for k in student)
    assert any(not torch.equal(student[k], ema[k]) for k in student)
    start = load_file(str(trainer_cache / "tiny-sd15-teacher" / "unet" / UNET_FILE))
    assert any(not torch.equal(student[k], start[k]) for k in student)  # trained

    # Resumed from checkpoint-2: bit-identical student, EMA, export and losses.
    assert sorted(losses(resumed)) == [3, 4]
    assert all(losses(resumed)[s]["loss"] == records[s]["loss"] for s in (3, 4))
    for sub in ("unet", "unet_ema"):
        again = load_file(str(resumed / "checkpoint-4" / sub / UNET_FILE))
        reference = student if sub == "unet" else ema
        assert [k for k in reference if not torch.equal(reference[k], again[k])] == [], sub

    # The export: a FlowLunePipeline that loads, holding the EMA weights (--use_ema), unsharded.
    for out in (straight, resumed):
        exported = load_file(str(out / "pipeline" / "unet" / UNET_FILE))
        assert all(torch.equal(exported[k], ema[k]) for k in ema)
    pipe = FlowLunePipeline.from_pretrained(straight / "pipeline")
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert (straight / "validation" / "step-4.png").is_file() and (straight / "run-complete.json").is_file()
