"""The source's content hash, computed in a background thread while the conversion streams.

One file: its sha256 (what ``sha256sum`` prints). Several files: the sha256 of the manifest
``"<sha256>  <relative path>\\n"`` sorted by path, so ``sha256sum`` on the files reproduces it.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

CHUNK_BYTES = 8 * 1024 * 1024  # large enough that hashlib releases the GIL and syscalls are few
PLACEHOLDER = "0" * 64  # the length of a sha256 hex digest


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


class BackgroundHasher:
    """Hash ``files`` in a daemon thread; :meth:`result` waits and returns ``{name: sha256}``."""

    def __init__(self, files: list[Path], names: list[str]):
        self._files, self._names = files, names
        self._result: dict[str, str] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="flow-lune-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for f, name in zip(self._files, self._names):
                self._result[name] = file_sha256(f)
        except BaseException as err:  # reported by result() in the caller's thread
            self._error = err

    def result(self) -> dict[str, str]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return dict(self._result)
