"""The trainer's recipe: defaults resolved once from the teacher (``flow_lune.settings.Recipe``).

No teacher (or ``toy``) gives the toy world's recipe: the shipped toy teacher, its training images, a short run
sized for 2 CPU cores, the judge at each validation and an evaluation at the end. Any other teacher gives SD1.5's.
A flag the user gives always wins. ``resolve_recipe`` is torch-free (it runs while the flags are parsed);
``materialize_toy_data`` writes the toy images or captions once under ``--cache_dir`` when the run starts.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flow_lune.settings import (
    TOY_DATA,
    TOY_TEACHER,
    TOY_TRAIN_IMAGES,
    TOY_WORLD_SEED,
    Recipe,
    is_toy_teacher,
    recipe_for,
)

# Flags whose parser default is None in train_flow_distill.py so that the recipe can fill them.
RECIPE_FLAGS = (
    "train_batch_size",
    "learning_rate",
    "max_train_steps",
    "validation_steps",
    "validation_prompts",
    "num_validation_inference_steps",
    "validation_guidance_scale",
    "num_generated",
    "generation_guidance",
    "judge_prompts",
    "eval_prompts",
    "torch_threads",
)
DATA_SOURCE_FLAGS = ("dataset_name", "train_data_dir", "latents_dataset", "prompts_file")


@dataclass
class ResolvedRecipe:
    """The recipe in force, the flags it filled, and the flags the user gave (which won)."""

    recipe: Recipe
    toy: bool  # the teacher is the shipped toy teacher: toy data spellings, judge and evaluation apply
    filled: dict[str, Any] = field(default_factory=dict)
    given: list[str] = field(default_factory=list)

    def lines(self, teacher: str) -> list[str]:
        """What the log's first lines say: the recipe, why, what it set and what the user set."""
        why = "the shipped toy teacher" if self.toy else f"teacher {teacher!r}"
        out = [f"Recipe: {self.recipe.name} (for {why}; flow_lune/settings.py says why each default)."]
        out.append("  from the recipe: " + ", ".join(f"{k}={_short(v)}" for k, v in self.filled.items()))
        if self.given:
            out.append("  given (these win): " + ", ".join(self.given))
        return out


def _short(value: Any) -> str:
    if isinstance(value, list) and len(value) > 2:
        return f"[{len(value)} prompts]" if all(isinstance(v, str) for v in value) else str(value)
    return str(value)


def resolve_recipe(args: argparse.Namespace) -> ResolvedRecipe:
    """Fill every recipe flag left at None from the teacher's recipe; the teacher itself defaults to ``toy``.

    ``--num_train_epochs`` given without ``--max_train_steps`` keeps the epochs (the recipe's step count would
    override them). With no data source given, the recipe's (``toy``: the toy images) is used.
    """
    recipe = recipe_for(args.pretrained_teacher_model)
    resolved = ResolvedRecipe(recipe, toy=is_toy_teacher(args.pretrained_teacher_model))
    if args.pretrained_teacher_model is None:
        args.pretrained_teacher_model = TOY_TEACHER
        resolved.filled["pretrained_teacher_model"] = TOY_TEACHER
    for name in RECIPE_FLAGS:
        if getattr(args, name) is not None:
            resolved.given.append(name)
            continue
        if name == "max_train_steps" and args.num_train_epochs is not None:
            continue
        value = getattr(recipe, name)
        value = list(value) if isinstance(value, tuple) else value
        setattr(args, name, value)
        if value is not None:
            resolved.filled[name] = value
    if args.num_train_epochs is None:
        args.num_train_epochs = 1  # the max_train_steps of the recipe (or the user's) usually decides
    if all(getattr(args, name) is None for name in DATA_SOURCE_FLAGS):
        if recipe.train_data_dir is not None and getattr(args, "objective", "distill") != "reflow":  # reflow: pairs
            args.train_data_dir = recipe.train_data_dir
            resolved.filled["train_data_dir"] = recipe.train_data_dir
    else:
        resolved.given += [f"{name}" for name in DATA_SOURCE_FLAGS if getattr(args, name) is not None]
    return resolved


def check_recipe_flags(args: argparse.Namespace) -> None:
    """ValueError for toy-only flags or spellings with another teacher, and for out-of-range counts."""
    toy = is_toy_teacher(args.pretrained_teacher_model)
    for name in ("judge_prompts", "eval_prompts"):
        value = getattr(args, name)
        if value < 0:
            raise ValueError(f"--{name} must be >= 0 (0 turns it off), got {value}.")
        if value and not toy:
            raise ValueError(
                f"--{name} {value}: the judge reads toy images only; it needs the toy teacher (no "
                "--pretrained_teacher_model, or 'toy'). Pass --{name} 0, or use evaluate.py for real models."
            )
    if args.torch_threads < 0:
        raise ValueError(f"--torch_threads must be >= 0 (0: torch's default), got {args.torch_threads}.")
    if args.eval_prompts == 1:
        raise ValueError("--eval_prompts must be 0 or >= 2 (the toy FID needs two images).")
    if any(s < 1 for s in args.eval_steps):
        raise ValueError(f"--eval_steps must all be >= 1, got {args.eval_steps}.")
    for name in ("train_data_dir", "prompts_file"):
        if getattr(args, name) == TOY_DATA and not toy:
            raise ValueError(
                f"--{name} toy is the toy world's data: it needs the toy teacher (no --pretrained_teacher_model, "
                "or 'toy'); pass your own data for this teacher."
            )


def toy_world_folder(cache_dir: str | os.PathLike) -> Path:
    return Path(cache_dir).expanduser() / "toy-world"


def materialize_toy_data(args: argparse.Namespace, accelerator: Any) -> None:
    """Replace ``--train_data_dir toy`` by an imagefolder of the toy train split, or ``--prompts_file toy`` by a
    file of its 48 captions (the teacher generates ``--num_generated`` latents from them, cycled), written once
    under ``--cache_dir`` by the main process."""
    from flow_lune.atomic import atomic_text
    from flow_lune.toy import ATTRIBUTE_COMBINATIONS, caption_for, write_imagefolder

    folder = toy_world_folder(args.cache_dir)
    with accelerator.main_process_first():
        if args.train_data_dir == TOY_DATA:
            images = folder / f"images-seed{TOY_WORLD_SEED}-{TOY_TRAIN_IMAGES}"
            if accelerator.is_main_process and not (images / "train" / "metadata.jsonl").is_file():
                folder.mkdir(parents=True, exist_ok=True)
                write_imagefolder(images, TOY_TRAIN_IMAGES, seed=TOY_WORLD_SEED, split="train")
            args.train_data_dir = str(images)
        if args.prompts_file == TOY_DATA:
            captions = folder / "train-captions.txt"
            if accelerator.is_main_process and not captions.is_file():
                folder.mkdir(parents=True, exist_ok=True)
                atomic_text(captions, "".join(caption_for(*c) + "\n" for c in ATTRIBUTE_COMBINATIONS))
            args.prompts_file = str(captions)
