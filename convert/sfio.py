"""Safetensors read and write, one tensor at a time.

The reader checks the header itself (so a truncated or corrupt file is named as such) and reads
tensors through ``safe_open``. The writer lays out the header first (8-byte little-endian length,
JSON with dtype/shape/data_offsets and ``__metadata__``, padded with spaces to 8 bytes) and then
streams the tensors in order, so that memory stays at about one tensor whatever the file size
(``safetensors.torch.save_file`` needs every tensor in memory at once).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .errors import ConversionError, format_keys

Shape = tuple[int, ...]

DTYPE_TO_STR = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
STR_TO_DTYPE = {v: k for k, v in DTYPE_TO_STR.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces
PICKLE_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip container
PICKLE_PROTO_BYTE = 0x80  # first byte of a protocol-2+ pickle (legacy torch.save)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors header: where its bytes are and what they hold."""

    dtype: torch.dtype
    shape: Shape
    start: int  # offset of the first byte, from the start of the file
    end: int


@dataclass
class SafetensorsHeader:
    """A parsed and checked safetensors header."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    header_bytes: int = 0


def sniff_format(path: str | os.PathLike) -> str:
    """``"safetensors"``, ``"pickle"`` (torch.save, zip or legacy) or ``"unknown"``, from the first bytes.

    The safetensors test comes first: a safetensors file starts with its header length (8 bytes, little
    endian) and then ``{``, and about one header length in 256 starts with the byte 0x80 that also opens
    a protocol-2+ pickle. A pickle's first 8 bytes read as a length are far beyond any header size (or are
    not followed by ``{``), so testing the safetensors form first never takes a pickle for safetensors.
    """
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= MAX_HEADER_BYTES:
            return "safetensors"
    if head.startswith(PICKLE_ZIP_MAGIC) or (len(head) > 1 and head[0] == PICKLE_PROTO_BYTE and head[1] <= 5):
        return "pickle"
    return "unknown"


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and check the header of a safetensors file; a ConversionError says what is wrong with it."""
    path = Path(path)
    size = path.stat().st_size
    fmt = sniff_format(path)
    if fmt == "pickle":
        raise ConversionError(
            f"{path} is a pickle (torch.save) file, not safetensors, whatever its name says; "
            "it can run code when loaded. Pass --allow-pickle to read it with torch.load(weights_only=True)"
        )
    bad = f"{path} is not a valid safetensors file (truncated or corrupt)"
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise ConversionError(f"{bad}: only {size} bytes")
        (n,) = struct.unpack("<Q", raw_len)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise ConversionError(f"{bad}: header length {n} does not fit in {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(f"{bad}: header is not JSON ({err})") from err
    if not isinstance(header, dict):
        raise ConversionError(f"{bad}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    tensors, problems, spans = {}, [], []
    for key, entry in header.items():
        try:
            dtype = STR_TO_DTYPE[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            problems.append(key)
            continue
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            problems.append(key)
            continue
        tensors[key] = TensorInfo(dtype, shape, data_start + begin, data_start + end)
        spans.append((begin, end))
    if problems:
        raise ConversionError(f"{bad}: entries with bad dtype, shape or offsets, {format_keys(problems)}")
    spans.sort()
    cursor = 0
    for begin, end in spans:
        if begin != cursor:
            raise ConversionError(f"{bad}: tensor data has a gap or overlap at byte {data_start + begin}")
        cursor = end
    if data_start + cursor != size:
        raise ConversionError(f"{bad}: header describes {data_start + cursor} bytes, the file has {size}")
    return SafetensorsHeader(path, tensors, {str(k): str(v) for k, v in metadata.items()}, n)


class SafetensorsReader:
    """The tensors of one safetensors file, read one at a time through ``safe_open``.

    ``safe_open`` maps the file; tensors it returns are views of the mapping, and the pages a
    conversion touches stay resident while the mapping lives. The handle is therefore reopened
    after every ``REMAP_BYTES`` served, so that the resident share of the source stays bounded.
    """

    REMAP_BYTES = 64 * 1024 * 1024  # resident source pages at most about this much (plus one tensor)

    def __init__(self, path: str | os.PathLike):
        self.header = read_header(path)
        self.path = self.header.path
        self._served = 0
        self._handle = self._open()

    def _open(self):
        try:
            return safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as err:  # safetensors raises its own SafetensorError
            raise ConversionError(f"{self.path} is not a valid safetensors file: {err}") from err

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.header.tensors

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    def get(self, key: str) -> torch.Tensor:
        info = self.header.tensors[key]
        if self._served > self.REMAP_BYTES:
            self._handle, self._served = self._open(), 0
        self._served += info.end - info.start
        return self._handle.get_tensor(key)


@dataclass
class OutTensor:
    """One tensor to write: its key, what it will be, and how to get it when its turn comes."""

    key: str
    dtype: torch.dtype
    shape: Shape
    fetch: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def header_bytes(entries: list[OutTensor], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and the JSON header, padded with spaces to a multiple of 8 as safetensors does."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for e in entries:
        header[e.key] = {
            "dtype": DTYPE_TO_STR[e.dtype],
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(
    path: str | os.PathLike,
    entries: list[OutTensor],
    metadata: dict[str, str],
    progress: Callable[[int], None] | None = None,
    patch: Callable[[], dict[str, str]] | None = None,
) -> None:
    """Write ``entries`` to ``path`` (a new file) one tensor at a time.

    ``patch``, called after the data is written, returns metadata values to fill in that were only
    known at the end (a hash of the source); each must have the length of its placeholder in
    ``metadata``, so that the header's size does not change.
    """
    keys = [e.key for e in entries]
    if len(set(keys)) != len(keys):
        dupes = {k for k in keys if keys.count(k) > 1}
        raise ConversionError(f"two tensors would be written under one key, {format_keys(dupes)}")
    head = header_bytes(entries, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for e in entries:
            tensor = e.fetch()
            if tensor.dtype != e.dtype:
                tensor = tensor.to(e.dtype)
            if tuple(tensor.shape) != e.shape:
                tensor = tensor.reshape(e.shape)
            f.write(tensor_bytes(tensor))
            del tensor
            if progress is not None:
                progress(e.nbytes)
        if patch is not None:
            _patch_metadata(f, head, metadata, patch())


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of ``tensor``, without a copy when it is contiguous."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def _patch_metadata(f, head: bytes, metadata: dict[str, str], values: dict[str, str]) -> None:
    for key, value in values.items():
        old = json.dumps({key: metadata[key]}, separators=(",", ":"))[1:-1].encode()
        new = json.dumps({key: value}, separators=(",", ":"))[1:-1].encode()
        at = head.find(old)
        if len(old) != len(new) or at < 0:
            raise ConversionError(f"internal: metadata placeholder for {key!r} not found or of another length")
        f.seek(at)
        f.write(new)
        metadata[key] = value
    f.seek(0, os.SEEK_END)


def verify_written(path: str | os.PathLike, entries: Iterable[OutTensor], metadata: dict[str, str]) -> None:
    """Re-open ``path`` and check that every key, dtype, shape and metadata value is what was planned."""
    entries = list(entries)
    header = read_header(path)
    planned = {e.key: (e.dtype, e.shape) for e in entries}
    found = {k: (t.dtype, t.shape) for k, t in header.tensors.items()}
    if planned.keys() != found.keys():
        raise ConversionError(
            f"written file {path} does not hold the planned keys: "
            f"missing {format_keys(planned.keys() - found.keys())}; "
            f"extra {format_keys(found.keys() - planned.keys())}"
        )
    wrong = [k for k in planned if planned[k] != found[k]]
    if wrong:
        raise ConversionError(f"written file {path} has wrong dtype or shape for {format_keys(wrong)}")
    if header.metadata != metadata:
        raise ConversionError(f"written file {path} has metadata other than planned")
    with safe_open(str(path), framework="pt") as handle:
        if set(handle.keys()) != planned.keys():
            raise ConversionError(f"safetensors reads other keys from {path} than were written")
        for key in planned:
            sl = handle.get_slice(key)
            if tuple(sl.get_shape()) != planned[key][1]:
                raise ConversionError(f"safetensors reads another shape for {key} in {path}")
