"""Training data: real latents x0 with their prompts' text embeddings, cached (DESIGN.md section 3).

Every training state is built by noising real latents x0, never from noise labelled with a random t.
The x0 come from exactly one source, all through ``datasets``:

- ``images``: an image-caption dataset (``dataset_name``: a Hub id or a local folder that
  ``load_dataset`` reads; or ``train_data_dir`` in the ``imagefolder`` layout with ``metadata.jsonl``),
  resized so the shorter side is ``resolution``, cropped (centre or seeded random), optionally
  flipped, and encoded once by the VAE in float32 as ``latent_dist.mode() * scaling_factor``;
- ``latents``: a dataset that already holds scaled latents (4, h, w) and prompts (``latents_dataset``);
- ``prompts``: latents the teacher generates from the lines of ``prompts_file``;
- ``synthetic`` (the default when no source is given): the same from built-in synthetic prompts.

Choices that the cache forces, documented here once:

- ``mode()`` not ``sample()``: the posterior mean is deterministic and independent of batching, so a
  cache is reproducible and checkable; SD1.5's posterior std is ~1e-2 of the latent scale, so sampling
  would add almost nothing a cached copy could carry across epochs anyway.
- Flip and random crop are decided at encode time, once per image, by a random stream seeded with
  ``(seed, row)``: each image contributes one fixed view to the cache (recorded in ``transforms.json``).
  Changing ``seed`` gives other views (and another cache).
- A caption cell holding a list of captions contributes one of them, chosen the same way.
- Teacher generation runs ``FlowLunePipeline.from_teacher`` on DDIM's timesteps as flow sigmas (Euler steps
  on the bridge's ``v*``, CFG on velocities), which *is* DDIM (eta 0) ending at sigma = 0; each sample's
  starting noise comes from its own generator seeded by
  ``(seed, row)``, so the result does not depend on the batch size.

Text embeddings are the text encoder's last hidden state over 77 tokens padded to "max_length"
(what ``StableDiffusionPipeline.encode_prompt`` feeds the UNet), cached once per distinct prompt,
plus the empty prompt's embedding for ``--uncond_prob`` dropout.

Caches live under ``cache_dir``: ``latents-<source>-<hash>`` and ``embeds-<hash>``, keyed by everything that
changes their content. This module holds the config, the dataset and the entry point; the parts are
``sources.py`` (resolving a source), ``encoding.py`` (model work), ``data_caches.py`` (cache keys and builds),
``caching.py`` (cache folders) and ``seeds.py`` (the per-row random streams).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .caching import CacheEntry, ShardedRows, cache_folder, open_cache
from .data_caches import build_embeds, build_latents, embeds_key, latents_key
from .data_config import SOURCES, DataConfig
from .sources import resolve_source

if TYPE_CHECKING:
    from .models import TeacherComponents

logger = logging.getLogger(__name__)


class LatentPromptDataset(torch.utils.data.Dataset):
    """Map-style, fixed order: row ``i`` is ``{"latents": (4, h, w), "prompt_embeds": (77, D), "index": i}``.

    ``latents`` are already multiplied by the VAE's scaling factor. ``empty_prompt_embeds`` (77, D) is
    the "" embedding for prompt dropout; ``prompts[i]`` is row i's prompt.
    """

    def __init__(self, latents_cache: CacheEntry, embeds_cache: CacheEntry, prompts: Sequence[str]):
        self.latents_cache = latents_cache
        self.embeds_cache = embeds_cache
        self.prompts = list(prompts)
        self._latents = ShardedRows("latents", latents_cache.shards("latents"))
        self._embeds = ShardedRows("prompt_embeds", embeds_cache.shards("prompt_embeds"))
        unique = embeds_cache.read_json("prompts.json")
        position = {p: k for k, p in enumerate(unique)}
        self.prompt_index = torch.tensor([position[p] for p in self.prompts], dtype=torch.long)
        self.empty_prompt_embeds = embeds_cache.load_tensor("empty_prompt_embeds")[0]

    def __len__(self) -> int:
        return len(self._latents)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} outside a dataset of {len(self)} rows")
        i = i % len(self)
        return {
            "latents": self._latents[i],
            "prompt_embeds": self._embeds[int(self.prompt_index[i])],
            "index": i,
        }


def _stack(rows: list[torch.Tensor]) -> torch.Tensor:
    # numpy's single-threaded copy: torch.stack splits MB-sized copies over intra-op threads, and on a busy
    # CPU waiting for the second thread cost 31 ms per SD1.5-sized batch against 0.13 ms (bench_data.py).
    if all(r.device.type == "cpu" and r.dtype == torch.float32 for r in rows):
        return torch.from_numpy(np.stack([r.numpy() for r in rows]))
    return torch.stack(rows)


def collate(batch: list[dict]) -> dict:
    """Stack rows: ``latents`` (B, 4, h, w), ``prompt_embeds`` (B, 77, D), ``index`` (B,) long."""
    return {
        "latents": _stack([row["latents"] for row in batch]),
        "prompt_embeds": _stack([row["prompt_embeds"] for row in batch]),
        "index": torch.tensor([row["index"] for row in batch], dtype=torch.long),
    }


def drop_prompts(
    prompt_embeds: torch.Tensor, empty_prompt_embeds: torch.Tensor, uncond_prob: float, generator: torch.Generator
) -> torch.Tensor:
    """Prompt dropout for CFG: each row's embedding becomes the empty prompt's with probability ``uncond_prob``.

    The mask ``rand(B) < uncond_prob`` is drawn on the CPU from ``generator``, so it does not depend on the device.
    """
    drop = torch.rand(prompt_embeds.shape[0], generator=generator) < uncond_prob
    drop = drop.to(prompt_embeds.device)[:, None, None]
    return torch.where(drop, empty_prompt_embeds.to(prompt_embeds), prompt_embeds)


def prepare_training_data(
    config: DataConfig, teacher: TeacherComponents, accelerator: Any = None
) -> LatentPromptDataset:
    """Build or reuse the caches of latents and text embeddings for ``config`` and return the dataset.

    Bad input raises on every process before any model work (see ``resolve_source``). The main process
    builds missing or unusable caches (progress bars there) while the others wait
    (``accelerator.main_process_first()``); then every process opens the same cache folders. A cache
    is reused only when its key (everything that changes its content) matches and every file checks out.
    ``accelerator=None`` means a single process.
    """
    source = resolve_source(config, latent_channels=int(teacher.unet.config.in_channels))
    is_main = accelerator is None or accelerator.is_main_process
    show = accelerator is None or accelerator.is_local_main_process
    first = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
    cache_dir = Path(config.cache_dir).expanduser()
    with first:
        unique = list(dict.fromkeys([*source.prompts]))
        e_key = embeds_key(unique, teacher, config)
        embeds_path = cache_folder(cache_dir, "embeds", e_key)
        embeds = open_cache(embeds_path, e_key)
        if embeds is None:
            _require_main(is_main, embeds_path)
            embeds = build_embeds(embeds_path, e_key, unique, teacher, config, show)
        l_key = latents_key(source, teacher, config, e_key)
        latents_path = cache_folder(cache_dir, f"latents-{source.kind}", l_key)
        latents = open_cache(latents_path, l_key)
        if latents is None:
            _require_main(is_main, latents_path)
            latents = build_latents(latents_path, l_key, source, teacher, embeds, config, show)
        else:
            logger.info("Reusing cached latents %s and embeddings %s.", latents_path, embeds_path)
    return LatentPromptDataset(latents, embeds, source.prompts)


def _require_main(is_main: bool, path: Path) -> None:
    if not is_main:
        raise RuntimeError(
            f"The cache {path} is missing or unusable after the main process built it. Every process must "
            "see the same --cache_dir: use a folder on a filesystem shared by all nodes."
        )


__all__ = [
    "SOURCES",
    "DataConfig",
    "LatentPromptDataset",
    "collate",
    "drop_prompts",
    "prepare_training_data",
]
