"""Original-layout (LDM) single file, full or UNet-only -> diffusers folder loadable with ``from_pretrained``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .accounting import plan_component, read_position
from .architecture import text_keys_carry_text_model
from .configs import builtin_config, flow_model_index, flow_scheduler_config, folder_config, read_json
from .errors import ConversionError
from .ldm_source import open_ldm_source
from .metadata import EPSILON, PREDICTION_TYPE_KEY, flow_shift
from .recommendation import CARD_NAME, header_sampling, sampling_card_text
from .sfio import OutTensor, verify_written, write_safetensors
from .sources import resolve_path
from .to_single_file import DTYPES, ConversionResult, _out_dtype, _progress_bar
from .writing import atomic_folder, check_destination

WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}
MODEL_INDEX = {  # a StableDiffusionPipeline folder without safety checker
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def _component_config(name: str, config_dir: Path | None) -> tuple[dict, str]:
    if config_dir is not None:
        found = folder_config(config_dir, name)
        if found is None:
            raise ConversionError(f"--config {config_dir} has no {name} config (looked in {name}/config.json)")
        return found, f"{config_dir} ({name})"
    return builtin_config(name), f"built-in SD1.5 {name} config"


def convert_to_diffusers(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    dtype: str | None = None,
    ema: str | None = None,
    shift: float | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
) -> ConversionResult:
    """Convert an SD1.5 original-layout file to a diffusers folder at ``dst``, offline.

    A full file gives a pipeline folder (``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/``, and
    ``tokenizer/`` when ``config`` has one); a UNet-only file gives a UNet folder. Configs come from
    ``config`` (a local diffusers folder) or the built-in SD1.5 ones.

    The pipeline is a ``FlowLunePipeline`` with ``FlowLuneScheduler(shift)`` when the file is a Flow
    Lune student (header ``modelspec.prediction_type`` ``flow`` and/or ``flow_lune.shift``, see
    :func:`flow_lune.convert.metadata.flow_shift`) or when ``shift`` is given; otherwise a
    ``StableDiffusionPipeline`` with the scheduler of ``config`` (default SD1.5's PNDM). A file whose header
    says ``modelspec.prediction_type`` ``epsilon`` (``to-single-file --prediction-type epsilon``, a teacher)
    is refused with ``shift`` and with a ``config`` scheduler that predicts anything but epsilon.
    """
    src, dst = resolve_path(src), resolve_path(dst)
    if ema not in (None, "use", "drop"):
        raise ConversionError(f"--ema {ema!r}: expected 'use' or 'drop'")
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    check_destination(dst, overwrite)
    config_dir = resolve_path(config) if config is not None else None
    if config_dir is not None and not config_dir.is_dir():
        raise ConversionError(f"--config {config_dir} is not a folder; give a local diffusers folder")
    if shift is not None and not 0 < shift < float("inf"):
        raise ConversionError(f"--shift {shift}: need a positive number (the student's sigma shift)")
    scheduler_config = (folder_config(config_dir, "scheduler") if config_dir else None) or builtin_config("scheduler")
    source = open_ldm_source(src, ema=ema, allow_pickle=allow_pickle, scheduler_config=scheduler_config)
    full = "vae" in source.components
    out_dtype = DTYPES.get(dtype) if dtype else None
    notes = list(source.notes)
    if not full and shift is not None:
        raise ConversionError(f"--shift is for a full file; {src} is UNet-only and gives a UNet folder, no scheduler")
    card = None
    if full:
        shift, scheduler_config = _pipeline_scheduler(source.metadata, shift, scheduler_config, config_dir, src, notes)
        found = header_sampling(source.metadata, src.name) if shift is not None else None
        if found is not None:  # the file's recommendation goes into the folder's model card, for to-single-file
            title = source.metadata.get("modelspec.title", src.stem)
            card = sampling_card_text(title, found.steps, found.cfg, shift, src.name)

    # 1. Account for every key before anything is written.
    plans, configs = {}, {}
    for name, comp in source.components.items():
        comp_config, origin = _component_config(name, config_dir)
        planned = sorted(plan_component(comp, comp_config, origin, target="diffusers"), key=read_position)
        if name == "text_encoder" and text_keys_carry_text_model(comp_config):
            planned = [type(p)("text_model." + p.key, p.shape, p.ref) for p in planned]
        plans[name] = [OutTensor(p.key, _out_dtype(p.ref, out_dtype), p.shape, p.ref.get) for p in planned]
        configs[name] = comp_config
    total = sum(e.nbytes for entries in plans.values() for e in entries)

    # 2. Write every component into a temporary folder, check each file, then move the folder in place.
    def fill(folder: Path) -> None:
        with _progress_bar(total, progress, dst.name) as bar:
            for name, entries in plans.items():
                part = folder / name if full else folder
                part.mkdir(exist_ok=True)
                path = part / WEIGHT_FILES[name]
                write_safetensors(path, entries, {"format": "pt"}, progress=bar.update)
                verify_written(path, entries, {"format": "pt"})
                cfg = dict(configs[name])
                if out_dtype is not None and name == "text_encoder":
                    cfg["dtype"] = str(out_dtype).removeprefix("torch.")
                (part / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        if full:
            _write_pipeline_extras(folder, config_dir, scheduler_config, flow=shift is not None)
        if card is not None:
            (folder / CARD_NAME).write_text(card, encoding="utf-8")

    atomic_folder(dst, fill)
    if full and not (dst / "tokenizer").is_dir():
        notes.append(
            "no tokenizer/ written (no --config folder with one): pass tokenizer=CLIPTokenizer(...) to "
            "from_pretrained, or give --config a local SD1.5 folder"
        )
    return ConversionResult(
        dst=dst,
        source_kind=source.kind,
        components={name: comp.num_params for name, comp in source.components.items()},
        num_tensors=sum(len(e) for e in plans.values()),
        num_bytes=total,
        metadata=dict(source.metadata),
        notes=notes,
    )


def _pipeline_scheduler(
    metadata: dict[str, str],
    shift: float | None,
    scheduler_config: dict,
    config_dir: Path | None,
    src: Path,
    notes: list[str],
) -> tuple[float | None, dict]:
    """``(shift, scheduler config)`` of the pipeline folder: a Flow Lune student's, or None and ``scheduler_config``."""
    declared_epsilon = metadata.get(PREDICTION_TYPE_KEY) == EPSILON
    if declared_epsilon and shift is not None:
        raise ConversionError(
            f"--shift {shift:g}: {src} says {PREDICTION_TYPE_KEY} 'epsilon' (an SD1.5 teacher), not a flow student; "
            "leave out --shift to get a StableDiffusionPipeline with the scheduler of --config"
        )
    if shift is not None:
        declared = metadata.get("flow_lune.shift")
        said = f" (the header says flow_lune.shift {declared})" if declared and declared != repr(float(shift)) else ""
        notes.append(
            f"--shift {shift:g} given{said}: written as a Flow Lune student, FlowLuneScheduler(shift={shift:g})"
        )
        return float(shift), flow_scheduler_config(shift)
    shift = flow_shift(metadata, str(src))
    if shift is not None:
        notes.append(
            f"{src.name} is a Flow Lune student (header flow_lune.shift / prediction_type flow): FlowLunePipeline "
            f"folder with FlowLuneScheduler(shift={shift:g}); load it with flow_lune.pipelines.FlowLunePipeline"
        )
        return shift, flow_scheduler_config(shift)
    import diffusers

    name = str(scheduler_config.get("_class_name", "PNDMScheduler"))
    if not hasattr(diffusers, name):
        raise ConversionError(
            f"{src} has no Flow Lune header (modelspec.prediction_type 'flow' / flow_lune.shift), so it becomes a "
            f"StableDiffusionPipeline, but the scheduler of --config {config_dir} is {name}, not a diffusers "
            "scheduler; pass --shift S if the file is a Flow Lune student, or give --config an SD1.5 folder"
        )
    predicts = scheduler_config.get("prediction_type", EPSILON)  # diffusers' default when the config has none
    if declared_epsilon and predicts != EPSILON:
        raise ConversionError(
            f"{src} says {PREDICTION_TYPE_KEY} 'epsilon', but the scheduler of --config {config_dir} ({name}) has "
            f"prediction_type {predicts!r}; give --config the epsilon teacher's folder so its pipeline samples right"
        )
    if declared_epsilon:
        notes.append(f"{src.name} is an epsilon SD1.5 model: StableDiffusionPipeline with {name} from the config")
    return None, scheduler_config


def _write_pipeline_extras(folder: Path, config_dir: Path | None, scheduler_config: dict, flow: bool) -> None:
    """scheduler/, tokenizer/ (copied from ``config_dir`` if it has one) and model_index.json.

    ``flow``: a FlowLunePipeline folder (its own model index); else a StableDiffusionPipeline one.
    """
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler_config, indent=2) + "\n")
    tokenizer = config_dir is not None and (config_dir / "tokenizer").is_dir()
    if tokenizer:
        shutil.copytree(config_dir / "tokenizer", folder / "tokenizer")
    if flow:
        index = flow_model_index(tokenizer)
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return
    index = dict(MODEL_INDEX)
    if config_dir is not None and (config_dir / "model_index.json").is_file():
        index = read_json(config_dir / "model_index.json")
        if index.get("_class_name") != "StableDiffusionPipeline":  # e.g. a FlowLunePipeline folder as --config
            index = {**MODEL_INDEX, "tokenizer": index.get("tokenizer", MODEL_INDEX["tokenizer"])}
    index["scheduler"] = ["diffusers", scheduler_config.get("_class_name", "PNDMScheduler")]
    if not tokenizer:
        index["tokenizer"] = [None, None]
    for optional in ("safety_checker", "feature_extractor", "image_encoder"):
        if optional in index and not (folder / optional).is_dir():
            index[optional] = [None, None]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


__all__ = ["convert_to_diffusers"]
