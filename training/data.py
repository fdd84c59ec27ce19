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
- Teacher generation samples DDIM's timesteps as flow sigmas with the exact bridge
  (``FlowLuneScheduler`` Euler steps on ``v*``, CFG by ``guided_velocity``), which *is* DDIM (eta 0)
  ending at sigma = 0; each sample's starting noise comes from its own generator seeded by
  ``(seed, row)``, so the result does not depend on the batch size.

Text embeddings are the text encoder's last hidden state over 77 tokens padded to "max_length"
(what ``StableDiffusionPipeline.encode_prompt`` feeds the UNet), cached once per distinct prompt,
plus the empty prompt's embedding for ``--uncond_prob`` dropout.

Caches live under ``cache_dir`` (see ``caching.py``): ``latents-<source>-<hash>`` and
``embeds-<hash>``, keyed by everything that changes their content.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from .caching import CacheEntry, CacheWriter, cache_folder, folder_listing_digest, module_digest, open_cache
from .caching import tokenizer_digest as _tokenizer_digest

logger = logging.getLogger(__name__)

DATA_VERSION = 1  # in every cache key: bump when preprocessing or generation changes meaning
SOURCES = ("images", "latents", "prompts", "synthetic")


@dataclass
class DataConfig:
    """Where the training latents come from and how they are cached; one source at most."""

    dataset_name: str | None = None  # Hub id, or a local folder that datasets.load_dataset reads
    dataset_config_name: str | None = None  # the dataset's configuration, when it has several
    train_data_dir: str | None = None  # local imagefolder: images + metadata.jsonl with captions
    image_column: str = "image"  # imagefolder's name for the image column
    caption_column: str = "text"  # the name diffusers' text-to-image examples use
    resolution: int = 512  # SD1.5's training resolution; latents are resolution / 8
    center_crop: bool = False  # as diffusers' trainers: random crop (seeded) unless asked
    random_flip: bool = False  # as diffusers' trainers: no flip unless asked
    latents_dataset: str | None = None  # datasets-loadable, already holds scaled latents + prompts
    latents_column: str = "latents"  # (4, h, w) latents times the VAE's scaling factor
    prompt_column: str = "prompt"  # the prompt each latent was made from
    prompts_file: str | None = None  # one prompt per line -> teacher-generated latents
    num_generated: int = 64  # latents the teacher generates: enough variety for a short run
    generation_steps: int = 25  # DDIM steps: SD1.5's usual quality/speed trade-off
    generation_guidance: float = 7.5  # SD1.5's usual CFG scale
    max_train_samples: int | None = None  # keep the first N rows (debugging, quick runs)
    cache_dir: str = "~/.cache/flow_lune"  # content-keyed, so runs with the same data share it safely
    seed: int = 0  # crops, flips, caption choice, generation noise, synthetic prompts
    teacher_id: str = ""  # e.g. "<model id>@<revision>/<variant>": part of the cache keys
    data_batch_size: int = 8  # rows per VAE / teacher / text-encoder call while building caches

    @classmethod
    def from_args(cls, args: Any) -> DataConfig:
        """A config from an argparse namespace: every field the namespace has, defaults for the rest."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    @property
    def source(self) -> str:
        """Which x0 source this config selects (``SOURCES``); ``synthetic`` when none is given."""
        if self.dataset_name is not None or self.train_data_dir is not None:
            return "images"
        if self.latents_dataset is not None:
            return "latents"
        if self.prompts_file is not None:
            return "prompts"
        return "synthetic"

    def check(self) -> None:
        """Raise ``ValueError`` for contradictory or out-of-range settings (no file is read)."""
        given = {
            name: getattr(self, name)
            for name in ("dataset_name", "train_data_dir", "latents_dataset", "prompts_file")
            if getattr(self, name) is not None
        }
        if len(given) > 1:
            raise ValueError(
                f"Give one data source, got {len(given)}: "
                + ", ".join(f"--{k} {v!r}" for k, v in given.items())
                + ". Drop all but one (with none, the built-in synthetic prompts are used)."
            )
        if not isinstance(self.resolution, int) or self.resolution <= 0 or self.resolution % 8:
            raise ValueError(
                f"--resolution must be a positive multiple of 8 (the VAE downsamples by 8), got {self.resolution}."
            )
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"--max_train_samples must be >= 1 or unset, got {self.max_train_samples}.")
        if self.source in ("prompts", "synthetic"):
            if self.num_generated < 1:
                raise ValueError(f"--num_generated must be >= 1, got {self.num_generated}.")
            if self.generation_steps < 1:
                raise ValueError(f"--generation_steps must be >= 1, got {self.generation_steps}.")
        if self.data_batch_size < 1:
            raise ValueError(f"data_batch_size must be >= 1, got {self.data_batch_size}.")


@dataclass
class TeacherParts:
    """What data preparation needs from the teacher; all frozen, in eval mode."""

    vae: Any  # AutoencoderKL (float32 for encoding; a float32 copy is made otherwise)
    text_encoder: Any  # CLIPTextModel
    tokenizer: Any  # CLIPTokenizer
    unet: Any  # the epsilon-prediction UNet2DConditionModel
    scheduler_config: Mapping[str, Any]  # the teacher's own scheduler config (its DDPM betas)


class _ShardedRows:
    """Row ``i`` of a tensor stored across safetensors shards, read lazily through memory maps.

    File handles are opened on first use in each process and dropped when pickled, so the object
    can be sent to DataLoader workers under any start method.
    """

    def __init__(self, name: str, shards: Sequence[tuple[Path, int]]):
        self.name = name
        self.files = [str(path) for path, _ in shards]
        self.starts = np.cumsum([0] + [rows for _, rows in shards])
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> torch.Tensor:
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        if s not in self._handles:
            self._handles[s] = safe_open(self.files[s], framework="pt")
        j = i - int(self.starts[s])
        return self._handles[s].get_slice(self.name)[j : j + 1][0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}


class LatentPromptDataset(torch.utils.data.Dataset):
    """Map-style, fixed order: row ``i`` is ``{"latents": (4, h, w), "prompt_embeds": (77, D), "index": i}``.

    ``latents`` are already multiplied by the VAE's scaling factor. ``empty_prompt_embeds`` (77, D) is
    the "" embedding for prompt dropout; ``prompts[i]`` is row i's prompt.
    """

    def __init__(self, latents_cache: CacheEntry, embeds_cache: CacheEntry, prompts: Sequence[str]):
        self.latents_cache = latents_cache
        self.embeds_cache = embeds_cache
        self.source = latents_cache.meta.get("source")
        self.prompts = list(prompts)
        self._latents = _ShardedRows("latents", latents_cache.shards("latents"))
        self._embeds = _ShardedRows("prompt_embeds", embeds_cache.shards("prompt_embeds"))
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


# ---------------------------------------------------------------------------------------------------------------
# Sources: resolved and checked before any model work
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ResolvedSource:
    """A checked source: its kind, what identifies its content, the rows and the prompt of each row."""

    kind: str  # one of SOURCES
    identity: dict  # goes into the cache keys
    prompts: list[str]  # one per training row
    dataset: Any = None  # datasets.Dataset for "images" and "latents"
    latent_shape: tuple[int, ...] | None = None  # "latents": the first row's shape
    seeded: bool = True  # whether the seed changes the rows (random crop/flip, caption choice, generation)


def _looks_like_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name


def _load_dataset(name: str, config_name: str | None, cfg: DataConfig, flag: str) -> tuple[Any, dict]:
    """A ``datasets.Dataset`` (train split) and what identifies its content, or one clear ``ValueError``."""
    import datasets

    path = Path(name).expanduser()
    datasets_cache = str(Path(cfg.cache_dir).expanduser() / "datasets")
    if path.is_dir():
        identity = {"local": str(path.resolve()), "files": folder_listing_digest(path), "config": config_name}
        state = path / "state.json"
        if state.is_file() and not json.loads(state.read_text(encoding="utf-8")).get("_data_files", True):
            raise ValueError(f"{flag} {name!r} is empty: it has no rows to train on.")
        if state.is_file() or (path / "dataset_dict.json").is_file():
            ds = _read_local(datasets.load_from_disk, flag, name, str(path))  # written by save_to_disk
        else:
            ds = _read_local(
                datasets.load_dataset, flag, name, str(path), config_name, split="train", cache_dir=datasets_cache
            )
    elif path.exists() or _looks_like_path(name):
        raise ValueError(
            f"{flag} {name!r}: no such folder. Pass a folder that exists, or a Hugging Face Hub dataset id."
        )
    else:
        try:
            ds = datasets.load_dataset(name, config_name, split="train", cache_dir=datasets_cache)
        except Exception as err:  # the Hub client raises many types; the user needs one message
            raise ValueError(
                f"{flag} {name!r}: not a local folder, and loading it from the Hugging Face Hub failed "
                f"({type(err).__name__}: {err}). Check the id and your connection, or pass a local folder."
            ) from err
        identity = {"hub": name, "config": config_name, "fingerprint": ds._fingerprint}
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"{flag} {name!r} has splits {list(ds)} but no 'train' split; save the train split.")
        ds = ds["train"]
    return ds, identity


def _read_local(load: Any, flag: str, name: str, *args: Any, **kwargs: Any) -> Any:
    """``load(*args, **kwargs)`` with the datasets library's errors for a local folder turned into one message."""
    try:
        return load(*args, **kwargs)
    except Exception as err:  # datasets raises IndexError, ValueError, FileNotFoundError... for bad folders
        if "corresponds to no data" in str(err) or type(err).__name__ == "EmptyDatasetError":
            raise ValueError(f"{flag} {name!r} is empty: it has no rows to train on.") from err
        raise ValueError(
            f"{flag} {name!r}: the datasets library could not read this folder ({type(err).__name__}: {err}). "
            "Pass a folder of data files (parquet, json, csv, images + metadata.jsonl) or one written by save_to_disk."
        ) from err


