"""diffusers (pipeline, UNet, training checkpoint, earlier-trainer checkpoint) -> one original-layout file."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flow_lune.settings import SD15_SAMPLING

from .accounting import Planned, plan_component, read_position
from .configs import builtin_config, folder_config, teacher_scheduler
from .errors import ConversionError
from .hashing import SourceHasher, combined_sha256, relative_names
from .keymaps import LDM_PREFIXES, TEXT_PREFIX
from .ldm_source import open_ldm_source
from .metadata import EPSILON, PREDICTION_TYPE, PREDICTION_TYPES, hash_values, single_file_metadata
from .recommendation import SourceSampling, card_sampling, header_sampling
from .sfio import OutTensor, verify_written, write_safetensors
from .sources import (
    Component,
    Source,
    TensorRef,
    is_pipeline_folder,
    open_diffusers_source,
    resolve_path,
)
from .workflow import comfyui_editor_graph, comfyui_workflow
from .writing import atomic_file, atomic_text, check_destination

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_SHIFT = SD15_SAMPLING.shift  # the training shift's default (DESIGN.md section 1), unless the source says
# A flow source without a recommendation (model card flow_lune_sampling, header flow_lune.steps/cfg) gets SD1.5's,
# the recipe of any teacher but the toy one; flow_lune.settings.SD15_SAMPLING says why, and that it is not measured.
DEFAULT_CFG = SD15_SAMPLING.guidance_scale
DEFAULT_TEACHER_CFG = 7.5  # an epsilon SD1.5 file: the guidance SD1.5 is usually sampled with
STUDENT_SOURCE_KINDS = ("training checkpoint", "earlier-trainer checkpoint")  # these only ever hold flow students
DEFAULT_STEPS = SD15_SAMPLING.steps  # Euler steps in the workflow, as DEFAULT_CFG; an epsilon file's too (DDIM's 20)
POSITION_IDS_KEY = TEXT_PREFIX + "text_model.embeddings.position_ids"


@dataclass
class ConversionResult:
    """What a conversion wrote and what it accounted for."""

    dst: Path
    source_kind: str
    components: dict[str, int]  # parameters per component
    num_tensors: int
    num_bytes: int
    workflow: Path | None = None
    editor_workflow: Path | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = ", ".join(f"{name} {n / 1e6:.1f}M" for name, n in self.components.items())
        lines = [
            f"wrote {self.dst} ({self.num_tensors} tensors, {self.num_bytes / 1e9:.2f} GB); source: {self.source_kind}",
            f"parameters: {parts}; every source key mapped to exactly one destination key",
        ]
        if self.workflow is not None:
            lines.append(f"ComfyUI workflow: {self.workflow} (API format), {self.editor_workflow} (editor format)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def workflow_path(dst: Path) -> Path:
    """``model.safetensors`` -> ``model.workflow.json``: the ComfyUI graph in API format."""
    return dst.with_suffix(".workflow.json")


def editor_workflow_path(dst: Path) -> Path:
    """``model.safetensors`` -> ``model.workflow-editor.json``: the same graph in ComfyUI's editor format."""
    return dst.with_suffix(".workflow-editor.json")


def resolve_config(comp: Component, config_dir: Path | None) -> tuple[dict, str]:
    """The component's own config, else the one in ``--config``, else the built-in SD1.5 one."""
    if comp.config is not None:
        return comp.config, comp.config_origin or "source config"
    if config_dir is not None:
        found = folder_config(config_dir, comp.name)
        if found is None:
            raise ConversionError(
                f"--config {config_dir} has no {comp.name} config (looked in {comp.name}/config.json)"
            )
        return found, f"{config_dir} ({comp.name})"
    return builtin_config(comp.name), f"built-in SD1.5 {comp.name} config"


