"""The shipped accelerate configs parse, load as accelerate configs, and reach accelerate's plugins, without a launch.

What `accelerate launch --config_file FILE` does before it starts processes is done here step by step:
load the file, validate the launch arguments against it, build the environment the processes would get,
and construct the FSDP / DeepSpeed plugin from that environment as `Accelerator` would. No GPU, no
process group and no deepspeed package are needed for that. Training under FSDP and DeepSpeed on CPU processes:
``test_distributed_cpu.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
EXPECTED = {
    "ddp.yaml": DistributedType.MULTI_GPU,
    "fsdp.yaml": DistributedType.FSDP,
    "deepspeed_zero2.yaml": DistributedType.DEEPSPEED,
}


def validated_launch_args(path: Path, *extra: str):
    """``accelerate launch --config_file path [extra] train_flow_distill.py``, parsed and validated, not launched."""
    argv = ["--config_file", str(path), *extra, "train_flow_distill.py", "--output_dir", "out"]
    return _validate_launch_command(launch_command_parser().parse_args(argv))


def test_the_shipped_configs_are_exactly_these():
    assert sorted(p.name for p in CONFIG_DIR.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_as_an_accelerate_config(name):
    path = CONFIG_DIR / name
    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict) and raw["distributed_type"] == EXPECTED[name].value
    config = load_config_from_file(str(path))  # unknown top-level keys raise here
    assert isinstance(config, ClusterConfig) and config.distributed_type == EXPECTED[name]
    assert config.num_processes >= 2 and config.num_machines == 1 and config.mixed_precision == "bf16"
    assert not config.use_cpu
    args, defaults, _ = validated_launch_args(path)
    assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed) == (
        EXPECTED[name] == DistributedType.MULTI_GPU,
        EXPECTED[name] == DistributedType.FSDP,
        EXPECTED[name] == DistributedType.DEEPSPEED,
    )
    assert args.num_processes == config.num_processes and args.mixed_precision == "bf16"
    # --num_processes on the command line wins over the file, as the README says.
    args, _, _ = validated_launch_args(path, "--num_processes", "8")
    assert args.num_processes == 8


def test_fsdp_config_builds_the_plugin_accelerate_would():
    args, _, _ = validated_launch_args(CONFIG_DIR / "fsdp.yaml")
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert plugin.transformer_cls_names_to_wrap == ["BasicTransformerBlock", "ResnetBlock2D"]
    # The classes it wraps are the UNet's own.
    import diffusers.models.attention as attention
    import diffusers.models.resnet as resnet

    assert hasattr(attention, "BasicTransformerBlock") and hasattr(resnet, "ResnetBlock2D")


def test_deepspeed_config_builds_the_plugin_accelerate_would():
    args, defaults, mixed_from_config = validated_launch_args(CONFIG_DIR / "deepspeed_zero2.yaml")
    # What `accelerate launch` adds before handing over to the DeepSpeed launcher.
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    _, env = prepare_deepspeed_cmd_env(args)
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "2"
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()
    zero = plugin.deepspeed_config["zero_optimization"]
    assert plugin.zero_stage == 2 and zero["stage"] == 2
    assert zero["offload_optimizer"]["device"] == "none" and zero["offload_param"]["device"] == "none"
    # The trainer's defaults: --gradient_accumulation_steps 1, --max_grad_norm 1.0.
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == 1
    assert plugin.deepspeed_config["gradient_clipping"] == 1.0