def _check_columns(ds: Any, needed: Mapping[str, str], what: str) -> None:
    for flag, column in needed.items():
        if column not in ds.column_names:
            raise ValueError(
                f"{what} has no column {column!r} ({flag}); its columns are {ds.column_names}. "
                f"Pass {flag} with one of them."
            )


def _take_first(ds: Any, cfg: DataConfig, what: str) -> Any:
    if len(ds) == 0:
        raise ValueError(f"{what} is empty: it has no rows to train on.")
    if cfg.max_train_samples is not None and cfg.max_train_samples < len(ds):
        ds = ds.select(range(cfg.max_train_samples))
    return ds


def _row_rng(seed: int, row: int, purpose: str) -> random.Random:
    """An independent random stream per (seed, row, purpose); string seeds hash with SHA-512, stably."""
    return random.Random(f"flow_lune:{purpose}:{seed}:{row}")


def _choose_caption(value: Any, row: int, cfg: DataConfig) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return value[_row_rng(cfg.seed, row, "caption").randrange(len(value))]
    raise TypeError(
        f"caption column {cfg.caption_column!r}, row {row}: expected a string or a list of strings, got {value!r}."
    )


def _read_prompts_file(path_str: str) -> list[str]:
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise ValueError(f"--prompts_file {path_str!r}: no such file. Pass a text file with one prompt per line.")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line]
    if not prompts:
        raise ValueError(f"--prompts_file {path_str!r} holds no prompts (only blank lines); write one per line.")
    return prompts


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False).encode("utf-8")).hexdigest()


