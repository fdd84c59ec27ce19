"""Sampling runners: one interface over a Flow Lune student (Euler), an epsilon SD1.5 teacher with DDIM,
and the same teacher through the flow bridge (``FlowLunePipeline.from_teacher``, Euler).

Every runner starts image ``i`` from the same unit Gaussian ``z_i`` (``fixed_noise``), so teacher and
student images can be compared pixel by pixel. The flow runners start at sigma = 1 with ``x = z``;
DDIM starts at its first timestep with ``x_t = z``, SD1.5's usual practice.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SAMPLERS = ("euler", "ddim", "bridge")


def fixed_noise(count: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """``z_i`` for i < count from a CPU generator seeded by ``(seed, i)``: independent of batching."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1_000_003 + i)) for i in range(count)]
    )


def ddim_scheduler(scheduler_config: Any):
    """DDIM over the teacher's betas, eta 0, no clipping, final alpha 1: the schedule the flow bridge reproduces."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(dict(scheduler_config), set_alpha_to_one=True, clip_sample=False)


def _read_model_index(folder: Path) -> dict:
    index = folder / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{folder} has no model_index.json: pass a diffusers pipeline folder or a .safetensors file.")
    return json.loads(index.read_text(encoding="utf-8"))


def load_pipeline(path: str | os.PathLike, config: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32):
    """A pipeline folder (``FlowLunePipeline`` or ``StableDiffusionPipeline``) or a Flow Lune single file.

    A single file needs ``config``, a local pipeline folder with the model's configs;
    ``FlowLunePipeline.from_single_file`` checks it and takes the shift from its header (``flow_lune.shift``).
    """
    from diffusers import StableDiffusionPipeline

    from flow_lune import FlowLunePipeline

    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: a single file must be .safetensors (as flow-lune-convert writes).")
        if config is None:
            raise ValueError(f"{path} is a single file: pass --config, a local pipeline folder holding its configs.")
        pipe = FlowLunePipeline.from_single_file(str(path), config=str(config), local_files_only=True)
    elif path.is_dir():
        name = _read_model_index(path).get("_class_name")
        if name == "FlowLunePipeline":
            pipe = FlowLunePipeline.from_pretrained(str(path), local_files_only=True)
        elif name == "StableDiffusionPipeline":
            pipe = StableDiffusionPipeline.from_pretrained(
                str(path), local_files_only=True, safety_checker=None, requires_safety_checker=False
            )
        else:
            raise ValueError(
                f"{path}: model_index.json names {name!r}; expected FlowLunePipeline or StableDiffusionPipeline."
            )
    else:
        raise ValueError(f"{path}: no such file or folder.")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dtype=dtype)


def is_flow_pipeline(pipe: Any) -> bool:
    from flow_lune import FlowLunePipeline

    return isinstance(pipe, FlowLunePipeline)


@dataclass
class Runner:
    """A named way of sampling: ``sample(prompts, noise, steps, guidance) -> images in [0, 1]``."""

    name: str  # e.g. "student", "teacher"
    sampler: str  # one of SAMPLERS
    pipe: Any

    @property
    def label(self) -> str:
        return f"{self.name} {self.sampler}"

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], noise: torch.Tensor, steps: int, guidance: float) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] for ``prompts`` from ``noise`` (B, 4, h, w)."""
        dtype = self.pipe.unet.dtype
        out = self.pipe(
            list(prompts),
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=noise.to(self.pipe.device, dtype),
            height=noise.shape[-2] * 8,
            width=noise.shape[-1] * 8,
            output_type="pt",
        )
        return out.images.float().clamp(0, 1).cpu()


def make_runner(name: str, pipe: Any, sampler: str, shift: float | None = None) -> Runner:
    """A runner of ``pipe`` with ``sampler``: ``euler`` for a flow pipeline; ``ddim``/``bridge`` for an SD1.5 one.

    ``shift`` is the sampling shift of the flow samplers: the bridge's (default 1.0) and, when given, the
    student's instead of the one in its scheduler config (a copy of the pipeline; ``pipe`` is not changed).
    """
    from flow_lune import FlowLunePipeline

    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is not one of {SAMPLERS}.")
    flow = is_flow_pipeline(pipe)
    if flow and sampler != "euler":
        raise ValueError(f"{name} is a FlowLunePipeline: sample it with 'euler', not {sampler!r}.")
    if not flow and sampler == "euler":
        raise ValueError(f"{name} is an epsilon SD1.5 pipeline: sample it with 'ddim' or 'bridge', not 'euler'.")
    if sampler == "ddim":
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline(**{**pipe.components, "scheduler": ddim_scheduler(pipe.scheduler.config)})
    elif sampler == "bridge":
        pipe = FlowLunePipeline.from_teacher(pipe, shift=1.0 if shift is None else shift)
    elif shift is not None and shift != pipe.scheduler.config.shift:
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, shift=shift)
        pipe = FlowLunePipeline(**{**pipe.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    return Runner(name=name, sampler=sampler, pipe=pipe)


def sample_all(
    runner: Runner,
    prompts: Sequence[str],
    noise: torch.Tensor,
    steps: int,
    guidance: float,
    batch_size: int,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, float]:
    """All images of one setting in batches, and the images per second of the sampling."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    images = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        images.append(runner.sample(prompts[i : i + batch_size], noise[i : i + batch_size], steps, guidance))
        if on_batch is not None:
            on_batch(len(images[-1]))
    elapsed = time.perf_counter() - start
    return torch.cat(images), len(prompts) / max(elapsed, 1e-9)