def _out_dtype(ref: TensorRef, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and ref.dtype.is_floating_point else ref.dtype


def _base_components(base: Path, ema: str | None, allow_pickle: bool) -> tuple[dict[str, Component], list[Path]]:
    """VAE and text encoder from a ``--base`` pipeline folder or single file."""
    if base.is_dir():
        if not is_pipeline_folder(base):
            raise ConversionError(
                f"--base {base} is a folder but not a diffusers pipeline (unet/, vae/, text_encoder/)"
            )
        src = open_diffusers_source(base, ema=None, allow_pickle=allow_pickle, unet_config=None)
    else:
        src = open_ldm_source(base, ema=ema or "drop", allow_pickle=allow_pickle)
        if not {"vae", "text_encoder"} <= src.components.keys():
            raise ConversionError(f"--base {base} is UNet-only; it must hold a VAE and a text encoder")
    return {k: v for k, v in src.components.items() if k in ("vae", "text_encoder")}, src.files


def convert_to_single_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    config: str | os.PathLike | None = None,
    dtype: str | None = None,
    ema: str | None = None,
    shift: float | None = None,
    prediction_type: str | None = None,
    cfg: float | None = None,
    steps: int | None = None,
    title: str | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    write_workflow: bool = True,
    source_hash: bool = True,
    progress: bool = True,
) -> ConversionResult:
    """Convert ``src`` to an original-layout (LDM) single file at ``dst``.

    Every source key maps to exactly one destination key and every destination key is filled
    (else a ConversionError lists the keys); the file is streamed to a temporary name, re-opened
    and checked, then renamed. Beside it goes a ComfyUI workflow that applies the model's shift.

    ``prediction_type`` None or ``"flow"``: the file is labelled a flow model (``modelspec.prediction_type``
    ``flow``, ``flow_lune.shift``), so a pipeline folder whose scheduler is an epsilon/v-prediction DDPM-family
    one (a teacher) is refused unless ``shift`` is given, which declares the UNet a student.
    ``"epsilon"``: a plain SD1.5 file (e.g. a teacher for ``train_flow_distill.py``), ``modelspec.prediction_type``
    ``epsilon`` and no flow keys; the workflow has no ModelSamplingSD3. Allowed for a pipeline folder whose
    scheduler predicts epsilon, and for a source without a scheduler (UNet folder or file); refused for a
    flow or v-prediction scheduler, a training checkpoint, and together with ``shift``.
    ``cfg``/``steps`` None: a flow student's recommendation from the source (:func:`source_sampling`: a pipeline
    folder's model card, a UNet file's header), else SD1.5's (``DEFAULT_CFG``, ``DEFAULT_STEPS``); an epsilon
    file: cfg 7.5 and ``DEFAULT_STEPS``.
    """
    src, dst = resolve_path(src), resolve_path(dst)
    if ema not in (None, "use", "drop"):
        raise ConversionError(f"--ema {ema!r}: expected 'use' or 'drop'")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if dst.suffix not in (".safetensors", ".ckpt"):
        raise ConversionError(f"DST {dst} must end in .safetensors (or .ckpt with --allow-pickle)")
    if dst.suffix == ".ckpt" and not allow_pickle:
        raise ConversionError(f"DST {dst} is a .ckpt pickle; pass --allow-pickle to write one, or name it .safetensors")
    wf_path = workflow_path(dst) if write_workflow else None
    editor_path = editor_workflow_path(dst) if write_workflow else None
    check_destination(dst, overwrite, *([wf_path, editor_path] if write_workflow else []))
    config_dir = resolve_path(config) if config is not None else None
    if config_dir is not None and not config_dir.is_dir():
        raise ConversionError(f"--config {config_dir} is not a folder; give a local diffusers folder")
    if prediction_type not in (None, *PREDICTION_TYPES):
        raise ConversionError(f"--prediction-type {prediction_type!r}: expected one of {', '.join(PREDICTION_TYPES)}")
    epsilon = prediction_type == EPSILON
    if epsilon and shift is not None:
        raise ConversionError(
            f"--shift {shift} with --prediction-type epsilon: a shift belongs to a flow student; drop one of them"
        )
    if (steps is not None and steps < 1) or (cfg is not None and cfg < 0) or (shift is not None and shift <= 0):
        raise ConversionError(f"--steps {steps}, --cfg {cfg}, --shift {shift}: need steps >= 1, cfg >= 0, shift > 0")

    unet_config = None
    if config_dir is not None:
        unet_config = folder_config(config_dir, "unet")
    source = open_diffusers_source(src, ema=ema, allow_pickle=allow_pickle, unet_config=unet_config)
    components = dict(source.components)
    files, notes = list(source.files), list(source.notes)
    teacher = teacher_scheduler(source.scheduler_config)
    if epsilon:
        notes.append(_check_epsilon_source(source, teacher, src))
    elif teacher is not None and shift is None:
        hint = ""
        if source.scheduler_config.get("prediction_type", EPSILON) == EPSILON:
            hint = "; or, to write this teacher as an epsilon SD1.5 file, pass --prediction-type epsilon"
        raise ConversionError(
            f"SRC {src}: its scheduler is {teacher}, a DDPM-family SD1.5 scheduler: this is an epsilon/v-prediction "
            "SD1.5 pipeline (a teacher), not a Flow Lune student, and its file would be mislabelled "
            "modelspec.prediction_type 'flow'. Convert the student's output folder (scheduler FlowLuneScheduler), "
            "or, if this UNet is a flow student saved with the teacher's scheduler, pass --shift S (its sigma shift)"
            + hint
        )
    elif teacher is not None:
        notes.append(f"SRC's scheduler is {teacher}; --shift {shift:g} given, so its UNet is written as a flow student")
    if base is not None:
        if "vae" in components:
            raise ConversionError(f"--base is only for a UNet-only SRC; {src} already holds a VAE and text encoder")
        base_components, base_files = _base_components(resolve_path(base), ema, allow_pickle)
        components.update(base_components)
        files += base_files
    if shift is None and not epsilon:
        shift = float((source.scheduler_config or {}).get("shift", DEFAULT_SHIFT))
    steps, cfg = _sampling(source, steps, cfg, epsilon, notes)

    # 1. Account for every key, component by component.
    planned: list[tuple[str, Planned]] = []
    configs = {}
    for name in ("unet", "vae", "text_encoder"):
        if name not in components:
            continue
        comp = components[name]
        comp_config, origin = resolve_config(comp, config_dir)
        configs[name] = comp_config
        for p in plan_component(comp, comp_config, origin, target="ldm"):
            planned.append((LDM_PREFIXES[name] + p.key, p))
    out_dtype = DTYPES.get(dtype) if dtype else None
    planned.sort(key=lambda kp: read_position(kp[1]))
    entries = [OutTensor(key, _out_dtype(p.ref, out_dtype), p.shape, p.ref.get) for key, p in planned]
    if "text_encoder" in components:
        n_pos = int(configs["text_encoder"].get("max_position_embeddings", 77))
        entries.append(
            OutTensor(
                POSITION_IDS_KEY, torch.int64, (1, n_pos), lambda n=n_pos: torch.arange(n, dtype=torch.int64)[None]
            )
        )

    # 2. Metadata: what the file is and how to sample it.
    names = list(components)
    unet_cfg = configs["unet"]
    factor = 2 ** (len(configs["vae"]["block_out_channels"]) - 1) if "vae" in configs else 8
    size = int(unet_cfg.get("sample_size", 64)) * factor
    file_names = relative_names(files, src if src.is_dir() else src.parent)
    metadata = single_file_metadata(
        title=title or dst.stem,
        prediction_type=EPSILON if epsilon else PREDICTION_TYPE,
        shift=shift,
        cfg=cfg,
        steps=steps,
        width=size,
        height=size,
        components=names,
        source_kind=source.kind,
        source_names=file_names if source_hash else None,
        ema=ema,
    )

    # 3. Stream, check, rename.
    total = sum(e.nbytes for e in entries)
    if dst.suffix == ".ckpt":
        atomic_file(dst, lambda tmp: _write_ckpt(tmp, entries, metadata))
    else:
        hasher = SourceHasher(files, file_names) if source_hash else None
        if hasher is not None:
            for entry, (_, p) in zip(entries, planned):
                entry.fetch = hasher.wrap(p.ref.reader, p.ref.key, entry.fetch)

        def patch() -> dict[str, str]:
            per_file = hasher.result()
            return hash_values(per_file, combined_sha256(per_file))

        def write(tmp: Path) -> None:
            try:
                with _progress_bar(total, progress, dst.name) as bar:
                    write_safetensors(tmp, entries, metadata, progress=bar.update, patch=patch if hasher else None)
            finally:
                if hasher is not None:
                    hasher.close()
            verify_written(tmp, entries, metadata)

        atomic_file(dst, write)

    result = ConversionResult(
        dst=dst,
        source_kind=source.kind,
        components={name: components[name].num_params for name in names},
        num_tensors=len(entries),
        num_bytes=total,
        metadata=metadata,
        notes=notes,
    )
    if wf_path is not None:
        graph = comfyui_workflow(
            dst.name, shift=shift, cfg=cfg, steps=steps, width=size, height=size, unet_only="vae" not in components
        )
        atomic_text(wf_path, json.dumps(graph, indent=2) + "\n")
        atomic_text(editor_path, json.dumps(comfyui_editor_graph(graph), indent=2) + "\n")
        result.workflow, result.editor_workflow = wf_path, editor_path
    return result