def resolve_source(cfg: DataConfig, latent_channels: int = 4) -> ResolvedSource:
    """Check the config and its source and read the prompts; raises before any model work.

    Errors: two sources at once, a resolution not divisible by 8, a folder or file that does not exist,
    a missing column (named, with the columns present), an empty dataset or prompts file, latents that
    are not (``latent_channels``, h, w), a caption or prompt that is not a string.
    """
    cfg.check()
    kind = cfg.source
    if kind == "images":
        flag = "--dataset_name" if cfg.dataset_name is not None else "--train_data_dir"
        name = cfg.dataset_name if cfg.dataset_name is not None else cfg.train_data_dir
        if cfg.train_data_dir is not None and not Path(name).expanduser().is_dir():
            raise ValueError(f"--train_data_dir {name!r}: no such folder. Pass an imagefolder with metadata.jsonl.")
        what = f"The image dataset {name!r}"
        if cfg.train_data_dir is not None:
            import datasets

            path = str(Path(name).expanduser())
            cache = str(Path(cfg.cache_dir).expanduser() / "datasets")
            ds = _read_local(
                datasets.load_dataset, flag, name, "imagefolder", data_dir=path, split="train", cache_dir=cache
            )
            identity = {"imagefolder": str(Path(path).resolve()), "files": folder_listing_digest(path)}
        else:
            ds, identity = _load_dataset(name, cfg.dataset_config_name, cfg, flag)
        _check_columns(ds, {"--image_column": cfg.image_column, "--caption_column": cfg.caption_column}, what)
        feature = ds.features[cfg.image_column]
        if type(feature).__name__ != "Image":
            raise TypeError(
                f"{what}: column {cfg.image_column!r} (--image_column) holds {feature}, not images. Pass the "
                "column whose feature is datasets.Image (imagefolder names it 'image')."
            )
        ds = _take_first(ds, cfg, what)
        captions = ds[cfg.caption_column]
        prompts = [_choose_caption(v, row, cfg) for row, v in enumerate(captions)]
        seeded = (not cfg.center_crop) or cfg.random_flip or any(not isinstance(v, str) for v in captions)
        return ResolvedSource(kind, identity, prompts, dataset=ds, seeded=seeded)
    if kind == "latents":
        ds, identity = _load_dataset(cfg.latents_dataset, None, cfg, "--latents_dataset")
        what = f"The latents dataset {cfg.latents_dataset!r}"
        _check_columns(ds, {"--latents_column": cfg.latents_column, "--prompt_column": cfg.prompt_column}, what)
        ds = _take_first(ds, cfg, what)
        first = torch.as_tensor(np.asarray(ds[0][cfg.latents_column], dtype=np.float32))
        _check_latent_shape(first, 0, latent_channels, None, cfg)
        prompts = list(ds[cfg.prompt_column])
        for row, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt column {cfg.prompt_column!r}, row {row}: expected a string, got {p!r}.")
        return ResolvedSource(kind, identity, prompts, dataset=ds, latent_shape=tuple(first.shape), seeded=False)
    if kind == "prompts":
        lines = _read_prompts_file(cfg.prompts_file)
    else:
        from .prompts import SyntheticPrompts

        lines = SyntheticPrompts(cfg.seed).generate(cfg.num_generated)
    n = min(cfg.num_generated, cfg.max_train_samples or cfg.num_generated)
    prompts = [lines[i % len(lines)] for i in range(n)]  # cycled: repeats get other noise, hence other latents
    return ResolvedSource(kind, {"prompts_sha256": _sha256_json(prompts)}, prompts)


