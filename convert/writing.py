"""Atomic writing: a temporary name in the destination's folder, checked, then ``os.replace``."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from .errors import ConversionError


def check_destination(dst: Path, overwrite: bool, *also: Path) -> None:
    """Refuse to replace an existing ``dst`` (or any of ``also``) unless ``overwrite``; its folder must exist."""
    for path in (dst, *also):
        if path.exists() and not overwrite:
            raise ConversionError(f"{path} already exists; pass --overwrite to replace it, or choose another DST")
    if not dst.parent.is_dir():
        raise ConversionError(f"the folder of DST, {dst.parent}, does not exist; create it first")


def atomic_file(dst: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` for a temporary path beside ``dst``, then move it onto ``dst``; no partial file is left."""
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


def atomic_text(dst: Path, text: str) -> None:
    """Write ``text`` to ``dst`` atomically."""
    atomic_file(dst, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_folder(dst: Path, fill: Callable[[Path], None]) -> None:
    """Call ``fill(tmp_dir)``, then put the folder at ``dst``, replacing an old one only after success."""
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        fill(tmp)
        if dst.exists():
            if not dst.is_dir():
                raise ConversionError(f"{dst} exists and is not a folder; remove it or choose another DST")
            os.replace(dst, old)
        os.replace(tmp, dst)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        if old.exists() and not dst.exists():
            os.replace(old, dst)  # put the previous folder back if the swap failed half-way
