"""Atomic writing: a temporary name in the destination's folder, then ``os.replace``.

A reader never sees a partial file or folder, and what was at the destination stays until the new
one is complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def atomic_file(dst: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` for a temporary path beside ``dst``, then move it onto ``dst``; no partial file is left."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    try:
        write(tmp)
        if dst.exists():
            with open(tmp, "rb") as f:  # an existing file is at stake: make the new one durable first
                os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_text(dst: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``dst`` atomically."""
    atomic_file(dst, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_folder(dst: str | os.PathLike, fill: Callable[[Path], None]) -> None:
    """Call ``fill(tmp_dir)``, then put the folder at ``dst``, replacing an old one only after success."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        fill(tmp)
        if dst.exists():
            if not dst.is_dir():
                raise ValueError(f"{dst} exists and is not a folder; remove it or choose another destination")
            os.replace(dst, old)
        os.replace(tmp, dst)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        if old.exists() and not dst.exists():
            os.replace(old, dst)  # put the previous folder back if the swap failed half-way