def _check_latent_shape(x: torch.Tensor, row: int, channels: int, shape: tuple | None, cfg: DataConfig) -> None:
    if x.ndim != 3 or x.shape[0] != channels:
        raise ValueError(
            f"latents column {cfg.latents_column!r}, row {row}: shape {tuple(x.shape)}, expected ({channels}, h, w) "
            "latents (already multiplied by the VAE's scaling factor)."
        )
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(
            f"latents column {cfg.latents_column!r}, row {row}: shape {tuple(x.shape)} differs from row 0's "
            f"{tuple(shape)}; all latents must have one size so they can be batched."
        )
    if not torch.isfinite(x).all():
        raise ValueError(f"latents column {cfg.latents_column!r}, row {row}: holds NaN or infinite values.")


# ---------------------------------------------------------------------------------------------------------------
# Model work: text embeddings, VAE encoding, teacher generation
# ---------------------------------------------------------------------------------------------------------------


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def encode_prompts(prompts: Sequence[str], text_encoder: Any, tokenizer: Any) -> torch.Tensor:
    """Last hidden state (B, 77, D) over prompts padded to "max_length", in float32."""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids.to(_device_of(text_encoder)))[0].float()


def preprocess_image(image: Any, cfg: DataConfig, row: int) -> tuple[torch.Tensor, dict]:
    """An image as (3, r, r) pixels in [-1, 1], and the crop/flip applied.

    Shorter side resized to ``resolution`` (bilinear, as diffusers' trainers via torchvision), then a
    centre crop or a crop at a random offset, then a horizontal flip with probability 1/2 if
    ``random_flip``; the random choices come from the stream seeded by ``(seed, row)``.
    """
    from PIL import Image

    image = image.convert("RGB")
    r = cfg.resolution
    w, h = image.size
    if min(w, h) != r:
        short, long = (w, h) if w <= h else (h, w)
        long = int(r * long / short)
        w, h = (r, long) if w <= h else (long, r)
        image = image.resize((w, h), Image.BILINEAR)
    rng = _row_rng(cfg.seed, row, "transform")
    if cfg.center_crop:
        top, left = int(round((h - r) / 2.0)), int(round((w - r) / 2.0))
    else:
        top, left = rng.randint(0, h - r), rng.randint(0, w - r)
    image = image.crop((left, top, left + r, top + r))
    flip = bool(cfg.random_flip and rng.random() < 0.5)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return pixels, {"crop_top_left": [top, left], "flip": flip}


