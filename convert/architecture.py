"""What a model is: the tensors a config implies, and which family a set of keys belongs to."""

from __future__ import annotations

import functools
import json

import torch

from .configs import clean_config
from .errors import ConversionError

Shape = tuple[int, ...]

TEXT_MODEL_PREFIX = "text_model."
SD1_DOWN_TYPES = {"CrossAttnDownBlock2D", "DownBlock2D"}
SD1_UP_TYPES = {"CrossAttnUpBlock2D", "UpBlock2D"}
SD1_CROSS_ATTENTION_DIM = 768  # CLIP ViT-L/14; SD2 uses 1024 (OpenCLIP ViT-H), SDXL 2048


@functools.lru_cache(maxsize=16)
def _meta_shapes(component: str, config_json: str) -> tuple[tuple[str, Shape], ...]:
    config = json.loads(config_json)
    with torch.device("meta"):
        if component == "unet":
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel.from_config(config)
        elif component == "vae":
            from diffusers import AutoencoderKL

            model = AutoencoderKL.from_config(config)
        elif component == "text_encoder":
            from transformers import CLIPTextConfig, CLIPTextModel

            model = CLIPTextModel(CLIPTextConfig(**config))
        else:
            raise ConversionError(f"unknown component {component!r}; expected unet, vae or text_encoder")
    return tuple((key, tuple(t.shape)) for key, t in model.state_dict().items())


def expected_shapes(component: str, config: dict) -> dict[str, Shape]:
    """The diffusers state-dict keys and shapes that ``config`` implies, built on the meta device (no memory).

    Text-encoder keys are given without ``text_model.``, whichever form the installed transformers uses.
    """
    if component == "unet":
        check_unet_config(config)
    shapes = dict(_meta_shapes(component, json.dumps(clean_config(config), sort_keys=True)))
    if component == "text_encoder":
        shapes = {strip_text_model(key): shape for key, shape in shapes.items()}
    return shapes


def text_keys_carry_text_model(config: dict) -> bool:
    """Whether the installed transformers' ``CLIPTextModel.state_dict()`` keys start with ``text_model.``."""
    keys = [key for key, _ in _meta_shapes("text_encoder", json.dumps(clean_config(config), sort_keys=True))]
    return all(key.startswith(TEXT_MODEL_PREFIX) for key in keys)


def strip_text_model(key: str) -> str:
    return key[len(TEXT_MODEL_PREFIX) :] if key.startswith(TEXT_MODEL_PREFIX) else key


def check_unet_config(config: dict) -> None:
    """Refuse a UNet config that is not of the SD1 family, saying what it is."""
    what = describe_unet_config(config)
    if what != "sd1":
        raise ConversionError(f"the UNet config describes {what}; Flow Lune converts only SD1-family (SD1.5) UNets")


def describe_unet_config(config: dict) -> str:
    """``"sd1"`` for an SD1-family UNet config, else a phrase saying what it is."""
    if config.get("addition_embed_type") == "text_time" or config.get("cross_attention_dim") == 2048:
        return "an SDXL UNet (addition_embed_type text_time / cross_attention_dim 2048)"
    if config.get("cross_attention_dim") == 1024:
        return "an SD2 UNet (cross_attention_dim 1024, OpenCLIP ViT-H text encoder)"
    layers = config.get("transformer_layers_per_block", 1)
    down = set(config.get("down_block_types") or ())
    up = set(config.get("up_block_types") or ())
    reasons = []
    if not down <= SD1_DOWN_TYPES or not up <= SD1_UP_TYPES:
        reasons.append(f"block types {sorted(down | up)}")
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        reasons.append(f"mid_block_type {config.get('mid_block_type')!r}")
    if layers != 1 and layers != [1] * len(down):
        reasons.append(f"transformer_layers_per_block {layers!r}")
    for key in ("class_embed_type", "addition_embed_type", "time_cond_proj_dim", "encoder_hid_dim_type"):
        if config.get(key) is not None:
            reasons.append(f"{key} {config[key]!r}")
    if not isinstance(config.get("layers_per_block", 2), int):
        reasons.append(f"layers_per_block {config['layers_per_block']!r}")
    if reasons:
        return "a UNet outside the SD1 family (" + ", ".join(reasons) + ")"
    return "sd1"


def describe_ldm_keys(shapes: dict[str, Shape]) -> str:
    """``"sd1"`` when the keys of an original-layout file are SD1-family, else what they are.

    Reads the key families and the cross-attention width (``attn2.to_k`` input size): 768 for
    SD1, 1024 for SD2, 2048 for SDXL.
    """
    keys = shapes.keys()
    if any(k.startswith(("model.diffusion_model.joint_blocks.", "joint_blocks.")) for k in keys):
        return "an SD3 model (MMDiT joint_blocks)"
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in keys):
        return "a Flux model (double_blocks)"
    if any(k.startswith("conditioner.embedders.") for k in keys):
        return "an SDXL model (conditioner.embedders.*)"
    if any(k.startswith("model.diffusion_model.label_emb.") for k in keys):
        return "an SDXL-style UNet (label_emb, class/size conditioning)"
    widths = {shape[1] for k, shape in shapes.items() if k.endswith("attn2.to_k.weight") and len(shape) == 2}
    if 2048 in widths:
        return "an SDXL UNet (cross-attention width 2048)"
    if any(k.startswith("cond_stage_model.model.") for k in keys) or 1024 in widths:
        return "an SD2 model (OpenCLIP text encoder / cross-attention width 1024)"
    if not any(k.startswith("model.diffusion_model.input_blocks.") for k in keys):
        if any(k.startswith(("down_blocks.", "unet.down_blocks.")) for k in keys):
            return "a diffusers-layout UNet (not an original-layout single file)"
        return "not a Stable Diffusion single file (no model.diffusion_model.input_blocks.* keys)"
    return "sd1"
