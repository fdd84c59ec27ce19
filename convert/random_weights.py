"""Random full-size SD1.5 weights from the built-in configs, for tests and the benchmark.

Every tensor is a different window of one random pool (a distinct start offset per tensor, so no
two tensors are equal and a key swap cannot go unnoticed), written straight into the state
dict: no model is built and only the pool is drawn, which keeps a 1.07B-parameter pipeline to
the time it takes to write it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .architecture import TEXT_MODEL_PREFIX, expected_shapes, text_keys_carry_text_model
from .configs import builtin_config, flow_model_index, flow_scheduler_config

WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}


POOL_SIZE = 1 << 26  # 64M values: larger than SD1.5's largest tensor (token embedding, 37.9M)
OFFSET_STEP = 1_000_003  # a prime: tensor i starts at i * step (mod pool), so starts never coincide


def random_state_dict(component: str, config: dict, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Distinct N(0, 0.02^2) tensors for every key ``config`` implies (diffusers layout)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = expected_shapes(component, config)
    n_max = max(math.prod(s) for s in shapes.values())
    pool = (torch.randn(max(POOL_SIZE, n_max) * 2, generator=generator) * 0.02).to(dtype)
    half = pool.numel() // 2
    prefix = TEXT_MODEL_PREFIX if component == "text_encoder" and text_keys_carry_text_model(config) else ""
    out = {}
    for i, (key, shape) in enumerate(shapes.items()):
        start = (i * OFFSET_STEP) % half
        out[prefix + key] = pool[start : start + math.prod(shape)].clone().reshape(shape)
    return out


def write_random_pipeline(
    folder: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    components: tuple[str, ...] = ("unet", "vae", "text_encoder"),
    tokenizer_folder: str | os.PathLike | None = None,
    shift: float = 3.0,  # the student's default training shift (DESIGN.md section 1)
) -> Path:
    """Write a FlowLunePipeline folder of random full-size SD1.5 components (configs from ``configs/sd15``).

    The random weights stand in for a trained student, so the folder has the student's scheduler
    (``FlowLuneScheduler(shift)``) and model index, as ``FlowLunePipeline.save_pretrained`` writes them.
    """
    folder = Path(folder)
    for i, name in enumerate(components):
        config = builtin_config(name)
        part = folder / name
        part.mkdir(parents=True, exist_ok=True)
        (part / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        state = random_state_dict(name, config, dtype, seed + i)
        save_file(state, str(part / WEIGHT_FILES[name]), metadata={"format": "pt"})
        del state
    scheduler = folder / "scheduler"
    scheduler.mkdir(exist_ok=True)
    (scheduler / "scheduler_config.json").write_text(json.dumps(flow_scheduler_config(shift), indent=2) + "\n")
    if tokenizer_folder is not None:
        import shutil

        shutil.copytree(tokenizer_folder, folder / "tokenizer", dirs_exist_ok=True)
    index = flow_model_index(tokenizer=tokenizer_folder is not None)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return folder