@torch.no_grad()
def encode_images(pixels: torch.Tensor, vae: Any) -> torch.Tensor:
    """``vae.encode(pixels).latent_dist.mode() * scaling_factor`` in float32."""
    x = pixels.to(_device_of(vae), torch.float32)
    return (vae.encode(x).latent_dist.mode() * vae.config.scaling_factor).float()


def generation_sigmas(scheduler_config: Mapping[str, Any], steps: int) -> torch.Tensor:
    """Flow sigmas of DDIM's timesteps for ``steps`` steps, ``sigma(t) = s_t / (a_t + s_t)``, float64."""
    from diffusers import DDIMScheduler

    from flow_lune.schedulers import TeacherSchedule, sigma_from_t

    ddim = DDIMScheduler.from_config(dict(scheduler_config))
    ddim.set_timesteps(steps)
    return sigma_from_t(ddim.timesteps, TeacherSchedule.from_scheduler_config(scheduler_config))


@torch.no_grad()
def generate_latents(
    unet: Any,
    scheduler_config: Mapping[str, Any],
    cond: torch.Tensor,
    uncond: torch.Tensor,
    noise: torch.Tensor,
    steps: int,
    guidance: float,
) -> torch.Tensor:
    """The teacher's x0 for a batch: Euler on the bridge velocity ``v*`` over DDIM's sigmas, with CFG.

    Starts at ``x = n(sigma_0) * noise`` (the teacher's ``x_t = noise``), steps with
    ``guided_velocity(v*(uncond), v*(cond), guidance)`` and ends at sigma = 0. Equal to DDIM (eta 0)
    with ``set_alpha_to_one=True`` over the raw UNet, per DESIGN.md section 2. Returns float32.
    """
    from flow_lune.schedulers import EpsilonToFlowUNet, FlowLuneScheduler, guided_velocity, noise_norm

    teacher = EpsilonToFlowUNet(unet, scheduler_config)
    sigmas = generation_sigmas(scheduler_config, steps)  # float64
    flow = FlowLuneScheduler()
    flow.set_timesteps(sigmas=sigmas.float())
    device, dtype = _device_of(unet), unet.dtype
    x = noise.to(device, torch.float32) * noise_norm(flow.sigmas[0]).to(device)
    b = x.shape[0]
    use_cfg = guidance != 1.0
    context = torch.cat([uncond.expand(b, -1, -1), cond]) if use_cfg else cond
    context = context.to(device, dtype)
    for k, timestep in enumerate(flow.timesteps):
        x_in = torch.cat([x, x]) if use_cfg else x
        # float64 timesteps: the teacher is queried at DDIM's integer timesteps exactly
        t_exact = (sigmas[k] * flow.config.num_train_timesteps).to(device)
        v = teacher(x_in, t_exact, encoder_hidden_states=context).sample
        if use_cfg:
            v = guided_velocity(*v.chunk(2), guidance)
        x = flow.step(v, timestep, x).prev_sample
    return x.float()


