"""Original-layout (LDM) single files as a :class:`~flow_lune.convert.sources.Source`: keys split per component.

EMA copies are kept, dropped or used as ``--ema`` says; DDPM schedule buffers are checked against the
scheduler config; any other key that belongs to no component is an error naming it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import ConversionError, format_keys
from .keymaps import LDM_PREFIXES
from .sources import (
    EMA_PREFIX,
    LDM_SCHEDULE_KEYS,
    PREDICTION_MARKERS,
    Source,
    _open_any_file,
    component_from_reader,
    describe_keys,
    strip_prefixes,
)


def open_ldm_source(path: Path, *, ema: str | None, allow_pickle: bool, scheduler_config: dict | None = None) -> Source:
    """An original-layout single file (full or UNet-only) split into components in LDM layout."""
    reader, kind, data = _open_any_file(path, allow_pickle)
    if kind == "earlier-trainer checkpoint":
        raise ConversionError(f"{path} is an earlier-trainer checkpoint; convert it with to-single-file first")
    what = describe_keys(reader)
    if what not in ("ldm", "ldm-unet-bare"):
        raise ConversionError(f"{path} is {what}; to-diffusers takes an SD1.5 original-layout (LDM) single file")
    notes: list[str] = []
    keys = list(reader.tensors)
    if what == "ldm-unet-bare":
        stripped = strip_prefixes(keys, str(path))
        groups = {"unet": stripped}
    else:
        groups = split_ldm_keys(reader, ema=ema, notes=notes, scheduler_config=scheduler_config, origin=str(path))
    components = {}
    for name, comp_keys in groups.items():
        components[name] = component_from_reader(reader, name, "ldm", str(path), comp_keys, notes)
    if "unet" not in components:
        raise ConversionError(f"{path} has no UNet (no model.diffusion_model.* keys)")
    kind = "LDM single file, full" if {"vae", "text_encoder"} <= components.keys() else "LDM single file, UNet-only"
    if len(components) == 2:
        raise ConversionError(
            f"{path} holds {sorted(components)} but not all of unet, vae, text_encoder; "
            "a single file is full or UNet-only"
        )
    return Source(path, kind, components, [path], metadata=dict(reader.metadata), notes=notes)


def split_ldm_keys(reader, *, ema: str | None, notes: list[str], scheduler_config: dict | None, origin: str):
    """Sort the keys of a full LDM file into components; every other key is accounted for or an error."""
    groups: dict[str, dict[str, str]] = {"unet": {}, "vae": {}, "text_encoder": {}}
    ema_keys, schedule, markers, unknown = [], [], [], []
    for key in reader.tensors:
        for name, prefix in LDM_PREFIXES.items():
            if key.startswith(prefix):
                groups[name][key[len(prefix) :]] = key
                break
        else:
            if key.startswith(EMA_PREFIX):
                ema_keys.append(key)
            elif key in LDM_SCHEDULE_KEYS:
                schedule.append(key)
            elif key in PREDICTION_MARKERS:
                markers.append(key)
            else:
                unknown.append(key)
    if markers:
        raise ConversionError(
            f"{origin} carries the prediction marker {format_keys(markers)}: ComfyUI and A1111 would treat it as a "
            "v-prediction/zero-SNR model. A Flow Lune file never has one; this file is not a Flow Lune SD1.5 export"
        )
    if unknown:
        raise ConversionError(f"{origin} has keys that belong to no SD1.5 component, {format_keys(unknown)}")
    if ema_keys:
        _apply_ema(reader, groups, ema_keys, ema, notes, origin)
    if schedule:
        notes.append(check_schedule(reader, schedule, scheduler_config, origin))
    return {name: keys for name, keys in groups.items() if keys}


def _apply_ema(reader, groups, ema_keys: list[str], ema: str | None, notes: list[str], origin: str) -> None:
    if ema is None:
        raise ConversionError(
            f"{origin} holds an EMA copy of the UNet ({len(ema_keys)} model_ema.* keys); "
            "pass --ema use (convert the EMA weights) or --ema drop (convert the live weights, leave the EMA out)"
        )
    bookkeeping = [k for k in ema_keys if k in ("model_ema.decay", "model_ema.num_updates")]
    if ema == "drop":
        notes.append(f"{origin}: {len(ema_keys)} model_ema.* keys left out (--ema drop)")
        return
    # LitEma stores model.diffusion_model.a.b.c as model_ema.diffusion_modelabc (dots removed).
    wanted = {"model_ema." + ("diffusion_model." + k).replace(".", ""): k for k in groups["unet"]}
    missing = [wanted_key for wanted_key in wanted if wanted_key not in reader.tensors]
    extra = set(ema_keys) - wanted.keys() - set(bookkeeping)
    if missing or extra:
        raise ConversionError(
            f"--ema use: the EMA copy in {origin} does not match its UNet: missing {format_keys(missing)}; "
            f"unexpected {format_keys(extra)}"
        )
    groups["unet"] = {k: ema_key for ema_key, k in wanted.items()}
    notes.append(f"{origin}: UNet taken from the EMA copy (--ema use); the live UNet weights left out")


def check_schedule(reader, keys: list[str], scheduler_config: dict | None, origin: str) -> str:
    """Check LDM's DDPM schedule buffers against the scheduler's betas (not weights: diffusers recomputes them)."""
    from .configs import builtin_config

    cfg = scheduler_config or builtin_config("scheduler")
    n = int(cfg.get("num_train_timesteps", 1000))
    start, end = float(cfg.get("beta_start", 0.00085)), float(cfg.get("beta_end", 0.012))
    if cfg.get("beta_schedule", "scaled_linear") == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    else:
        betas = torch.linspace(start, end, n, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    for key, ref in (("betas", betas), ("alphas_cumprod", alphas_cumprod)):
        if key in keys:
            found = reader.get(key).to(torch.float64)
            if found.shape != ref.shape or not torch.allclose(found, ref, rtol=2e-3, atol=1e-6):
                raise ConversionError(
                    f"{origin}: the schedule buffer {key} does not match the scheduler ({cfg.get('beta_schedule')} "
                    f"{start}..{end}, {n} steps); this is not an SD1.5-schedule file, "
                    "or pass --config with its scheduler"
                )
    return f"{origin}: {len(keys)} DDPM schedule buffers checked against the scheduler config; not weights, not written"
