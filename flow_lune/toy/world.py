"""The toy world: procedural 64x64 images of one coloured shape at one of four positions, with captions.

Every image is drawn from its attributes (shape, colour, position) and a per-image random stream
seeded by ``(seed, split, index)``, so the same arguments always give the same pixels. Attributes
cycle through all combinations in a fixed order, so any ``len(ATTRIBUTE_COMBINATIONS)`` consecutive
images hold each combination once. The jitter (size, exact position, shade, background tint,
rotation of squares and triangles) is light: the teacher must be trainable in about an hour on two
CPU cores, and the judge must read every attribute from the pixels.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
POSITIONS = ("left", "right", "top", "bottom")
# One entry per attribute, in the order of the judge's heads and of the label columns.
ATTRIBUTES: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": COLOURS, "position": POSITIONS}
ATTRIBUTE_COMBINATIONS = tuple(itertools.product(SHAPES, COLOURS, POSITIONS))

IMAGE_SIZE = 64  # SD1.5's layout at 1/8 resolution: 8x8 latents through the VAE's factor 8
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges
SPLITS = {"train": 0, "heldout": 1}  # the split is part of the per-image seed: held-out images are new draws

_RGB = {  # base colours, far apart in RGB so that a shade jitter never crosses into another colour
    "red": (215, 40, 40),
    "green": (40, 170, 60),
    "blue": (45, 70, 215),
    "yellow": (235, 205, 40),
}
_CENTRE = {"left": (17, 32), "right": (47, 32), "top": (32, 17), "bottom": (32, 47)}  # (x, y) in pixels
_SIZE_RANGE = (9.0, 12.5)  # half-size in pixels: a shape stays inside its quarter of the image
_SHIFT = 3.0  # uniform +-jitter of the centre, pixels
_SHADE = 20  # uniform +-jitter of each RGB channel of the shape
_BACKGROUND = (150, 215)  # grey level range of the background; a light tint of +-12 per channel is added


@dataclass(frozen=True)
class ToySample:
    """One image, its caption, its attributes and the mask of its shape's pixels."""

    image: Image.Image  # 64x64 RGB
    caption: str  # e.g. "a red circle at the left"
    shape: str
    colour: str
    position: str
    mask: np.ndarray  # (64, 64) float32 in [0, 1]: the shape's coverage of each pixel

    @property
    def labels(self) -> dict[str, int]:
        """Each attribute's index in ``ATTRIBUTES``."""
        return {name: ATTRIBUTES[name].index(getattr(self, name)) for name in ATTRIBUTES}


def caption_for(shape: str, colour: str, position: str) -> str:
    """The caption of an image with these attributes: ``"a <colour> <shape> at the <position>"``."""
    for name, value in (("shape", shape), ("colour", colour), ("position", position)):
        if value not in ATTRIBUTES[name]:
            raise ValueError(f"{name} {value!r} is not one of {ATTRIBUTES[name]}.")
    return f"a {colour} {shape} at the {position}"


def parse_caption(caption: str) -> dict[str, int]:
    """The attribute labels named by a caption of ``caption_for``'s form; ``ValueError`` for any other text."""
    words = caption.strip().split()
    if len(words) != 6 or words[0] != "a" or words[3:5] != ["at", "the"]:
        raise ValueError(f"{caption!r} is not a toy caption; expected 'a <colour> <shape> at the <position>'.")
    values = {"colour": words[1], "shape": words[2], "position": words[5]}
    for name, value in values.items():
        if value not in ATTRIBUTES[name]:
            raise ValueError(f"{caption!r}: {name} {value!r} is not one of {ATTRIBUTES[name]}.")
    return {name: ATTRIBUTES[name].index(values[name]) for name in ATTRIBUTES}


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {tuple(SPLITS)}.")
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}.")
    return np.random.default_rng([seed, SPLITS[split], index])


def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    """Polygon vertices at the supersampled scale; None for a circle (drawn as an ellipse)."""
    if shape == "circle":
        return None
    corners = 4 if shape == "square" else 3
    r = r * (1.0 if shape == "square" else 1.15)  # a triangle of the same half-size looks smaller; enlarge it
    radius = r * (np.sqrt(2.0) if shape == "square" else 1.0)
    start = (np.pi / 4 if shape == "square" else -np.pi / 2) + angle
    return [
        (cx + radius * np.cos(start + 2 * np.pi * k / corners), cy + radius * np.sin(start + 2 * np.pi * k / corners))
        for k in range(corners)
    ]


def render(seed: int, split: str, index: int) -> ToySample:
    """Image ``index`` of ``split`` for ``seed``: attributes from ``index``, jitter from ``(seed, split, index)``."""
    shape, colour, position = ATTRIBUTE_COMBINATIONS[index % len(ATTRIBUTE_COMBINATIONS)]
    rng = _rng(seed, split, index)
    s = SUPERSAMPLE
    grey = rng.uniform(*_BACKGROUND)
    background = tuple(int(np.clip(grey + rng.uniform(-12, 12), 0, 255)) for _ in range(3))
    fill = tuple(int(np.clip(c + rng.integers(-_SHADE, _SHADE + 1), 0, 255)) for c in _RGB[colour])
    r = rng.uniform(*_SIZE_RANGE) * s
    cx, cy = ((c + rng.uniform(-_SHIFT, _SHIFT)) * s for c in _CENTRE[position])
    angle = rng.uniform(-0.25, 0.25)  # radians: a slight rotation of squares and triangles

    big = IMAGE_SIZE * s
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    outline = _outline(shape, cx, cy, r, angle)
    if outline is None:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon(outline, fill=255)
    mask = mask.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    pixels = (1.0 - alpha) * np.array(background, np.float32) + alpha * np.array(fill, np.float32)
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    return ToySample(
        image=image,
        caption=caption_for(shape, colour, position),
        shape=shape,
        colour=colour,
        position=position,
        mask=alpha[..., 0],
    )


def heldout_prompts(count: int = len(ATTRIBUTE_COMBINATIONS)) -> list[str]:
    """The first ``count`` captions of the held-out split: each combination once per 48 prompts."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}.")
    return [caption_for(*ATTRIBUTE_COMBINATIONS[i % len(ATTRIBUTE_COMBINATIONS)]) for i in range(count)]