def _noise_for_rows(rows: range, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Starting noise per row from a CPU generator seeded by ``(seed, row)``: independent of batching."""
    out = []
    for row in rows:
        digest = hashlib.sha256(f"flow_lune:noise:{seed}:{row}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        out.append(torch.randn(shape, generator=gen))
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------------------------
# Caches
# ---------------------------------------------------------------------------------------------------------------


def _embeds_key(prompts: Sequence[str], teacher: TeacherParts, cfg: DataConfig) -> dict:
    return {
        "what": "prompt_embeds",
        "version": DATA_VERSION,
        "prompts_sha256": _sha256_json(list(prompts)),
        "teacher_id": cfg.teacher_id,
        "text_encoder": module_digest(teacher.text_encoder),
        "text_encoder_dtype": str(teacher.text_encoder.dtype),
        "tokenizer": _tokenizer_digest(teacher.tokenizer),
    }


def _latents_key(source: ResolvedSource, teacher: TeacherParts, cfg: DataConfig, embeds_key: dict) -> dict:
    key = {"what": "latents", "version": DATA_VERSION, "source": source.kind, "identity": source.identity}
    key["max_train_samples"] = cfg.max_train_samples
    if source.kind == "images":
        key.update(
            image_column=cfg.image_column,
            caption_column=cfg.caption_column,
            prompts_sha256=_sha256_json(source.prompts),
            resolution=cfg.resolution,
            center_crop=cfg.center_crop,
            random_flip=cfg.random_flip,
            seed=cfg.seed if source.seeded else None,
            teacher_id=cfg.teacher_id,
            vae=module_digest(teacher.vae),
            scaling_factor=float(teacher.vae.config.scaling_factor),
            encode="latent_dist.mode() float32",
        )
    elif source.kind == "latents":
        key.update(latents_column=cfg.latents_column, prompt_column=cfg.prompt_column)
    else:
        key.update(
            resolution=cfg.resolution,
            seed=cfg.seed,
            generation_steps=cfg.generation_steps,
            generation_guidance=float(cfg.generation_guidance),
            teacher_id=cfg.teacher_id,
            unet=module_digest(teacher.unet),
            unet_dtype=str(teacher.unet.dtype),
            scheduler_config=json.loads(json.dumps(dict(teacher.scheduler_config), default=str)),
            prompt_embeds=embeds_key,
            sampler="bridge Euler on DDIM sigmas, CFG in v, ends at sigma 0",
        )
    return key


def _build_embeds(path: Path, key: dict, unique: list[str], teacher: TeacherParts, cfg: DataConfig, show: bool):
    with CacheWriter(path, key) as writer:
        writer.write_json("prompts.json", unique)
        writer.add_rows("empty_prompt_embeds", encode_prompts([""], teacher.text_encoder, teacher.tokenizer))
        bar = tqdm(total=len(unique), desc="Encoding prompts", unit="prompt", disable=not show)
        for i in range(0, len(unique), cfg.data_batch_size):
            chunk = unique[i : i + cfg.data_batch_size]
            writer.add_rows("prompt_embeds", encode_prompts(chunk, teacher.text_encoder, teacher.tokenizer))
            bar.update(len(chunk))
        bar.close()
        return writer.commit(num_rows=len(unique))


def _build_latents(
    path: Path,
    key: dict,
    source: ResolvedSource,
    teacher: TeacherParts,
    embeds: CacheEntry,
    cfg: DataConfig,
    show: bool,
) -> CacheEntry:
    n, bs = len(source.prompts), cfg.data_batch_size
    desc = {"images": "Encoding images", "latents": "Copying latents"}.get(source.kind, "Generating latents")
    bar = tqdm(total=n, desc=desc, unit="sample", disable=not show)
    with CacheWriter(path, key) as writer:
        writer.write_json("prompts.json", source.prompts)
        if source.kind == "images":
            vae = teacher.vae
            if vae.dtype != torch.float32:  # encode in float32 without touching the caller's model
                vae = copy.deepcopy(vae).to(torch.float32)
            transforms = []
            for i in range(0, n, bs):
                images = source.dataset[i : i + bs][cfg.image_column]
                done = [preprocess_image(img, cfg, i + k) for k, img in enumerate(images)]
                transforms += [record for _, record in done]
                writer.add_rows("latents", encode_images(torch.stack([p for p, _ in done]), vae))
                bar.update(len(images))
            writer.write_json("transforms.json", transforms)
        elif source.kind == "latents":
            table = source.dataset.with_format("numpy", columns=[cfg.latents_column])
            for i in range(0, n, bs):
                for k, value in enumerate(table[i : i + bs][cfg.latents_column]):
                    x = torch.as_tensor(np.asarray(value, dtype=np.float32))
                    _check_latent_shape(x, i + k, source.latent_shape[0], source.latent_shape, cfg)
                    writer.add_rows("latents", x[None])
                bar.update(min(bs, n - i))
        else:
            unique = embeds.read_json("prompts.json")
            position = {p: k for k, p in enumerate(unique)}
            rows = _ShardedRows("prompt_embeds", embeds.shards("prompt_embeds"))
            uncond = embeds.load_tensor("empty_prompt_embeds")
            h = w = cfg.resolution // 8
            shape = (teacher.unet.config.in_channels, h, w)
            for i in range(0, n, bs):
                chunk = range(i, min(n, i + bs))
                cond = torch.stack([rows[position[source.prompts[r]]] for r in chunk])
                x0 = generate_latents(
                    teacher.unet,
                    teacher.scheduler_config,
                    cond,
                    uncond,
                    _noise_for_rows(chunk, shape, cfg.seed),
                    cfg.generation_steps,
                    cfg.generation_guidance,
                )
                if not torch.isfinite(x0).all():
                    raise ValueError(
                        f"The teacher generated non-finite latents for rows {chunk.start}..{chunk.stop - 1}; "
                        "check the teacher's weights and dtype (float16 overflow?)."
                    )
                writer.add_rows("latents", x0)
                bar.update(len(chunk))
        bar.close()
        return writer.commit(num_rows=n, meta={"source": source.kind})


def prepare_training_data(cfg: DataConfig, teacher: TeacherParts, accelerator: Any = None) -> LatentPromptDataset:
    """Build or reuse the caches of latents and text embeddings for ``cfg`` and return the dataset.

    Bad input raises on every process before any model work (see ``resolve_source``). The main process
    builds missing or unusable caches (progress bars there) while the others wait
    (``accelerator.main_process_first()``); then every process opens the same cache folders. A cache
    is reused only when its key (everything that changes its content) matches and every file checks out.
    ``accelerator=None`` means a single process.
    """
    source = resolve_source(cfg, latent_channels=int(teacher.unet.config.in_channels))
    is_main = accelerator is None or accelerator.is_main_process
    show = accelerator is None or accelerator.is_local_main_process
    first = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
    cache_dir = Path(cfg.cache_dir).expanduser()
    with first:
        unique = list(dict.fromkeys([*source.prompts]))
        embeds_key = _embeds_key(unique, teacher, cfg)
        embeds_path = cache_folder(cache_dir, "embeds", embeds_key)
        embeds = open_cache(embeds_path, embeds_key)
        if embeds is None:
            _require_main(is_main, embeds_path)
            embeds = _build_embeds(embeds_path, embeds_key, unique, teacher, cfg, show)
        latents_key = _latents_key(source, teacher, cfg, embeds_key)
        latents_path = cache_folder(cache_dir, f"latents-{source.kind}", latents_key)
        latents = open_cache(latents_path, latents_key)
        if latents is None:
            _require_main(is_main, latents_path)
            latents = _build_latents(latents_path, latents_key, source, teacher, embeds, cfg, show)
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
    "ResolvedSource",
    "TeacherParts",
    "collate",
    "encode_images",
    "encode_prompts",
    "generate_latents",
    "generation_sigmas",
    "prepare_training_data",
    "preprocess_image",
    "resolve_source",
]
