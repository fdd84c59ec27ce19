"""Weights files of any supported kind behind one reader interface: safetensors, or a torch pickle of tensors.

Pickles are read only with ``torch.load(weights_only=True)``, and a pickle named ``.safetensors`` only when the
user allows it (``--allow-pickle``).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConversionError, format_keys
from .sfio import SafetensorsReader, sniff_format

Shape = tuple[int, ...]


class DictReader:
    """Tensors held in a dict (from ``torch.load(weights_only=True)``), with the reader interface."""

    def __init__(self, tensors: dict[str, torch.Tensor], path: Path):
        self.path = path
        self._tensors = tensors
        self.tensors = {k: _Info(t.dtype, tuple(t.shape)) for k, t in tensors.items()}
        self.metadata: dict[str, str] = {}

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]


@dataclass(frozen=True)
class _Info:
    dtype: torch.dtype
    shape: Shape


def load_pickle(path: Path, allow_pickle: bool) -> dict:
    """``torch.load(path, weights_only=True)``; a pickle under a ``.safetensors`` name needs ``allow_pickle``."""
    if path.suffix == ".safetensors" and not allow_pickle:
        raise ConversionError(
            f"{path} is named .safetensors but is a pickle (torch.save) file; a pickle can run code when loaded. "
            "Pass --allow-pickle to read it with torch.load(weights_only=True), or re-save it as real safetensors"
        )
    try:
        if path.suffix == ".safetensors":
            # torch.load hands a name ending in .safetensors to safetensors; a file object it unpickles.
            with open(path, "rb") as f:
                data = torch.load(f, map_location="cpu", weights_only=True)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=sniff_zip(path))
    except pickle.UnpicklingError as err:
        raise ConversionError(
            f"torch.load(weights_only=True) refused {path}: it holds pickled objects other than tensors and plain "
            f"containers (for example a config class under 'cfg'), which Flow Lune will not unpickle. "
            f"Re-save the weights alone (torch.save({{'student': state_dict}}, ...)) or as safetensors. Details: {err}"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise ConversionError(f"cannot read {path} as a torch file (truncated or corrupt?): {err}") from err
    if not isinstance(data, dict):
        raise ConversionError(f"{path} holds a {type(data).__name__}, not a dict of tensors")
    return data


def sniff_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def open_weights(path: Path, allow_pickle: bool) -> SafetensorsReader | DictReader:
    """A reader over one weights file: safetensors, or a torch pickle of a flat dict of tensors."""
    if not path.is_file():
        raise ConversionError(f"{path} does not exist or is not a file")
    fmt = sniff_format(path)
    if fmt == "pickle":
        data = load_pickle(path, allow_pickle)
        if isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        return DictReader(_only_tensors(data, path), path)
    return SafetensorsReader(path)


def _only_tensors(data: dict, path: Path) -> dict[str, torch.Tensor]:
    others = [str(k) for k, v in data.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise ConversionError(f"{path} holds entries that are not tensors, {format_keys(others)}")
    return data
