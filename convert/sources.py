"""Open what the user points at and present its tensors per component, without reading the data.

A source is a diffusers pipeline folder, a UNet folder or file, a training checkpoint folder of
this project, a checkpoint of the earlier trainer (``{"cfg", "student", "opt", "sched", "gstep"}``),
or an original-layout (LDM) single file. Each becomes a :class:`Source` whose components map keys
(prefixes stripped by the all-or-nothing rule) to :class:`TensorRef` s. Keys that belong to no
component are accounted for here: EMA copies only as ``--ema`` says, DDPM schedule buffers checked
against the scheduler, ``position_ids`` checked; anything else is an error. Reading the files themselves is
``weight_files.py``; splitting an LDM single file into components is ``ldm_source.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .architecture import describe_ldm_keys, describe_unet_config
from .configs import folder_config, read_json
from .errors import ConversionError, format_keys
from .keymaps import TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX
from .sfio import SafetensorsReader, sniff_format
from .weight_files import DictReader, Shape, _only_tensors, load_pickle, open_weights

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "unet.")  # DDP, torch.compile, a wrapper holding the UNet
EARLIER_TRAINER_KEYS = {"cfg", "student", "opt", "sched", "gstep"}
EMA_PREFIX = "model_ema."
# Buffers of LDM's DDPM class: the noise schedule, recomputable from the scheduler config.
LDM_SCHEDULE_KEYS = {
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
}
# Keys that tell ComfyUI/A1111 to treat a file as another prediction type: not a Flow Lune file.
PREDICTION_MARKERS = {"v_pred", "ztsnr", "edm_vpred.sigma_max", "edm_vpred.sigma_min", "edm_mean", "edm_std"}
BARE_LDM_UNET_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.")
DIFFUSERS_UNET_ROOTS = ("conv_in.", "time_embedding.", "down_blocks.", "mid_block.", "up_blocks.", "conv_norm_out.")
POSITION_IDS = "embeddings.position_ids"
WEIGHT_NAMES = {
    "unet": "diffusion_pytorch_model",
    "unet_ema": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
}


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor of a source lives: the reader and the key inside it."""

    reader: object  # SafetensorsReader or DictReader
    key: str
    dtype: torch.dtype
    shape: Shape

    def get(self) -> torch.Tensor:
        return self.reader.get(self.key)


@dataclass
class Component:
    """One part of a model (unet, vae, text_encoder), its keys in one layout."""

    name: str
    layout: str  # "diffusers" or "ldm" (LDM keys without the component prefix)
    tensors: dict[str, TensorRef]
    origin: str
    config: dict | None = None
    config_origin: str = ""

    @property
    def num_params(self) -> int:
        return sum(_numel(ref.shape) for ref in self.tensors.values())


@dataclass
class Source:
    """Everything read from a source path, before any key is mapped."""

    path: Path
    kind: str
    components: dict[str, Component]
    files: list[Path]
    metadata: dict[str, str] = field(default_factory=dict)
    scheduler_config: dict | None = None
    notes: list[str] = field(default_factory=list)
    pipeline_folder: Path | None = None  # for tokenizer/scheduler/model_index next to the weights


