"""Safetensors header metadata: ModelSpec keys (as kohya-ss/sd-scripts writes them) and Flow Lune's own.

ModelSpec has no architecture suffix for flow models that tools agree on, so the architecture
stays ``stable-diffusion-v1`` (what loaders match on) and the flow parameterisation goes in
``modelspec.prediction_type`` and the ``flow_lune.*`` keys.
"""

from __future__ import annotations

import datetime
import json

from .errors import ConversionError
from .hashing import PLACEHOLDER
from .recommendation import CFG_KEY, STEPS_KEY

MODELSPEC_VERSION = "1.0.0"
ARCHITECTURE = "stable-diffusion-v1"
IMPLEMENTATION = "https://github.com/CompVis/stable-diffusion"  # the LDM key layout of the file
PREDICTION_TYPE = "flow"  # rectified flow: v = eps - x0 on x_sigma = (1 - sigma) x0 + sigma eps
EPSILON = "epsilon"  # an SD1.5 teacher: eps_hat(x_t, t), what every SD1.5 loader assumes
PREDICTION_TYPES = (PREDICTION_TYPE, EPSILON)  # what to-single-file writes; v-prediction SD1.5 is out of scope
FLOW_CONVENTION = "x_sigma=(1-sigma)*x0+sigma*eps; output v=eps-x0; timestep=1000*sigma; sigma'=s*sigma/(1+(s-1)*sigma)"
SHIFT_KEY = "flow_lune.shift"
PREDICTION_TYPE_KEY = "modelspec.prediction_type"
SOURCE_HASH_KEY = "flow_lune.source_sha256"
SOURCE_FILES_KEY = "flow_lune.source_files"


def single_file_metadata(
    *,
    title: str,
    prediction_type: str = PREDICTION_TYPE,
    shift: float | None,
    cfg: float,
    steps: int,
    width: int,
    height: int,
    components: list[str],
    source_kind: str,
    source_names: list[str] | None,
    ema: str | None,
) -> dict[str, str]:
    """The ``__metadata__`` of a single file; the source hashes are placeholders filled in after writing.

    ``prediction_type`` ``flow``: a Flow Lune student, with ``flow_lune.shift``/``cfg``/``steps`` and the flow
    convention. ``epsilon``: a plain SD1.5 model (a teacher), with only the provenance keys
    (``flow_lune.version``/``components``/``source_*``/``ema``) and none of the flow ones, so that
    :func:`flow_shift` reads it as no Flow Lune student. ``source_names`` None: no source hash (``--no-source-hash``).
    """
    from flow_lune import __version__

    if prediction_type not in PREDICTION_TYPES:
        raise ConversionError(f"prediction type {prediction_type!r}: expected one of {', '.join(PREDICTION_TYPES)}")
    if (shift is None) != (prediction_type == EPSILON):
        raise ConversionError(f"shift {shift} with prediction type {prediction_type!r}: a shift belongs to flow only")
    if prediction_type == EPSILON:
        description = (
            "Epsilon-prediction SD1.5 model (e.g. the teacher of a Flow Lune student): sample it as any SD1.5 model "
            f"(DDIM, Euler, PNDM; cfg {cfg:g}); in ComfyUI load it plainly, without ModelSamplingSD3."
        )
    else:
        description = (
            f"Flow Lune rectified-flow SD1.5 student. Sample with flow-matching Euler, shift {shift:g}, cfg {cfg:g}; "
            f"in ComfyUI put ModelSamplingSD3(shift={shift:g}) after the loader (see the .workflow.json)."
        )
    meta = {
        "format": "pt",
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": ARCHITECTURE,
        "modelspec.implementation": IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.resolution": f"{width}x{height}",
        PREDICTION_TYPE_KEY: prediction_type,
        "modelspec.date": datetime.date.today().isoformat(),
        "modelspec.description": description,
        "flow_lune.version": __version__,
    }
    if prediction_type == PREDICTION_TYPE:
        meta |= {
            "flow_lune.prediction": FLOW_CONVENTION,
            SHIFT_KEY: repr(float(shift)),
            CFG_KEY: repr(float(cfg)),
            STEPS_KEY: str(int(steps)),
        }
    meta |= {
        "flow_lune.components": ",".join(components),
        "flow_lune.source_kind": source_kind,
        "flow_lune.ema": ema or "none",
    }
    return _with_source_hash(meta, source_names)


def _with_source_hash(meta: dict[str, str], source_names: list[str] | None) -> dict[str, str]:
    """``meta`` with the source-hash keys: placeholders of the final lengths, or "not computed"."""
    if source_names is None:
        meta[SOURCE_HASH_KEY] = "not computed"
    else:
        meta[SOURCE_HASH_KEY] = PLACEHOLDER
        meta[SOURCE_FILES_KEY] = json.dumps({name: PLACEHOLDER for name in source_names}, sort_keys=True)
    return meta


def hash_values(per_file: dict[str, str], combined: str) -> dict[str, str]:
    """The metadata values that replace the placeholders, of the same lengths."""
    return {SOURCE_HASH_KEY: combined, SOURCE_FILES_KEY: json.dumps(per_file, sort_keys=True)}


def flow_shift(metadata: dict[str, str], origin: str) -> float | None:
    """The shift a Flow Lune single file declares in its header, or None for a file that is not one.

    A file is a Flow Lune student when ``modelspec.prediction_type`` is ``flow`` and/or it carries
    ``flow_lune.shift`` (what :func:`single_file_metadata` writes). A flow file without a shift, an
    unreadable shift, or a shift beside another prediction type is an error that names ``--shift``.
    """
    prediction, raw = metadata.get(PREDICTION_TYPE_KEY), metadata.get(SHIFT_KEY)
    if raw is None:
        if prediction != PREDICTION_TYPE:
            return None
        raise ConversionError(
            f"{origin}: {PREDICTION_TYPE_KEY} is {PREDICTION_TYPE!r} but the header has no {SHIFT_KEY}; "
            "pass --shift S (the student's sigma shift) to say how to sample it"
        )
    if prediction is not None and prediction != PREDICTION_TYPE:
        raise ConversionError(
            f"{origin}: the header says {PREDICTION_TYPE_KEY} {prediction!r} but also carries {SHIFT_KEY} {raw!r}; "
            "pass --shift S if this is a Flow Lune student, or remove the flow_lune.* keys if it is not"
        )
    try:
        shift = float(raw)
    except ValueError:
        shift = float("nan")
    if not shift > 0 or shift == float("inf"):
        raise ConversionError(f"{origin}: header {SHIFT_KEY} {raw!r} is not a positive number; pass --shift S")
    return shift
