"""The converter's file checks, for code that hands a single file to another loader (``from_single_file``).

diffusers' ``from_single_file`` reads a truncated file, a pickle, an SDXL or SD2 file or an epsilon
SD1.5 file as far as it can and then fails with a long traceback and a generic message (or, for an
epsilon file, does not fail at all and samples it as the wrong kind of model). These checks read only
the header (plus the few schedule buffers an LDM file may carry) and say in one message what the file
is and what to do instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConversionError
from .ldm_source import open_ldm_source
from .metadata import PREDICTION_TYPE_KEY, flow_shift
from .sfio import read_header, sniff_format
from .sources import describe_keys, resolve_path

FULL_COMPONENTS = {"unet", "vae", "text_encoder"}  # what a pipeline needs from a single file


@dataclass(frozen=True)
class SingleFileFacts:
    """What a checked single file is: its kind, its flow shift (None: not a Flow Lune file) and its header."""

    path: Path
    kind: str
    shift: float | None
    metadata: dict[str, str] = field(default_factory=dict)


class _HeaderKeys:
    """The reader interface ``describe_keys`` needs, from a header alone."""

    def __init__(self, header):
        self.path = header.path
        self.tensors = header.tensors


def check_flow_single_file(path: str | os.PathLike, *, declared_flow: bool = False) -> SingleFileFacts:
    """Check that ``path`` is a full SD1.5 original-layout safetensors file of a Flow Lune (flow) student.

    Refused, each with one ``ConversionError`` (a ``ValueError``) naming the file and the fix: a missing path or
    a folder; a pickle (whatever its name); a truncated or corrupt safetensors file; a file that is not SD1.5
    (SDXL, SD2, SD3, Flux, a diffusers-layout UNet); a UNet-only file; keys that belong to no SD1.5 component or a
    v-prediction marker; and a file whose header does not say it is a flow model (an epsilon SD1.5 file, or one
    without the Flow Lune header), unless ``declared_flow`` (the caller passes a flow scheduler itself).
    """
    path = resolve_path(path)
    if not path.exists():
        raise ConversionError(
            f"{path} does not exist; give the path of a .safetensors file written by flow-lune-convert"
        )
    if path.is_dir():
        raise ConversionError(
            f"{path} is a folder, not a single file; load a pipeline folder with FlowLunePipeline.from_pretrained"
        )
    if sniff_format(path) == "pickle":
        raise ConversionError(
            f"{path} is a pickle (torch.save) file, not safetensors, and loading a pickle can run code; if you trust "
            "it, convert it first: flow-lune-convert to-diffusers FILE FOLDER --allow-pickle, then from_pretrained"
        )
    header = read_header(path)  # truncated or corrupt: a ConversionError that says so
    what = describe_keys(_HeaderKeys(header))
    if what not in ("ldm", "ldm-unet-bare"):
        raise ConversionError(f"{path} is {what}; FlowLunePipeline loads only SD1.5 original-layout single files")
    source = open_ldm_source(path, ema="drop", allow_pickle=False)  # key accounting, as the converter does
    if not FULL_COMPONENTS <= source.components.keys():
        raise ConversionError(
            f"{path} is a UNet-only file (no VAE or text encoder); make a full file with flow-lune-convert "
            "to-single-file UNET DST --base SD15_FOLDER, or load the UNet into a pipeline yourself"
        )
    try:
        shift = flow_shift(header.metadata, str(path))
    except ConversionError as err:  # a flow header without a usable shift
        if not declared_flow:
            raise ConversionError(f"{err} (from Python: pass scheduler=FlowLuneScheduler(shift=S))") from err
        shift = None
    if shift is None and not declared_flow:
        said = header.metadata.get(PREDICTION_TYPE_KEY)
        label = f"{PREDICTION_TYPE_KEY} {said!r}" if said else "no Flow Lune header (no flow_lune.shift)"
        raise ConversionError(
            f"{path} is not a Flow Lune flow model: its header has {label}, so it is an epsilon SD1.5 model as far as "
            "anyone can tell. Load it with StableDiffusionPipeline.from_single_file and sample it in flow coordinates "
            "with FlowLunePipeline.from_teacher(pipe, shift=S); if it is a flow student saved without the header, "
            "pass scheduler=FlowLuneScheduler(shift=S)"
        )
    return SingleFileFacts(path, source.kind, shift, dict(header.metadata))


__all__ = ["SingleFileFacts", "check_flow_single_file"]
