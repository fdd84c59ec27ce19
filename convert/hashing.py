"""The source's content hash, computed from the bytes the conversion reads anyway.

One file: its sha256 (what ``sha256sum`` prints). Several files: the sha256 of the manifest
``"<sha256>  <relative path>\\n"`` sorted by path, so ``sha256sum`` on the files reproduces it.

A safetensors source is read tensor by tensor in file order, so its sha256 is the header bytes
followed by each tensor's bytes as the writer fetches it, fed to a worker thread (hashlib releases
the GIL) while the main thread writes: no second pass over the file. A file that is not read
whole and in order (a pickle, a ``--base`` file of which only some components are used) is hashed
with a separate read at the end.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import torch

CHUNK_BYTES = 8 * 1024 * 1024  # large enough that hashlib releases the GIL and syscalls are few
PLACEHOLDER = "0" * 64  # the length of a sha256 hex digest
QUEUE_DEPTH = 8  # tensors waiting to be hashed; they are views of the source mapping, not copies


def file_sha256(path: Path, chunk: int = CHUNK_BYTES) -> str:
    """sha256 of one file, read in chunks into one reused buffer."""
    digest = hashlib.sha256()
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def relative_names(files: list[Path], root: Path) -> list[str]:
    """Names of ``files`` relative to ``root`` (or the bare name), as they appear in the manifest."""
    names = []
    for f in files:
        try:
            names.append(f.resolve().relative_to(root.resolve()).as_posix())
        except ValueError:
            names.append(f.name)
    return names


def combined_sha256(per_file: dict[str, str]) -> str:
    """The file's own hash for one file; else the sha256 of the sorted ``sha256sum``-style manifest."""
    if len(per_file) == 1:
        return next(iter(per_file.values()))
    manifest = "".join(f"{digest}  {name}\n" for name, digest in sorted(per_file.items()))
    return hashlib.sha256(manifest.encode("utf-8")).hexdigest()


class _FileState:
    """Running sha256 of one safetensors file, valid while its tensors arrive in file order."""

    def __init__(self, path: Path, header_len: int, size: int):
        self.path, self.size = path, size
        self.digest = hashlib.sha256()
        with open(path, "rb") as f:
            self.digest.update(f.read(8 + header_len))
        self.next_offset = 8 + header_len
        self.in_order = True


class SourceHasher:
    """sha256 of the source files, fed by the fetches that :meth:`wrap` returns; :meth:`result` gives them."""

    def __init__(self, files: list[Path], names: list[str]):
        from .sfio import read_header

        self._names = dict(zip((f.resolve() for f in files), names))
        self._states: dict[Path, _FileState] = {}
        for f in self._names:
            try:
                header = read_header(f)
            except Exception:  # a pickle: hashed with a read at the end
                continue
            self._states[f] = _FileState(f, header.header_bytes, f.stat().st_size)
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="flow-lune-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            state, view = item
            try:
                state.digest.update(view)
            except BaseException as err:  # reported by result() in the caller's thread
                self._error = err

    def wrap(self, reader, key: str, fetch: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """``fetch`` that also hands the source tensor's bytes to the hash of its file."""
        path = Path(getattr(reader, "path", "")).resolve()
        state = self._states.get(path)
        info = getattr(reader, "tensors", {}).get(key)
        if state is None or info is None or not hasattr(info, "start"):
            return fetch

        def fetch_and_hash() -> torch.Tensor:
            tensor = fetch()
            if state.in_order and info.start == state.next_offset:
                from .sfio import tensor_bytes

                self._queue.put((state, tensor_bytes(tensor)))
                state.next_offset = info.end
            else:
                state.in_order = False
            return tensor

        return fetch_and_hash

    def result(self) -> dict[str, str]:
        """Wait for the worker, then ``{name: sha256}``; files not streamed whole are read once more."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        out = {}
        for path, name in self._names.items():
            state = self._states.get(path)
            if state is not None and state.in_order and state.next_offset == state.size:
                out[name] = state.digest.hexdigest()
            else:
                out[name] = file_sha256(path)
        return out

    def close(self) -> None:
        """Stop the worker without a result (after an error)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
