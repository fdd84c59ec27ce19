"""What an output folder holds, read without torch: a finished run, an interrupted export, checkpoints, a user's files.

The trainer checks ``--output_dir`` with :func:`check_output_dir` while parsing its flags (before importing
torch), so a second run of the same command, an ``--overwrite_output_dir`` and a folder holding someone else's
files are each decided at once, with one line and nothing on disk changed.

The export (``export.py``) writes, in this order: ``export-plan.json`` (the export has begun: the files below
are this run's), ``pipeline/`` (renamed into place whole, model card inside), ``flow_lune.safetensors`` with its
two workflow files, and last ``run-complete.json``. A run killed anywhere in between is finished by running the
same command again (or with ``--resume_from_checkpoint latest``): ``pipeline/`` in place means training is done
and only the remaining files are written from it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

PIPELINE_DIRNAME = "pipeline"  # the FlowLunePipeline folder inside --output_dir
SINGLE_FILE_NAME = "flow_lune.safetensors"  # the LDM single file inside --output_dir
WORKFLOW_NAMES = ("flow_lune.workflow.json", "flow_lune.workflow-editor.json")  # beside it, API and editor format
EXPORT_NAMES = (PIPELINE_DIRNAME, SINGLE_FILE_NAME, *WORKFLOW_NAMES)  # what the export writes
PLAN_NAME = "export-plan.json"  # written first by the export: the files of EXPORT_NAMES present are this run's
COMPLETE_NAME = "run-complete.json"  # written last: the run and its export are complete
CHECKPOINT_PREFIX = "checkpoint-"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Flags that may differ between the first and a repeated run of "the same command": how to resume or restart,
# and the folder's own path (a run moved or copied elsewhere is still that run).
RERUN_IGNORED = ("resume_from_checkpoint", "overwrite_output_dir", "output_dir")


class TrainingFailed(RuntimeError):
    """A run that ended without a result worth exporting (e.g. no optimizer step taken); printed as one line."""


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """N for a folder named ``checkpoint-N``; None for anything else (``checkpoint-N.tmp`` included)."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders in ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def requested_arguments(args: Any) -> dict[str, Any]:
    """The flags as given (JSON-normal: lists, not tuples), for comparing one run's command with another's."""
    return json.loads(json.dumps(vars(args), default=str))


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object at ``path``, None when it is missing or unreadable (a marker is written atomically)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def differing_flags(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The flags whose values differ between two runs' requested arguments (``RERUN_IGNORED`` aside)."""
    keys = (set(old) | set(new)) - set(RERUN_IGNORED)
    return sorted(k for k in keys if old.get(k) != new.get(k))


def finished_run(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The completion record of a finished run in ``output_dir``, or None."""
    return read_json(Path(output_dir) / COMPLETE_NAME)


def interrupted_export(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The plan of an export that began and did not finish, or None."""
    root = Path(output_dir)
    if (root / COMPLETE_NAME).exists():
        return None
    return read_json(root / PLAN_NAME)


def check_output_dir(output_dir: str | os.PathLike, requested: dict[str, Any], resume: str | None, overwrite: bool):
    """ValueError when ``--output_dir`` cannot take this run; nothing is read beyond small JSON files.

    Allowed: a new or empty folder; a finished run or an interrupted export of the same flags (the trainer
    then says so and exits, or finishes the export); checkpoints with ``--resume_from_checkpoint``; anything
    with ``--overwrite_output_dir`` (the old folder is set aside, and deleted once the new run has started).
    """
    root = Path(output_dir)
    flag = f"--output_dir {str(root)!r}"
    if root.exists() and not root.is_dir():
        raise ValueError(f"{flag} is a file, not a folder; pass a folder path.")
    if overwrite or not root.is_dir():
        return
    exporting = interrupted_export(root) if (root / PIPELINE_DIRNAME).is_dir() else None  # training done
    for record, what in ((finished_run(root), "a finished run"), (exporting, "an interrupted export")):
        if record is None:
            continue
        differ = differing_flags(record.get("args", {}), requested)
        if differ:
            shown = ", ".join(f"--{k}" for k in differ[:6]) + (f" (+{len(differ) - 6} more)" if len(differ) > 6 else "")
            raise ValueError(
                f"{flag} holds {what} with other flags ({shown} differ); pass --overwrite_output_dir to replace it, "
                "or use a new --output_dir."
            )
        return
    ours = (root / PLAN_NAME).exists()  # an export that stopped before pipeline/: nothing of it is in place
    for name in EXPORT_NAMES:
        if (root / name).exists() and not ours:
            kind = "folder" if (root / name).is_dir() else "file"
            raise ValueError(
                f"{flag} already holds the {kind} {name!r}, which this run would write; move it away, "
                "pass --overwrite_output_dir to replace the whole folder, or use a new --output_dir."
            )
    if list_checkpoints(root) and resume is None:
        raise ValueError(
            f"{flag} holds checkpoints; pass --resume_from_checkpoint latest to continue that run, "
            "--overwrite_output_dir to start over, or use a new --output_dir."
        )


def set_aside(output_dir: str | os.PathLike) -> Path | None:
    """Rename a non-empty ``output_dir`` to ``<name>.overwritten-<time>.tmp`` and make it anew; the old one's path.

    Called once the flags are checked; the caller deletes the old folder (``shutil.rmtree``) once the new run
    has started, so a run that fails to start leaves the old one recoverable under that name.
    """
    root = Path(output_dir)
    if not root.is_dir() or not any(root.iterdir()):
        return None
    aside = root.with_name(f"{root.name}.overwritten-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.tmp")
    os.replace(root, aside)
    root.mkdir(parents=True)
    return aside


def remove_set_aside(aside: Path | None) -> None:
    """Delete the folder :func:`set_aside` moved away (the new run has started)."""
    if aside is not None and aside.exists():
        shutil.rmtree(aside)


def completion_message(output_dir: str | os.PathLike, record: dict[str, Any]) -> str:
    """What a repeated command prints: the run is complete, and where its outputs are."""
    root = Path(output_dir)
    files = [root / name for name in record.get("files", [PIPELINE_DIRNAME])]
    shown = ", ".join(str(p) for p in files if p.exists())
    return (
        f"{root} already holds the finished run of this command ({record.get('steps', '?')} steps): {shown}. "
        "Nothing to do; pass --overwrite_output_dir to train again from scratch."
    )
