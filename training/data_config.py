"""Where the training latents come from and how they are cached: ``DataConfig``, one source at most.

The flags of ``training/cli.py`` take their defaults from here; ``data.py`` documents the sources and choices.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

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
            if not self.generation_guidance >= 1:
                raise ValueError(
                    f"--generation_guidance must be >= 1 (1 = no guidance), got {self.generation_guidance}."
                )
        if self.data_batch_size < 1:
            raise ValueError(f"data_batch_size must be >= 1, got {self.data_batch_size}.")
