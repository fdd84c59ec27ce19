"""The sampling recommendation a source carries, read back by the converter.

The trainer's export writes one recommendation (steps, guidance, shift: ``flow_lune.settings``, one per recipe)
into the model card's YAML header (``flow_lune_sampling``), the single file's header (``flow_lune.steps``,
``flow_lune.cfg``, ``flow_lune.shift``) and the ComfyUI workflow. ``to-single-file`` takes steps and guidance from
a pipeline folder's card or a UNet file's header, ``to-diffusers`` carries a file's header into the card of the
folder it writes, so a round trip keeps them. A source without one gets SD1.5's default (not measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConversionError

CARD_SAMPLING_KEY = "flow_lune_sampling"  # the model card's YAML key: {steps, guidance_scale, shift, basis}
STEPS_KEY = "flow_lune.steps"  # the single file's header keys (convert/metadata.py writes them)
CFG_KEY = "flow_lune.cfg"
CARD_NAME = "README.md"  # a pipeline folder's model card, as diffusers and the Hub name it


@dataclass(frozen=True)
class SourceSampling:
    """Steps and guidance read from a source, and where they were read."""

    steps: int
    cfg: float
    origin: str


def _checked(steps: Any, cfg: Any, origin: str) -> SourceSampling:
    """``SourceSampling`` for steps >= 1 (a whole number) and a finite cfg >= 0; ConversionError otherwise."""
    ok_steps = isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1
    ok_cfg = isinstance(cfg, (int, float)) and not isinstance(cfg, bool) and math.isfinite(cfg) and cfg >= 0
    if not (ok_steps and ok_cfg):
        raise ConversionError(
            f"{origin} recommends steps {steps!r} and cfg {cfg!r}: need a whole number of steps >= 1 and a finite "
            "cfg >= 0; correct it, or pass --steps and --cfg to choose them yourself"
        )
    return SourceSampling(steps, float(cfg), origin)


def card_sampling(folder: Path) -> SourceSampling | None:
    """The recommendation in ``folder/README.md``'s YAML header (``flow_lune_sampling``), or None without one."""
    card = Path(folder) / CARD_NAME
    if not card.is_file():
        return None
    import yaml
    from huggingface_hub import metadata_load

    origin = f"the model card {card}"
    try:
        data = metadata_load(card)
    except yaml.YAMLError as err:
        raise ConversionError(
            f"{origin} has a YAML header that does not parse ({type(err).__name__}); fix it, or pass --steps and --cfg"
        ) from None
    entry = data.get(CARD_SAMPLING_KEY) if isinstance(data, dict) else None
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise ConversionError(
            f"{origin}: {CARD_SAMPLING_KEY} is {entry!r}, not a mapping; fix it, or pass --steps and --cfg"
        )
    return _checked(entry.get("steps"), entry.get("guidance_scale"), f"{origin} ({CARD_SAMPLING_KEY})")


def header_sampling(metadata: dict[str, str], origin: str) -> SourceSampling | None:
    """The recommendation in a safetensors header (``flow_lune.steps`` and ``flow_lune.cfg``), or None without."""
    raw_steps, raw_cfg = metadata.get(STEPS_KEY), metadata.get(CFG_KEY)
    if raw_steps is None and raw_cfg is None:
        return None
    where = f"the header of {origin} ({STEPS_KEY}, {CFG_KEY})"
    try:
        steps, cfg = int(raw_steps), float(raw_cfg)
    except (TypeError, ValueError):
        steps, cfg = raw_steps, raw_cfg  # _checked names them
    return _checked(steps, cfg, where)


def sampling_card_text(title: str, steps: int, cfg: float, shift: float, origin: str) -> str:
    """A short model card for a folder written by ``to-diffusers``: the YAML header with ``flow_lune_sampling``
    (what ``to-single-file`` reads back) and one paragraph saying where the numbers come from."""
    import yaml

    data = {
        "library_name": "diffusers",
        "tags": ["flow-lune", "rectified-flow"],
        CARD_SAMPLING_KEY: {"steps": int(steps), "guidance_scale": float(cfg), "shift": float(shift), "basis": ""},
    }
    header = yaml.safe_dump(data, sort_keys=False)
    return (
        f"---\n{header}---\n\n# {title}\n\nA Flow Lune rectified-flow student, converted by `flow-lune-convert "
        f"to-diffusers` from `{origin}`. **Sampling:** {int(steps)} Euler steps, guidance {cfg:g}, shift {shift:g}, "
        "as that file's header recommends. Load it with `flow_lune.FlowLunePipeline.from_pretrained`.\n"
    )