def source_sampling(source: Source) -> SourceSampling | None:
    """The steps and guidance a source recommends: a pipeline folder's model card (what the trainer's export
    writes), else a UNet file's header; None when it carries none."""
    if source.pipeline_folder is not None:
        found = card_sampling(source.pipeline_folder)
        if found is not None:
            return found
    return header_sampling(source.metadata, str(source.path))


def _sampling(
    source: Source, steps: int | None, cfg: float | None, epsilon: bool, notes: list[str]
) -> tuple[int, float]:
    """``(steps, cfg)`` of the file: as given, else the source's recommendation, else the defaults (noted)."""
    if epsilon:
        return (DEFAULT_STEPS if steps is None else steps), (DEFAULT_TEACHER_CFG if cfg is None else cfg)
    if steps is not None and cfg is not None:
        return steps, cfg
    found = source_sampling(source)
    if found is not None:
        notes.append(f"sampling recommendation from {found.origin}: {found.steps} steps, cfg {found.cfg:g}")
        return (found.steps if steps is None else steps), (found.cfg if cfg is None else cfg)
    notes.append(
        f"SRC carries no sampling recommendation (model card flow_lune_sampling, header flow_lune.steps/cfg): "
        f"SD1.5's default, {DEFAULT_STEPS} steps, cfg {DEFAULT_CFG:g} (not measured; --steps/--cfg choose others)"
    )
    return (DEFAULT_STEPS if steps is None else steps), (DEFAULT_CFG if cfg is None else cfg)


