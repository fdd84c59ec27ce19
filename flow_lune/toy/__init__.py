"""The toy world: procedural captioned images, a toy SD1.5 teacher trained on them, and a judge.

The built models ship with the package under ``assets/`` (``python -m flow_lune.toy.build`` rebuilds
them); ``teacher_path()`` and ``judge_path()`` give their folders.
"""

from pathlib import Path

from .data import ToyArrays, toy_arrays, toy_dataset, toy_dataset_dict, write_imagefolder
from .world import (
    ATTRIBUTE_COMBINATIONS,
    ATTRIBUTES,
    COLOURS,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    ToySample,
    caption_for,
    heldout_prompts,
    parse_caption,
    render,
)

ASSETS = Path(__file__).parent / "assets"


def _asset(name: str) -> Path:
    path = ASSETS / name
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: the toy assets are not installed. Rebuild them with "
            f"`python -m flow_lune.toy.build --output_dir {ASSETS} --seed 0`."
        )
    return path


def teacher_path() -> Path:
    """The shipped toy teacher: a ``StableDiffusionPipeline`` folder (``from_pretrained`` loads it offline)."""
    return _asset("teacher")


def judge_path() -> Path:
    """The shipped judge's folder (``flow_lune.toy.judge.load_judge`` reads it)."""
    return _asset("judge")


def manifest_path() -> Path:
    """The shipped ``manifest.json``: sha256 of every asset file, the build command, seed, stage times."""
    return _asset("manifest.json")


__all__ = [
    "ATTRIBUTES",
    "ATTRIBUTE_COMBINATIONS",
    "COLOURS",
    "IMAGE_SIZE",
    "POSITIONS",
    "SHAPES",
    "ToyArrays",
    "ToySample",
    "caption_for",
    "heldout_prompts",
    "judge_path",
    "manifest_path",
    "parse_caption",
    "render",
    "teacher_path",
    "toy_arrays",
    "toy_dataset",
    "toy_dataset_dict",
    "write_imagefolder",
]
