"""Checks of what a user hands to ``FlowLunePipeline.from_pretrained`` / ``from_single_file``, before diffusers.

diffusers answers a missing local folder with "neither a valid local path nor a valid repo id" (or,
offline, with a message about the Hub cache), and a bad single file with a long traceback. These
helpers decide whether an argument means a local path and, if it does, say plainly what is wrong.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "owner/name", as the Hub spells them
URL_PREFIXES = ("http://", "https://", "hf://")
MAX_LISTED = 12  # entries of the nearest existing folder shown in the message: enough to spot the right one


def is_url(name: str | os.PathLike) -> bool:
    """Whether ``name`` is a URL (which diffusers resolves on the Hub), not a local path."""
    return isinstance(name, str) and name.startswith(URL_PREFIXES)


def looks_local(name: str | os.PathLike) -> bool:
    """Whether ``name`` can only mean a local path: a ``PathLike``, an absolute or ``./``, ``../``, ``~`` path,
    more than one ``/``, a backslash, characters a repo id cannot have, or a first part that exists here."""
    if not isinstance(name, str):
        return True
    if name.startswith(("/", "./", "../", "~", ".\\")) or os.path.isabs(name) or "\\" in name:
        return True
    if not REPO_ID.match(name):
        return True
    first = name.split("/", 1)[0]
    return "/" in name and os.path.isdir(first)  # "out/pipeline" with ./out here means the local folder


def nearest_existing(path: Path) -> Path | None:
    """The closest ancestor of ``path`` that exists, or None."""
    for parent in path.absolute().parents:
        if parent.is_dir():
            return parent
    return None


def _listing(folder: Path) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    shown = ", ".join(names[:MAX_LISTED]) + (f", ... ({len(names)} entries)" if len(names) > MAX_LISTED else "")
    return shown or "nothing"


def missing_folder_message(name: str | os.PathLike) -> str:
    """One message for a pipeline folder that does not exist: its absolute path, what is there, and the fix."""
    path = Path(name).expanduser()
    parent = nearest_existing(path)
    where = f"; the nearest existing folder, {parent}, holds {_listing(parent)}" if parent is not None else ""
    return (
        f"{str(name)!r} does not exist (no folder {path.absolute()}){where}. Give the folder of a saved "
        "FlowLunePipeline: the trainer writes it to OUTPUT_DIR/pipeline when a run finishes, and "
        "flow-lune-convert to-diffusers FILE FOLDER makes one from a single file; or a Hub repo id"
    )


def check_pretrained_path(name: str | os.PathLike) -> Path | None:
    """The local folder ``name`` means (None when it can only be a Hub repo id); ``ValueError`` when it is not one.

    A path that looks local and does not exist, a file (a single file loads through ``from_single_file``) and a
    folder without ``model_index.json`` are each refused with the path and the fix.
    """
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"pretrained_model_name_or_path must be a folder or a repo id, got {type(name).__name__}")
    if is_url(name):
        return None
    path = Path(name).expanduser()
    if not path.exists():
        if looks_local(name):
            raise ValueError(missing_folder_message(name))
        return None
    if path.is_file():
        raise ValueError(
            f"{path} is a file, not a pipeline folder; load a single file with "
            "FlowLunePipeline.from_single_file(path, config=LOCAL_PIPELINE_FOLDER)"
        )
    if not (path / "model_index.json").is_file():
        inside = sorted(p.parent for p in path.glob("*/model_index.json"))
        if inside:
            raise ValueError(
                f"{path} is a folder without model_index.json; the pipeline is in {inside[0]}: load that folder"
            )
        raise ValueError(
            f"{path} is a folder without model_index.json, so not a saved pipeline (it holds {_listing(path)}). "
            "The trainer's pipeline is OUTPUT_DIR/pipeline; a checkpoint-N/unet folder is a UNet alone "
            "(UNet2DConditionModel.from_pretrained)"
        )
    return path


__all__ = ["check_pretrained_path", "is_url", "looks_local", "missing_folder_message"]
