"""Every key accounted for: map a component's keys to the other layout, or say exactly which keys do not fit."""

from __future__ import annotations

from dataclasses import dataclass

from .architecture import expected_shapes
from .errors import ConversionError, format_keys
from .keymaps import KEY_PAIR_FUNCTIONS
from .sources import Component, TensorRef

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Planned:
    """One destination tensor: its key and shape in the target layout, and the source tensor that fills it."""

    key: str
    shape: Shape
    ref: TensorRef


def plan_component(comp: Component, config: dict, config_origin: str, target: str) -> list[Planned]:
    """Map every key of ``comp`` to ``target`` layout (``"ldm"`` or ``"diffusers"``), one to one, shapes checked.

    The expected keys come from ``config`` (built on the meta device); a source key that maps
    nowhere, a destination key left empty, or a shape other than the config's is an error that
    lists the keys. LDM keys are given without their component prefix.
    """
    if target not in ("ldm", "diffusers"):
        raise ConversionError(f"unknown target layout {target!r}; expected 'ldm' or 'diffusers'")
    shapes = expected_shapes(comp.name, config)
    pairs = KEY_PAIR_FUNCTIONS[comp.name](config, shapes)
    from_ldm = comp.layout == "ldm"
    by_source = {(p.ldm if from_ldm else p.diffusers): p for p in pairs}
    missing = [k for k in by_source if k not in comp.tensors]
    extra = [k for k in comp.tensors if k not in by_source]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {format_keys(missing)}")
        if extra:
            parts.append(f"unexpected {format_keys(extra)}")
        raise ConversionError(
            f"the {comp.name} of {comp.origin} ({comp.layout} layout) does not match its config "
            f"({config_origin}): " + "; ".join(parts) + ". Every key must map to exactly one destination key; "
            "if the model is not SD1.5-sized, pass --config with a diffusers folder of its architecture"
        )
    planned, wrong = [], []
    for key, ref in comp.tensors.items():
        pair = by_source[key]
        source_shape = pair.ldm_shape if from_ldm else pair.diffusers_shape
        target_shape = pair.ldm_shape if target == "ldm" else pair.diffusers_shape
        # A linear map stored as a 1x1 conv (or the reverse) is the same tensor; any other shape is wrong.
        allowed = {pair.ldm_shape, pair.diffusers_shape}
        if ref.shape != source_shape and ref.shape not in allowed:
            wrong.append(f"{key} {list(ref.shape)} (expected {list(source_shape)})")
        out_key = pair.ldm if target == "ldm" else pair.diffusers
        planned.append(Planned(out_key, target_shape, ref))
    if wrong:
        raise ConversionError(
            f"the {comp.name} of {comp.origin} has tensors of the wrong shape for its config ({config_origin}), "
            f"{format_keys(wrong)}; pass --config with a diffusers folder of this architecture"
        )
    return planned


def read_position(p: Planned) -> tuple[str, int]:
    """Sort key that puts tensors in the order their bytes sit in the source files (sequential reading)."""
    info = getattr(p.ref.reader, "tensors", {}).get(p.ref.key)
    return (str(getattr(p.ref.reader, "path", "")), getattr(info, "start", 0))
