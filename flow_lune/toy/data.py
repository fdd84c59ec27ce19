"""The toy world as data: tensors for training, a ``datasets.Dataset``, and an imagefolder on disk.

The imagefolder (PNG files plus ``metadata.jsonl`` with a ``file_name`` and a ``text`` field) is what
the trainer's ``--train_data_dir`` reads; the ``datasets.Dataset`` has the same ``image`` and ``text``
columns (``training/data.py``'s defaults) plus one integer column per attribute.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flow_lune.atomic import atomic_folder

from .world import ATTRIBUTES, render


@dataclass
class ToyArrays:
    """A split as tensors: ``images`` (N, 3, 64, 64) uint8, ``labels`` (N, 3) int64, ``masks`` (N, 64, 64)."""

    images: torch.Tensor
    labels: torch.Tensor  # columns in ATTRIBUTES order: shape, colour, position
    masks: torch.Tensor  # float32 coverage of the shape, for the VAE's foreground weighting
    captions: list[str]


def _check_count(count: int) -> None:
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}.")


def toy_arrays(split: str, count: int, seed: int = 0, start: int = 0) -> ToyArrays:
    """Images ``start .. start + count - 1`` of ``split`` as tensors."""
    _check_count(count)
    samples = [render(seed, split, i) for i in range(start, start + count)]
    images = torch.from_numpy(np.stack([np.asarray(s.image) for s in samples])).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([[s.labels[name] for name in ATTRIBUTES] for s in samples], dtype=torch.int64)
    masks = torch.from_numpy(np.stack([s.mask for s in samples]))
    return ToyArrays(images=images, labels=labels, masks=masks, captions=[s.caption for s in samples])


def toy_dataset(split: str, count: int, seed: int = 0):
    """A ``datasets.Dataset`` with ``image`` (``datasets.Image``), ``text`` and one int column per attribute."""
    import datasets

    _check_count(count)

    def rows():
        for i in range(count):
            s = render(seed, split, i)
            yield {"image": s.image, "text": s.caption, **s.labels}

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            **{k: datasets.Value("int64") for k in ATTRIBUTES},
        }
    )
    return datasets.Dataset.from_list(list(rows()), features=features)


def write_imagefolder(folder: str | os.PathLike, count: int, seed: int = 0, split: str = "train") -> Path:
    """Write ``count`` images of ``split`` as ``folder/train/NNNNN.png`` + ``folder/train/metadata.jsonl``.

    ``datasets.load_dataset("imagefolder", data_dir=folder)`` and the trainer's ``--train_data_dir folder``
    read it as a ``train`` split with ``image`` and ``text`` columns (the attribute columns come along).
    The folder is written atomically.
    """
    _check_count(count)

    def fill(tmp: Path) -> None:
        sub = tmp / "train"
        sub.mkdir()
        with open(sub / "metadata.jsonl", "w", encoding="utf-8") as f:
            for i in range(count):
                s = render(seed, split, i)
                name = f"{i:05d}.png"
                s.image.save(sub / name)
                f.write(json.dumps({"file_name": name, "text": s.caption, **s.labels}) + "\n")

    atomic_folder(folder, fill)
    return Path(folder)


def toy_dataset_dict(train_count: int = 4800, heldout_count: int = 480, seed: int = 0):
    """A ``datasets.DatasetDict`` with ``train`` and ``heldout`` splits (``save_to_disk`` it for ``--dataset_name``)."""
    import datasets

    return datasets.DatasetDict(
        {"train": toy_dataset("train", train_count, seed), "heldout": toy_dataset("heldout", heldout_count, seed)}
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m flow_lune.toy.data --output_dir DIR``: write a split as an imagefolder for the trainer."""
    import argparse

    parser = argparse.ArgumentParser(description="Write the toy world as an imagefolder (images + metadata.jsonl).")
    parser.add_argument("--output_dir", required=True, help="the folder to write; pass it as --train_data_dir")
    parser.add_argument("--count", type=int, default=4800, help="images (default: 100 per attribute combination)")
    parser.add_argument("--split", default="train", choices=["train", "heldout"], help="which split to draw")
    parser.add_argument("--seed", type=int, default=0, help="the toy world's seed (the shipped teacher used 0)")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count must be >= 1, got {args.count}")
    print(f"wrote {write_imagefolder(args.output_dir, args.count, args.seed, args.split)}")


if __name__ == "__main__":
    main()
