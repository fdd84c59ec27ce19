"""Destination checks of the converter; the atomic writers themselves are ``flow_lune.atomic``'s."""

from __future__ import annotations

from pathlib import Path

from flow_lune.atomic import atomic_file, atomic_folder, atomic_text

from .errors import ConversionError


def check_destination(dst: Path, overwrite: bool, *also: Path) -> None:
    """Refuse to replace an existing ``dst`` (or any of ``also``) unless ``overwrite``; its folder must exist."""
    for path in (dst, *also):
        if path.exists() and not overwrite:
            raise ConversionError(f"{path} already exists; pass --overwrite to replace it, or choose another DST")
    if not dst.parent.is_dir():
        raise ConversionError(f"the folder of DST, {dst.parent}, does not exist; create it first")


__all__ = ["atomic_file", "atomic_folder", "atomic_text", "check_destination"]
