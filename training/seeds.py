"""Every seed Flow Lune derives from ``--seed``: hashes of names, so no random state needs storing.

One digest, ``sha256(text)`` read as a little-endian 64-bit integer, made into 63-bit seeds in two key
formats: the trainer's counter-based streams (per stream, process, epoch and batch) and the per-row
streams of the data caches (generation noise, crops, flips, caption choice). A resumed run draws exactly
the numbers the uninterrupted run drew at the same batch; a cached row does not depend on the batching.
The two formats stay as they are because cached latents and training runs are defined by them.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import torch


def _digest64(text: str) -> int:
    """The first 8 bytes of ``sha256(text)`` as a little-endian integer."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def stream_seed(seed: int, stream: str, process_index: int, epoch: int, batch: int) -> int:
    """A 63-bit seed from ``sha256("seed/stream/process/epoch/batch")``: independent streams, no state."""
    return _digest64(f"{seed}/{stream}/{process_index}/{epoch}/{batch}") & ((1 << 63) - 1)


def _row_key(seed: int, row: int, purpose: str) -> str:
    return f"flow_lune:{purpose}:{seed}:{row}"


def row_seed(seed: int, row: int, purpose: str) -> int:
    """A 63-bit seed from ``sha256("flow_lune:purpose:seed:row")`` for one row of a data cache."""
    return _digest64(_row_key(seed, row, purpose)) >> 1


def row_rng(seed: int, row: int, purpose: str) -> random.Random:
    """A Python random stream per (seed, row, purpose), for crops, flips and caption choice.

    Seeded with the row's key as a string, which ``random.Random`` hashes with SHA-512, stably.
    """
    return random.Random(_row_key(seed, row, purpose))


def row_noise(rows: range, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Starting noise per row from a CPU generator seeded by ``row_seed(seed, row, "noise")``: batch-independent."""
    generators = [torch.Generator().manual_seed(row_seed(seed, row, "noise")) for row in rows]
    return torch.stack([torch.randn(shape, generator=g) for g in generators])


@dataclass
class RandomStreams:
    """The trainer's random numbers (sigma, noise, prompt dropout), a function of the batch position only."""

    seed: int
    process_index: int = 0

    def generator(self, stream: str, epoch: int, batch: int, device: torch.device | str = "cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(
            stream_seed(self.seed, stream, self.process_index, epoch, batch)
        )
