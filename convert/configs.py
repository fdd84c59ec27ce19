"""Configs of the components: built-in SD1.5 ones, or read from a local diffusers folder.

The built-in files in ``configs/sd15/`` are SD1.5's own (runwayml/stable-diffusion-v1-5), so that
a single file converts offline without any download.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import ConversionError

BUILTIN_DIR = Path(__file__).parent / "configs"
COMPONENTS = ("unet", "vae", "text_encoder")  # the weight-carrying parts of an SD1.5 pipeline
CONFIG_FILENAMES = {
    "unet": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
}


def builtin_config(component: str, family: str = "sd15") -> dict:
    """The built-in config of ``component`` (``unet``, ``vae``, ``text_encoder``, ``scheduler``)."""
    path = BUILTIN_DIR / family / f"{component}.json"
    if not path.is_file():
        raise ConversionError(f"no built-in {family} config for component {component!r} (looked for {path})")
    return json.loads(path.read_text(encoding="utf-8"))


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from ``path``, or a ConversionError naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ConversionError(f"cannot read config {path}: {err}") from err
    if not isinstance(data, dict):
        raise ConversionError(f"config {path} is not a JSON object")
    return data


def folder_config(folder: str | os.PathLike, component: str) -> dict | None:
    """The config of ``component`` from a diffusers pipeline folder (or the component folder itself)."""
    folder = Path(folder)
    name = CONFIG_FILENAMES[component]
    for candidate in (folder / component / name, folder / name):
        if candidate.is_file():
            data = read_json(candidate)
            if candidate.parent == folder and not _looks_like(component, data):
                continue
            return data
    return None


def _looks_like(component: str, config: dict) -> bool:
    """Whether a config found at a folder's top belongs to ``component`` (a UNet folder has one config)."""
    cls = str(config.get("_class_name", "")) + " ".join(config.get("architectures", []) or [])
    return {
        "unet": "UNet" in cls,
        "vae": "Autoencoder" in cls,
        "text_encoder": "CLIPText" in cls or config.get("model_type") == "clip_text_model",
        "scheduler": "Scheduler" in cls,
    }[component]


def clean_config(config: dict) -> dict:
    """``config`` without the private keys (``_class_name`` and such) that ``from_config`` adds back."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


# ---------------------------------------------------------------- Flow Lune student vs. epsilon teacher

FLOW_TRAIN_TIMESTEPS = 1000  # the single file's convention: timestep = 1000 * sigma (metadata.FLOW_CONVENTION)
TEACHER_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # what DDPM-family schedulers predict


def flow_scheduler_config(shift: float) -> dict:
    """The ``scheduler_config.json`` of a Flow Lune student: ``FlowLuneScheduler(num_train_timesteps=1000, shift)``."""
    from flow_lune.schedulers import FlowLuneScheduler

    scheduler = FlowLuneScheduler(num_train_timesteps=FLOW_TRAIN_TIMESTEPS, shift=float(shift))
    return json.loads(scheduler.to_json_string())  # the same JSON that save_pretrained writes


def flow_model_index(tokenizer: bool) -> dict:
    """``model_index.json`` of a FlowLunePipeline folder, as ``FlowLunePipeline.save_pretrained`` records it.

    The scheduler is a class outside diffusers, so diffusers records it by module path
    (``flow_lune.schedulers.scheduling_flow_lune``) and finds it once ``flow_lune.pipelines`` is imported.
    """
    from flow_lune.schedulers import FlowLuneScheduler

    return {
        "_class_name": "FlowLunePipeline",
        "scheduler": [FlowLuneScheduler.__module__, FlowLuneScheduler.__name__],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"] if tokenizer else [None, None],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def teacher_scheduler(config: dict | None) -> str | None:
    """``"PNDMScheduler (prediction_type 'epsilon')"`` when ``config`` is an epsilon/v/sample DDPM-family scheduler.

    That is a teacher's scheduler (it has ``beta_schedule`` or a DDPM ``prediction_type``), not a Flow
    Lune student's (``FlowLuneScheduler``/``FlowMatchEulerDiscreteScheduler`` have neither). None otherwise.
    """
    if not config:
        return None
    prediction = config.get("prediction_type")
    if prediction not in TEACHER_PREDICTION_TYPES and "beta_schedule" not in config:
        return None
    shown = repr(prediction) if prediction else "not set, 'epsilon' by diffusers' default"
    return f"{config.get('_class_name', 'a scheduler without _class_name')} (prediction_type {shown})"