def _numel(shape: Shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---------------------------------------------------------------- prefixes


def strip_prefixes(keys: list[str], what: str, prefixes: tuple[str, ...] = WRAPPER_PREFIXES) -> dict[str, str]:
    """Map each key to itself with wrapper prefixes removed, a prefix only when every key carries it.

    Returns ``{stripped: original}``; some keys carrying a prefix and others not is an error.
    """
    current = {k: k for k in keys}
    changed = True
    while changed and current:
        changed = False
        for prefix in prefixes:
            carrying = [k for k in current if k.startswith(prefix)]
            if carrying and len(carrying) == len(current):
                current = {k[len(prefix) :]: orig for k, orig in current.items()}
                changed = True
            elif carrying:
                raise ConversionError(
                    f"{what}: {len(carrying)} of {len(current)} keys carry the prefix {prefix!r} and the others do not "
                    f"(prefixes are stripped only when every key carries them); keys with it: {format_keys(carrying)}"
                )
    return current


def text_keys_without_text_model(keys: list[str], what: str) -> dict[str, str]:
    """``{key without text_model.: original}``, accepting keys all with or all without ``text_model.``."""
    return strip_prefixes(keys, what, ("text_model.",))


# ---------------------------------------------------------------- position ids


def check_position_ids(tensor: torch.Tensor, where: str) -> str:
    """Check a ``position_ids`` buffer against ``arange``; it is recomputed on writing, so only its values count."""
    expected = torch.arange(tensor.shape[-1]).expand(tensor.shape)
    values = tensor.to(torch.float64)
    if not torch.equal(values.round(), expected.to(torch.float64)):
        raise ConversionError(
            f"{where} holds position_ids that are not 0..{tensor.shape[-1] - 1}; the text encoder of this file is "
            "damaged (a known fault of some merged checkpoints); repair the position_ids or use another file"
        )
    exact = torch.equal(values, expected.to(torch.float64))
    rounding = "" if exact else ", after rounding"
    return (
        f"{where}: position_ids checked equal to 0..{tensor.shape[-1] - 1}{rounding} (a constant buffer, not a weight)"
    )


# ---------------------------------------------------------------- diffusers sources


def _component_file(folder: Path, name: str, allow_pickle: bool) -> Path:
    stem = WEIGHT_NAMES.get(name, "diffusion_pytorch_model")
    for candidate in (folder / f"{stem}.safetensors", folder / f"{stem}.bin"):
        if candidate.is_file():
            if candidate.suffix == ".bin" and not allow_pickle:
                raise ConversionError(
                    f"{candidate} holds pickled weights; pass --allow-pickle to read them with "
                    "torch.load(weights_only=True), or re-save the folder with safe_serialization=True"
                )
            return candidate
    if (folder / f"{stem}.safetensors.index.json").is_file():
        raise ConversionError(
            f"{folder} holds sharded weights; save it unsharded (max_shard_size larger than the model)"
        )
    raise ConversionError(f"{folder} has no {stem}.safetensors")


def diffusers_component(
    folder: Path, name: str, allow_pickle: bool, config: dict | None = None, notes: list[str] | None = None
) -> tuple[Component, Path]:
    """A component from a diffusers folder (``unet/``, ``vae/``, ``text_encoder/``), keys made canonical."""
    path = _component_file(folder, name, allow_pickle)
    reader = open_weights(path, allow_pickle)
    comp = component_from_reader(reader, "unet" if name == "unet_ema" else name, "diffusers", str(path), notes=notes)
    cfg_path = folder / "config.json"
    if config is None and cfg_path.is_file():
        comp.config, comp.config_origin = read_json(cfg_path), str(cfg_path)
    elif config is not None:
        comp.config, comp.config_origin = config, "given config"
    return comp, path


def component_from_reader(
    reader, name: str, layout: str, origin: str, keys: dict[str, str] | None = None, notes: list[str] | None = None
) -> Component:
    """Wrap the tensors of ``reader`` (or the ``{canonical: original}`` subset ``keys``) as a component."""
    if keys is None:
        keys = strip_prefixes(list(reader.tensors), f"{name} of {origin}")
    if name == "text_encoder":
        if layout == "diffusers":
            keys = _strip_text(keys, origin)
        else:
            keys = {"text_model." + k: orig for k, orig in _strip_text(keys, origin).items()}
        pos_key = POSITION_IDS if layout == "diffusers" else "text_model." + POSITION_IDS
        if pos_key in keys:
            note = check_position_ids(reader.get(keys.pop(pos_key)), origin)
            if notes is not None:
                notes.append(note)
    tensors = {
        k: TensorRef(reader, orig, reader.tensors[orig].dtype, reader.tensors[orig].shape) for k, orig in keys.items()
    }
    return Component(name, layout, tensors, origin)


def _strip_text(keys: dict[str, str], origin: str) -> dict[str, str]:
    stripped = text_keys_without_text_model(list(keys), f"text encoder of {origin}")
    return {k: keys[orig] for k, orig in stripped.items()}


def is_pipeline_folder(path: Path) -> bool:
    return (
        path.is_dir()
        and (path / "model_index.json").is_file()
        or all((path / part).is_dir() for part in ("unet", "vae", "text_encoder"))
    )


def open_diffusers_source(path: Path, *, ema: str | None, allow_pickle: bool, unet_config: dict | None) -> Source:
    """A diffusers pipeline folder, a UNet folder, a training checkpoint folder, or a diffusers UNet file."""
    if path.is_file():
        return _open_file_source(path, ema=ema, allow_pickle=allow_pickle, unet_config=unet_config)
    if not path.is_dir():
        raise ConversionError(f"SRC {path} does not exist")
    if is_pipeline_folder(path):
        components, files, notes = {}, [], []
        for name in ("unet", "vae", "text_encoder"):
            comp, file = diffusers_component(path / name, name, allow_pickle, notes=notes)
            components[name], files = comp, files + [file]
        sched = folder_config(path, "scheduler")
        _refuse_other_families(components["unet"])
        return Source(
            path,
            "diffusers pipeline folder",
            components,
            files,
            scheduler_config=sched,
            notes=notes,
            pipeline_folder=path,
        )
    if (path / "unet").is_dir() or (path / "model.safetensors").is_file():
        return _open_training_checkpoint(path, ema=ema, allow_pickle=allow_pickle, unet_config=unet_config)
    if (path / "diffusion_pytorch_model.safetensors").is_file() or (path / "diffusion_pytorch_model.bin").is_file():
        comp, file = diffusers_component(path, "unet", allow_pickle, unet_config)
        _refuse_other_families(comp)
        return Source(path, "diffusers UNet folder", {"unet": comp}, [file])
    raise ConversionError(
        f"SRC {path} is a folder but not a diffusers pipeline (unet/, vae/, text_encoder/), a UNet folder "
        "(diffusion_pytorch_model.safetensors + config.json) or a training checkpoint (checkpoint-N with unet/)"
    )


def _open_training_checkpoint(path: Path, *, ema: str | None, allow_pickle: bool, unet_config: dict | None) -> Source:
    ema_dir = path / "unet_ema"
    if ema == "use":
        if not ema_dir.is_dir():
            raise ConversionError(f"--ema use: the checkpoint {path} has no unet_ema/ folder; leave out --ema")
        comp, file = diffusers_component(ema_dir, "unet_ema", allow_pickle, unet_config)
        kind = "training checkpoint folder (unet_ema/)"
    elif (path / "unet").is_dir():
        comp, file = diffusers_component(path / "unet", "unet", allow_pickle, unet_config)
        kind = "training checkpoint folder (unet/)"
    else:
        file = path / "model.safetensors"
        reader = open_weights(file, allow_pickle)
        comp = component_from_reader(reader, "unet", "diffusers", str(file))
        comp.config, comp.config_origin = unet_config, "given config" if unet_config else ""
        kind = "training checkpoint folder (accelerate model.safetensors)"
    _refuse_other_families(comp)
    return Source(path, kind, {"unet": comp}, [file])


def _open_file_source(path: Path, *, ema: str | None, allow_pickle: bool, unet_config: dict | None) -> Source:
    reader, kind, data = _open_any_file(path, allow_pickle)
    if kind == "earlier-trainer checkpoint":
        return earlier_trainer_source(path, data, unet_config)
    keys = list(reader.tensors)
    what = describe_keys(reader)
    if what != "diffusers-unet":
        if what == "ldm":
            raise ConversionError(
                f"{path} is already an original-layout (LDM) single file; use to-diffusers, or inspect to look at it"
            )
        raise ConversionError(f"{path} is {what}; to-single-file takes a diffusers UNet or pipeline")
    comp = component_from_reader(reader, "unet", "diffusers", str(path), strip_prefixes(keys, str(path)))
    cfg_path = path.parent / "config.json"
    if unet_config is not None:
        comp.config, comp.config_origin = unet_config, "given config"
    elif cfg_path.is_file():
        comp.config, comp.config_origin = read_json(cfg_path), str(cfg_path)
    _refuse_other_families(comp)
    return Source(path, "diffusers UNet file", {"unet": comp}, [path], metadata=dict(reader.metadata))


def _open_any_file(path: Path, allow_pickle: bool):
    if not path.is_file():
        raise ConversionError(f"{path} does not exist or is not a file")
    if sniff_format(path) == "pickle":
        data = load_pickle(path, allow_pickle)
        if EARLIER_TRAINER_KEYS <= data.keys():
            return None, "earlier-trainer checkpoint", data
        if isinstance(data.get("state_dict"), dict):
            data = data["state_dict"]
        return DictReader(_only_tensors(data, path), path), "pickle", data
    return SafetensorsReader(path), "safetensors", None


def earlier_trainer_source(path: Path, data: dict, unet_config: dict | None) -> Source:
    """The student of an earlier-trainer checkpoint; its keys may carry ``module.``/``_orig_mod.``/``unet.``."""
    student = data["student"]
    if not isinstance(student, dict):
        raise ConversionError(f"{path}: 'student' holds a {type(student).__name__}, not a state dict")
    reader = DictReader(_only_tensors(student, path), path)
    keys = strip_prefixes(list(student), f"student of {path}")
    comp = component_from_reader(reader, "unet", "diffusers", f"{path} ['student']", keys)
    comp.config, comp.config_origin = unet_config, "given config" if unet_config else ""
    _refuse_other_families(comp)
    notes = [f"{path}: entries cfg, opt, sched, gstep are training state, not weights; not converted"]
    return Source(path, "earlier-trainer checkpoint", {"unet": comp}, [path], notes=notes)


def describe_keys(reader) -> str:
    """``"ldm"``, ``"ldm-unet-bare"``, ``"diffusers-unet"`` or a phrase saying what else the keys are."""
    keys = list(reader.tensors)
    if not keys:
        return "an empty file (no tensors)"
    try:
        stripped = list(strip_prefixes(keys, str(reader.path)))
    except ConversionError:
        stripped = keys
    if any(
        k.startswith((UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX, EMA_PREFIX, "cond_stage_model.", "conditioner."))
        for k in keys
    ):
        shapes = {k: reader.tensors[k].shape for k in keys}
        what = describe_ldm_keys(shapes)
        return "ldm" if what == "sd1" else what
    if all(k.startswith(BARE_LDM_UNET_ROOTS) for k in stripped):
        shapes = {UNET_PREFIX + k: reader.tensors[o].shape for k, o in zip(stripped, keys)}
        what = describe_ldm_keys(shapes)
        return "ldm-unet-bare" if what == "sd1" else what
    if any(k.startswith(DIFFUSERS_UNET_ROOTS) for k in stripped):
        if any(k.startswith("add_embedding.") for k in stripped):
            return "an SDXL UNet in diffusers layout (add_embedding)"
        widths = {reader.tensors[o].shape[1] for k, o in zip(stripped, keys) if k.endswith("attn2.to_k.weight")}
        if 2048 in widths:
            return "an SDXL UNet in diffusers layout (cross-attention width 2048)"
        if 1024 in widths:
            return "an SD2 UNet in diffusers layout (cross-attention width 1024)"
        return "diffusers-unet"
    return describe_ldm_keys({k: reader.tensors[k].shape for k in keys})


def _refuse_other_families(comp: Component) -> None:
    if comp.config is not None:
        what = describe_unet_config(comp.config)
        if what != "sd1":
            raise ConversionError(f"{comp.origin} is {what}; Flow Lune converts only SD1-family (SD1.5) models")
    if any(k.startswith("add_embedding.") for k in comp.tensors):
        raise ConversionError(f"{comp.origin} is an SDXL UNet (add_embedding); Flow Lune converts only SD1.5 models")
    widths = {ref.shape[1] for k, ref in comp.tensors.items() if k.endswith("attn2.to_k.weight")}
    if widths & {1024, 2048}:
        family = "SDXL" if 2048 in widths else "SD2"
        raise ConversionError(
            f"{comp.origin} is an {family} UNet (cross-attention width {max(widths)}); "
            "Flow Lune converts only SD1.5 models"
        )


def resolve_path(path: str | os.PathLike) -> Path:
    return Path(path).expanduser()
