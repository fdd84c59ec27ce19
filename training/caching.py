"""Content-keyed caches of tensors on disk: safetensors shards plus a JSON manifest, written atomically.

A cache is a folder ``<cache_dir>/<kind>-<hash>`` where ``hash`` is the SHA-256 of a JSON *key* that
names everything the content depends on (source identity, model weights digests, resolution, seeds...).
A different key gives a different folder, so a changed setting is a rebuild, never a stale reuse.

Layout::

    <kind>-<hash>/
        manifest.json            key, row counts, and the size and SHA-256 of every other file
        <name>-00000.safetensors one tensor ``<name>`` per shard, rows along dim 0
        <file>.json              small JSON side files (prompt lists)

A cache is built in a temporary sibling folder and renamed into place when complete, and the manifest
is the last file written. On open every file's size and SHA-256 are checked against the manifest: a
partial or corrupt folder is reported as invalid (and then rebuilt by the caller), never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flow_lune.convert.hashing import file_sha256

logger = logging.getLogger(__name__)

CACHE_FORMAT = "flow_lune-cache"
CACHE_VERSION = 1  # bump when the layout or the meaning of a cached tensor changes
SHARD_BYTES = 256 * 2**20  # ~256 MiB per shard: few files, yet no single huge read
_DIGEST_SAMPLES = 4096  # values read per weight tensor for a weights digest: cheap, yet any fine-tune changes them


def key_hash(key: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``key`` (sorted keys, no whitespace)."""
    text = json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def folder_listing_digest(folder: str | os.PathLike) -> str:
    """SHA-256 over every file below ``folder``: relative path, size and modification time (ns).

    Reading only metadata keeps this cheap for large image folders; any edited, added, removed or
    touched file changes it.
    """
    folder = Path(folder)
    h = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            st = path.stat()
            h.update(f"{path.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@torch.no_grad()
def module_digest(module: torch.nn.Module) -> str:
    """SHA-256 over a module's state dict: names, shapes, dtypes and up to 4096 evenly spaced values each.

    Hashing every byte of an SD1.5 UNet costs seconds; a strided sample of each tensor identifies a
    checkpoint just as well in practice (any fine-tune moves essentially every weight).
    """
    h = hashlib.sha256(type(module).__name__.encode())
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _DIGEST_SAMPLES)
        sample = flat[::step][:_DIGEST_SAMPLES].to("cpu", torch.float64)
        h.update(f"{name}\0{tuple(tensor.shape)}\0{tensor.dtype}\0".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """SHA-256 of a tokenizer's class, vocabulary and maximum length."""
    vocab = sorted(tokenizer.get_vocab().items())
    text = json.dumps([type(tokenizer).__name__, tokenizer.model_max_length, vocab], ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_folder(cache_dir: str | os.PathLike, kind: str, key: Mapping[str, Any]) -> Path:
    """Where the cache of ``kind`` with this ``key`` lives: ``<cache_dir>/<kind>-<first 16 hex of the hash>``."""
    return Path(cache_dir) / f"{kind}-{key_hash(key)[:16]}"


@dataclass
class CacheEntry:
    """A complete cache folder whose files all matched its manifest."""

    path: Path
    manifest: dict

    @property
    def num_rows(self) -> int:
        return int(self.manifest["num_rows"])

    @property
    def meta(self) -> dict:
        return self.manifest.get("meta", {})

    def shards(self, name: str) -> list[tuple[Path, int]]:
        """The shard files of tensor ``name`` with their row counts, in order."""
        return [(self.path / s["file"], int(s["rows"])) for s in self.manifest["tensors"][name]]

    def read_json(self, name: str) -> Any:
        return json.loads((self.path / name).read_text(encoding="utf-8"))

    def load_tensor(self, name: str) -> torch.Tensor:
        """All rows of tensor ``name`` concatenated in memory (for small tensors)."""
        parts = []
        for path, _ in self.shards(name):
            with safe_open(str(path), framework="pt") as f:
                parts.append(f.get_tensor(name))
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def open_cache(path: str | os.PathLike, key: Mapping[str, Any]) -> CacheEntry | None:
    """The cache at ``path`` if it is complete, has this ``key`` and every file checks out; else ``None``.

    The reason a present folder is rejected is logged at warning level.
    """
    path = Path(path)
    if not path.exists():
        return None
    reason = _invalid_reason(path, key)
    if reason is not None:
        logger.warning("Cache %s is not usable (%s); it will be rebuilt.", path, reason)
        return None
    return CacheEntry(path=path, manifest=json.loads((path / "manifest.json").read_text(encoding="utf-8")))


def _invalid_reason(path: Path, key: Mapping[str, Any]) -> str | None:
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return "no manifest.json: an interrupted or foreign folder"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"unreadable manifest.json: {err}"
    if manifest.get("format") != CACHE_FORMAT or manifest.get("version") != CACHE_VERSION:
        return f"format {manifest.get('format')!r} version {manifest.get('version')!r}, expected {CACHE_VERSION}"
    if manifest.get("key_hash") != key_hash(key):
        return "its key differs from the requested one"
    for name, info in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"missing file {name}"
        if file.stat().st_size != info["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {info['bytes']}"
        if file_sha256(file) != info["sha256"]:
            return f"{name} does not match its SHA-256"
    for name, shards in manifest.get("tensors", {}).items():
        if sum(int(s["rows"]) for s in shards) != manifest.get(f"num_rows_{name}"):
            return f"tensor {name}'s shards do not add up to the manifest's row count"
    return None


def _file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


class CacheWriter:
    """Builds a cache in a temporary sibling folder; ``commit()`` writes the manifest and renames it into place.

    Used as a context manager: leaving the block with an exception removes the temporary folder and
    leaves any existing folder untouched.
    """

    def __init__(self, path: str | os.PathLike, key: Mapping[str, Any], shard_bytes: int = SHARD_BYTES):
        self.path = Path(path)
        self.key = dict(key)
        self.shard_bytes = shard_bytes
        self.tmp = self.path.parent / f".tmp-{self.path.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._pending: dict[str, list[torch.Tensor]] = {}
        self._pending_rows: dict[str, int] = {}
        self._shards: dict[str, list[dict]] = {}
        self._rows: dict[str, int] = {}
        self._files: list[str] = []
        self._committed = False

    def __enter__(self) -> CacheWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._committed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def add_rows(self, name: str, rows: torch.Tensor) -> None:
        """Append ``rows`` (first dim = rows) to tensor ``name``; full shards are written as they fill."""
        rows = rows.detach().to("cpu").contiguous()
        self._pending.setdefault(name, []).append(rows)
        self._pending_rows[name] = self._pending_rows.get(name, 0) + rows.shape[0]
        bytes_per_row = rows[0].numel() * rows.element_size() if rows.shape[0] else 1
        rows_per_shard = max(1, self.shard_bytes // max(1, bytes_per_row))
        while self._pending_rows[name] >= rows_per_shard:
            self._flush(name, rows_per_shard)

    def _flush(self, name: str, max_rows: int | None = None) -> None:
        if not self._pending.get(name):
            return
        data = torch.cat(self._pending[name])
        take = data.shape[0] if max_rows is None else min(max_rows, data.shape[0])
        shard, rest = data[:take].contiguous(), data[take:]
        self._pending[name] = [rest] if rest.shape[0] else []
        self._pending_rows[name] = rest.shape[0]
        index = len(self._shards.setdefault(name, []))
        file = f"{name}-{index:05d}.safetensors"
        save_file({name: shard}, str(self.tmp / file), metadata={"format": CACHE_FORMAT})
        self._shards[name].append({"file": file, "rows": take})
        self._rows[name] = self._rows.get(name, 0) + take
        self._files.append(file)

    def write_json(self, name: str, obj: Any) -> None:
        """A small JSON side file (e.g. the prompt list), checked like the shards."""
        (self.tmp / name).write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
        self._files.append(name)

    def commit(self, num_rows: int, meta: Mapping[str, Any] | None = None) -> CacheEntry:
        """Write the last shards and the manifest, then move the folder to its final name.

        A folder already at the final name (a corrupt or partial cache that ``open_cache`` rejected)
        is removed just before the rename; a valid one is never replaced, since its key would match.
        """
        for name in list(self._pending):
            self._flush(name)
        manifest = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "key_hash": key_hash(self.key),
            "key": self.key,
            "num_rows": num_rows,
            **{f"num_rows_{name}": rows for name, rows in self._rows.items()},
            "tensors": self._shards,
            "files": {f: _file_record(self.tmp / f) for f in self._files},
            "meta": dict(meta or {}),
        }
        tmp_manifest = self.tmp / "manifest.json.tmp"
        tmp_manifest.write_text(json.dumps(manifest, indent=1, ensure_ascii=False, default=str), encoding="utf-8")
        os.replace(tmp_manifest, self.tmp / "manifest.json")
        if self.path.exists():
            logger.warning("Replacing the unusable cache folder %s.", self.path)
            shutil.rmtree(self.path)
        os.replace(self.tmp, self.path)
        self._committed = True
        return CacheEntry(path=self.path, manifest=manifest)


__all__ = [
    "CACHE_FORMAT",
    "CACHE_VERSION",
    "CacheEntry",
    "CacheWriter",
    "cache_folder",
    "file_sha256",
    "folder_listing_digest",
    "key_hash",
    "module_digest",
    "open_cache",
    "tokenizer_digest",
]


class ShardedRows:
    """Row ``i`` of a tensor stored across safetensors shards, read lazily through memory maps.

    File handles are opened on first use in each process and dropped when pickled, so the object
    can be sent to DataLoader workers under any start method.
    """

    def __init__(self, name: str, shards: Sequence[tuple[Path, int]]):
        self.name = name
        self.files = [str(path) for path, _ in shards]
        self.starts = np.cumsum([0] + [rows for _, rows in shards])
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> torch.Tensor:
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        if s not in self._handles:
            self._handles[s] = safe_open(self.files[s], framework="pt")
        j = i - int(self.starts[s])
        return self._handles[s].get_slice(self.name)[j : j + 1][0]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}