def _check_epsilon_source(source: Source, teacher: str | None, src: Path) -> str:
    """Refuse ``--prediction-type epsilon`` for a source that says it is something else; the note to show if not."""
    if source.kind.startswith(STUDENT_SOURCE_KINDS):
        raise ConversionError(
            f"--prediction-type epsilon: SRC {src} is a {source.kind}, which holds a flow student's UNet, not an "
            "epsilon teacher; leave out --prediction-type to write it as a flow file"
        )
    config = source.scheduler_config
    if config is None:
        return f"SRC {src} has no scheduler; written as an epsilon SD1.5 model as --prediction-type epsilon says"
    if teacher is None:
        raise ConversionError(
            f"--prediction-type epsilon: SRC {src}'s scheduler is {config.get('_class_name', 'unnamed')}, a flow "
            "scheduler (no beta_schedule): this is a flow student; leave out --prediction-type to write a flow file"
        )
    if config.get("prediction_type", EPSILON) != EPSILON:
        raise ConversionError(
            f"--prediction-type epsilon: SRC {src}'s scheduler is {teacher}, not epsilon; the converter writes "
            "epsilon teachers and flow students only (a v-prediction SD1.5 file needs a v_pred key it does not write)"
        )
    return f"SRC's scheduler is {teacher}: written as an epsilon SD1.5 model (no flow keys, no ModelSamplingSD3)"


def _write_ckpt(tmp: Path, entries: list[OutTensor], metadata: dict[str, str]) -> None:
    """A pickle, only on explicit request: every tensor in memory at once, as ``torch.save`` needs."""
    state = {}
    for e in entries:
        t = e.fetch()
        state[e.key] = t.to(e.dtype).reshape(e.shape).clone()
    torch.save({"state_dict": state, "flow_lune_metadata": metadata}, tmp)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc) -> None:
        return None


def _progress_bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=None, leave=False)


__all__ = [
    "ConversionResult",
    "Source",
    "convert_to_single_file",
    "workflow_path",
    "editor_workflow_path",
    "DEFAULT_SHIFT",
    "DEFAULT_CFG",
    "DEFAULT_TEACHER_CFG",
    "DEFAULT_STEPS",
    "source_sampling",
]
