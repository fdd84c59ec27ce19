"""Training data sources, resolved and checked before any model work (DESIGN.md section 3).

``resolve_source`` reads what one ``DataConfig`` names (an image-caption dataset, a latents dataset, a
prompts file, or the built-in synthetic prompts) and returns the rows' prompts and what identifies the
content for the cache keys; bad input is one ``ValueError``/``TypeError`` naming the flag.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .caching import folder_listing_digest
from .seeds import row_rng

if TYPE_CHECKING:
    from .data_config import DataConfig


@dataclass
class ResolvedSource:
    """A checked source: its kind, what identifies its content, the rows and the prompt of each row."""

    kind: str  # one of data.SOURCES
    identity: dict  # goes into the cache keys
    prompts: list[str]  # one per training row
    dataset: Any = None  # datasets.Dataset for "images" and "latents"
    latent_shape: tuple[int, ...] | None = None  # "latents": the first row's shape
    seeded: bool = True  # whether the seed changes the rows (random crop/flip, caption choice, generation)


def _looks_like_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name


def _load_dataset(name: str, config_name: str | None, config: DataConfig, flag: str) -> tuple[Any, dict]:
    """A ``datasets.Dataset`` (train split) and what identifies its content, or one clear ``ValueError``."""
    import datasets

    path = Path(name).expanduser()
    datasets_cache = str(Path(config.cache_dir).expanduser() / "datasets")
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


def _take_first(ds: Any, config: DataConfig, what: str) -> Any:
    if len(ds) == 0:
        raise ValueError(f"{what} is empty: it has no rows to train on.")
    if config.max_train_samples is not None and config.max_train_samples < len(ds):
        ds = ds.select(range(config.max_train_samples))
    return ds


def _choose_caption(value: Any, row: int, config: DataConfig) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return value[row_rng(config.seed, row, "caption").randrange(len(value))]
    raise TypeError(
        f"caption column {config.caption_column!r}, row {row}: expected a string or a list of strings, got {value!r}."
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


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, ensure_ascii=False).encode("utf-8")).hexdigest()


def resolve_source(config: DataConfig, latent_channels: int = 4) -> ResolvedSource:
    """Check the config and its source and read the prompts; raises before any model work.

    Errors: two sources at once, a resolution not divisible by 8, a folder or file that does not exist,
    a missing column (named, with the columns present), an empty dataset or prompts file, latents that
    are not (``latent_channels``, h, w), a caption or prompt that is not a string.
    """
    config.check()
    kind = config.source
    if kind == "images":
        flag = "--dataset_name" if config.dataset_name is not None else "--train_data_dir"
        name = config.dataset_name if config.dataset_name is not None else config.train_data_dir
        if config.train_data_dir is not None and not Path(name).expanduser().is_dir():
            raise ValueError(f"--train_data_dir {name!r}: no such folder. Pass an imagefolder with metadata.jsonl.")
        what = f"The image dataset {name!r}"
        if config.train_data_dir is not None:
            import datasets

            path = str(Path(name).expanduser())
            cache = str(Path(config.cache_dir).expanduser() / "datasets")
            ds = _read_local(
                datasets.load_dataset, flag, name, "imagefolder", data_dir=path, split="train", cache_dir=cache
            )
            identity = {"imagefolder": str(Path(path).resolve()), "files": folder_listing_digest(path)}
        else:
            ds, identity = _load_dataset(name, config.dataset_config_name, config, flag)
        _check_columns(ds, {"--image_column": config.image_column, "--caption_column": config.caption_column}, what)
        feature = ds.features[config.image_column]
        if type(feature).__name__ != "Image":
            raise TypeError(
                f"{what}: column {config.image_column!r} (--image_column) holds {feature}, not images. Pass the "
                "column whose feature is datasets.Image (imagefolder names it 'image')."
            )
        ds = _take_first(ds, config, what)
        captions = ds[config.caption_column]
        prompts = [_choose_caption(v, row, config) for row, v in enumerate(captions)]
        seeded = (not config.center_crop) or config.random_flip or any(not isinstance(v, str) for v in captions)
        return ResolvedSource(kind, identity, prompts, dataset=ds, seeded=seeded)
    if kind == "latents":
        ds, identity = _load_dataset(config.latents_dataset, None, config, "--latents_dataset")
        what = f"The latents dataset {config.latents_dataset!r}"
        _check_columns(ds, {"--latents_column": config.latents_column, "--prompt_column": config.prompt_column}, what)
        ds = _take_first(ds, config, what)
        first = torch.as_tensor(np.asarray(ds[0][config.latents_column], dtype=np.float32))
        check_latent_shape(first, 0, latent_channels, None, config)
        prompts = list(ds[config.prompt_column])
        for row, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompt column {config.prompt_column!r}, row {row}: expected a string, got {p!r}.")
        return ResolvedSource(kind, identity, prompts, dataset=ds, latent_shape=tuple(first.shape), seeded=False)
    if kind == "prompts":
        lines = _read_prompts_file(config.prompts_file)
    else:
        from .prompts import SyntheticPrompts

        lines = SyntheticPrompts(config.seed).generate(config.num_generated)
    n = min(config.num_generated, config.max_train_samples or config.num_generated)
    prompts = [lines[i % len(lines)] for i in range(n)]  # cycled: repeats get other noise, hence other latents
    return ResolvedSource(kind, {"prompts_sha256": sha256_json(prompts)}, prompts)


def check_latent_shape(x: torch.Tensor, row: int, channels: int, shape: tuple | None, config: DataConfig) -> None:
    if x.ndim != 3 or x.shape[0] != channels:
        raise ValueError(
            f"latents column {config.latents_column!r}, row {row}: shape {tuple(x.shape)}, expected ({channels}, h, w) "
            "latents (already multiplied by the VAE's scaling factor)."
        )
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(
            f"latents column {config.latents_column!r}, row {row}: shape {tuple(x.shape)} differs from row 0's "
            f"{tuple(shape)}; all latents must have one size so they can be batched."
        )
    if not torch.isfinite(x).all():
        raise ValueError(f"latents column {config.latents_column!r}, row {row}: holds NaN or infinite values.")
