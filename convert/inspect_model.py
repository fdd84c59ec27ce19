"""Say what a file or folder is, and whether its UNet is the same as a reference's."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .accounting import plan_component
from .configs import builtin_config, folder_config
from .errors import ConversionError
from .keymaps import LDM_PREFIXES
from .ldm_source import open_ldm_source
from .sfio import read_header, sniff_format
from .sources import (
    EARLIER_TRAINER_KEYS,
    EMA_PREFIX,
    LDM_SCHEDULE_KEYS,
    PREDICTION_MARKERS,
    Component,
    _numel,
    describe_keys,
    earlier_trainer_source,
    is_pipeline_folder,
    open_diffusers_source,
    resolve_path,
)
from .weight_files import DictReader, load_pickle


@dataclass
class UnetComparison:
    """A tensor-by-tensor comparison of two UNets in diffusers layout."""

    reference: str
    identical: int
    different: int
    max_abs_diff: float
    only_here: list[str] = field(default_factory=list)
    only_in_reference: list[str] = field(default_factory=list)

    @property
    def same(self) -> bool:
        return self.different == 0 and not self.only_here and not self.only_in_reference

    def verdict(self) -> str:
        if self.same:
            return f"UNet IDENTICAL to the reference {self.reference} ({self.identical} tensors equal)"
        parts = [
            f"{self.different} of {self.identical + self.different} tensors differ (max |diff| {self.max_abs_diff:.3g})"
        ]
        if self.only_here or self.only_in_reference:
            parts.append(f"{len(self.only_here)} keys only here, {len(self.only_in_reference)} only in the reference")
        return f"UNet DIFFERS from the reference {self.reference}: " + "; ".join(parts)


@dataclass
class InspectReport:
    """What ``inspect`` found."""

    path: Path
    kind: str
    dtypes: dict[str, int] = field(default_factory=dict)  # dtype -> number of tensors
    params: dict[str, int] = field(default_factory=dict)  # component -> parameters
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    comparison: UnetComparison | None = None

    def format(self) -> str:
        lines = [f"{self.path}: {self.kind}"]
        if self.dtypes:
            lines.append("dtype: " + ", ".join(f"{d} ({n} tensors)" for d, n in sorted(self.dtypes.items())))
        for name, n in self.params.items():
            lines.append(f"  {name}: {n:,} parameters")
        if self.metadata:
            lines.append("metadata:")
            lines += [f"  {k}: {v}" for k, v in sorted(self.metadata.items())]
        lines += [f"note: {n}" for n in self.notes]
        if self.comparison is not None:
            lines.append(self.comparison.verdict())
        return "\n".join(lines)

    def as_dict(self) -> dict:
        out = {
            "path": str(self.path),
            "kind": self.kind,
            "dtypes": self.dtypes,
            "params": self.params,
            "metadata": self.metadata,
            "notes": self.notes,
        }
        if self.comparison is not None:
            c = self.comparison
            out["reference"] = {
                "path": c.reference,
                "same": c.same,
                "identical": c.identical,
                "different": c.different,
                "max_abs_diff": c.max_abs_diff,
            }
        return out


def inspect_path(
    path: str | os.PathLike,
    *,
    reference: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    allow_pickle: bool = False,
) -> InspectReport:
    """Describe ``path`` (kind, dtypes, parameters per component, metadata) and compare its UNet to ``reference``."""
    path = resolve_path(path)
    config_dir = resolve_path(config) if config is not None else None
    if path.is_dir():
        report = _inspect_folder(path)
    elif path.is_file():
        report = _inspect_file(path, allow_pickle)
    else:
        raise ConversionError(f"{path} does not exist")
    if reference is not None:
        ref_path = resolve_path(reference)
        ref_unet = unet_in_diffusers_layout(ref_path, config_dir, allow_pickle)
        config_for_file = config_dir or (ref_path if ref_path.is_dir() else None)
        report.comparison = compare_unets(
            unet_in_diffusers_layout(path, config_for_file, allow_pickle), ref_unet, str(ref_path)
        )
    return report


def _inspect_folder(path: Path) -> InspectReport:
    source = open_diffusers_source(path, ema=None, allow_pickle=False, unet_config=None)
    report = InspectReport(path, source.kind, notes=list(source.notes))
    for name, comp in source.components.items():
        report.params[name] = comp.num_params
        for ref in comp.tensors.values():
            report.dtypes[_dtype_name(ref.dtype)] = report.dtypes.get(_dtype_name(ref.dtype), 0) + 1
    if (path / "unet_ema").is_dir():
        report.notes.append("holds unet_ema/ too: --ema use converts the EMA UNet")
    if source.scheduler_config:
        report.notes.append(
            f"scheduler: {source.scheduler_config.get('_class_name', '?')}"
            + (f", shift {source.scheduler_config['shift']}" if "shift" in source.scheduler_config else "")
        )
    return report


def _inspect_file(path: Path, allow_pickle: bool) -> InspectReport:
    if sniff_format(path) == "pickle":
        if path.suffix == ".safetensors" and not allow_pickle:
            raise ConversionError(
                f"{path} is a PICKLE (torch.save) file named .safetensors, not safetensors: refused, since loading "
                "a pickle can run code; pass --allow-pickle to look inside with torch.load(weights_only=True)"
            )
        data = load_pickle(path, allow_pickle=True)
        if EARLIER_TRAINER_KEYS <= data.keys():
            source = earlier_trainer_source(path, data, None)
            comp = source.components["unet"]
            report = InspectReport(path, "earlier-trainer checkpoint (pickle: cfg, student, opt, sched, gstep)")
            report.params["unet (student)"] = comp.num_params
            report.dtypes = _count_dtypes(ref.dtype for ref in comp.tensors.values())
            if isinstance(data.get("gstep"), int):
                report.notes.append(f"global step {data['gstep']}")
            return report
        if isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        tensors = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
        shapes = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
        reader = DictReader(tensors, path)
        kind_prefix = "pickle (torch.save) file: "
        metadata = {}
    else:
        header = read_header(path)
        shapes = {k: (t.dtype, t.shape) for k, t in header.tensors.items()}
        reader = _HeaderOnly(header)
        kind_prefix = ""
        metadata = header.metadata
    what = describe_keys(reader)
    report = InspectReport(path, kind_prefix + what, metadata=dict(metadata))
    report.dtypes = _count_dtypes(dtype for dtype, _ in shapes.values())
    if what in ("ldm", "ldm-unet-bare"):
        groups = _ldm_groups(shapes) if what == "ldm" else {"unet": sum(_numel(s) for _, s in shapes.values())}
        full = {"vae", "text_encoder"} <= groups.keys()
        report.kind = kind_prefix + ("LDM single file, full (SD1.5)" if full else "LDM single file, UNet-only (SD1.5)")
        report.params = {k: v for k, v in groups.items() if not k.startswith("_")}
        if groups.get("_ema"):
            report.notes.append(
                f"holds an EMA copy of the UNet ({groups['_ema']:,} values): converting needs --ema use|drop"
            )
        markers = [k for k in shapes if k in PREDICTION_MARKERS]
        if markers:
            report.notes.append(
                f"prediction marker keys {markers}: ComfyUI/A1111 treat it as v-prediction; not a Flow Lune file"
            )
        if groups.get("_other"):
            report.notes.append(f"{groups['_other']:,} values under keys of no SD1.5 component")
        if metadata.get("modelspec.prediction_type"):
            report.notes.append(f"prediction type (metadata): {metadata['modelspec.prediction_type']}")
    elif what == "diffusers-unet":
        report.kind = kind_prefix + "diffusers UNet file"
        report.params = {"unet": sum(_numel(s) for _, s in shapes.values())}
    else:
        report.params = {"all": sum(_numel(s) for _, s in shapes.values())}
    return report


class _HeaderOnly:
    def __init__(self, header):
        self.path = header.path
        self.tensors = header.tensors


def _ldm_groups(shapes: dict) -> dict[str, int]:
    groups: Counter = Counter()
    for key, (_, shape) in shapes.items():
        if key.endswith("embeddings.position_ids"):
            continue  # a constant buffer, not a parameter
        for name, prefix in LDM_PREFIXES.items():
            if key.startswith(prefix):
                groups[name] += _numel(shape)
                break
        else:
            if key.startswith(EMA_PREFIX):
                groups["_ema"] += _numel(shape)
            elif key in LDM_SCHEDULE_KEYS:
                groups["_schedule"] += _numel(shape)
            else:
                groups["_other"] += _numel(shape)
    order = ("unet", "vae", "text_encoder", "_ema", "_schedule", "_other")
    return {k: groups[k] for k in order if groups[k]}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _count_dtypes(dtypes) -> dict[str, int]:
    return dict(Counter(_dtype_name(d) for d in dtypes))


def unet_in_diffusers_layout(path: Path, config_dir: Path | None, allow_pickle: bool) -> Component:
    """The UNet of any supported source, keyed in diffusers layout (LDM files mapped through the key table)."""
    unet_config = folder_config(config_dir, "unet") if config_dir is not None else None
    if path.is_dir() or _is_diffusers_like_file(path, allow_pickle):
        source = open_diffusers_source(path, ema=None, allow_pickle=allow_pickle, unet_config=unet_config)
        return source.components["unet"]
    source = open_ldm_source(path, ema="drop", allow_pickle=allow_pickle)
    comp = source.components["unet"]
    config = unet_config or builtin_config("unet")
    origin = str(config_dir) if unet_config else "built-in SD1.5 unet config"
    planned = plan_component(comp, config, origin, target="diffusers")
    tensors = {p.key: p.ref for p in planned}
    return Component("unet", "diffusers", tensors, comp.origin, config, origin)


def _is_diffusers_like_file(path: Path, allow_pickle: bool) -> bool:
    if sniff_format(path) == "pickle":
        data = load_pickle(path, allow_pickle)
        return EARLIER_TRAINER_KEYS <= data.keys()
    header = read_header(path)
    return describe_keys(_HeaderOnly(header)) == "diffusers-unet"


def compare_unets(here: Component, reference: Component, reference_name: str) -> UnetComparison:
    """Compare real tensors, one pair at a time; a dtype difference compares in the coarser dtype."""
    common = [k for k in here.tensors if k in reference.tensors]
    identical = different = 0
    max_diff = 0.0
    for key in common:
        a, b = here.tensors[key].get(), reference.tensors[key].get()
        if a.shape != b.shape:
            a = a.reshape(b.shape) if a.numel() == b.numel() else a
        if a.dtype != b.dtype:
            coarse = a.dtype if a.element_size() <= b.element_size() else b.dtype
            a, b = a.to(coarse), b.to(coarse)
        if a.shape == b.shape and torch.equal(a, b):
            identical += 1
        else:
            different += 1
            if a.shape == b.shape:
                max_diff = max(max_diff, (a.double() - b.double()).abs().max().item())
            else:
                max_diff = float("inf")
    return UnetComparison(
        reference=reference_name,
        identical=identical,
        different=different,
        max_abs_diff=max_diff,
        only_here=sorted(set(here.tensors) - set(reference.tensors)),
        only_in_reference=sorted(set(reference.tensors) - set(here.tensors)),
    )


def report_json(report: InspectReport) -> str:
    return json.dumps(report.as_dict(), indent=2)


__all__ = ["InspectReport", "UnetComparison", "compare_unets", "inspect_path", "is_pipeline_folder"]
