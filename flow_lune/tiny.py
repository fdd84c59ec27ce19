"""Tiny Stable Diffusion 1.5 components, built from configs, offline.

They keep SD1.5's architecture (four down blocks, three of them with cross-attention, conv
``proj_in``/``proj_out``, a VAE with downsampling factor 8, a CLIP text encoder, scaled-linear
DDPM betas) at a few channels, so that every test and the README's default run finish in
seconds on a CPU without any download. The tokenizer is byte-level: one token per byte, no BPE
merges, so its files are a few kilobytes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TINY_UNET_CONFIG = {
    "sample_size": 8,  # 64 px images at the VAE's factor 8
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (32, 32, 64, 64),  # multiples of norm_num_groups
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "cross_attention_dim": 32,  # = the tiny text encoder's hidden size
    "attention_head_dim": 8,  # SD1.5's value (read as the number of heads)
    "use_linear_projection": False,  # SD1.5 uses conv 1x1 proj_in/proj_out
}

TINY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (32, 32, 64, 64),  # four blocks: downsampling factor 8, as SD1.5
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "latent_channels": 4,
    "sample_size": 64,
    "scaling_factor": 0.18215,  # SD1.5's latent scaling
}

TINY_TEXT_CONFIG = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,  # CLIP's context length, as SD1.5
    "projection_dim": 32,
    "hidden_act": "quick_gelu",
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
}

# SD1.5's scheduler: PNDM over DDPM's scaled-linear betas 0.00085..0.012, epsilon prediction.
SD15_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}


def byte_level_vocab() -> dict[str, int]:
    """The tiny tokenizer's vocabulary: the two special tokens, then every byte alone and as word end."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>", *symbols, *(s + "</w>" for s in symbols)]
    return {tok: i for i, tok in enumerate(tokens)}


def tiny_tokenizer(folder: str | os.PathLike | None = None) -> CLIPTokenizer:
    """A byte-level ``CLIPTokenizer``; from ``folder``'s vocab files when given, else built in memory."""
    if folder is not None:
        folder = Path(folder)
        return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    return CLIPTokenizer(vocab=byte_level_vocab(), merges=[], model_max_length=77)


@dataclass
class TinySDComponents:
    """The five components of a Stable Diffusion 1.5 pipeline, tiny."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: PNDMScheduler

    def as_dict(self) -> dict:
        return dict(
            unet=self.unet,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            scheduler=self.scheduler,
        )


def tiny_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY_UNET_CONFIG, **overrides}).eval()


def tiny_sd_components(seed: int = 0, tokenizer_folder: str | os.PathLike | None = None) -> TinySDComponents:
    """Random tiny SD1.5 components; the same ``seed`` gives the same weights."""
    unet = tiny_unet(seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**TINY_VAE_CONFIG).eval()
    torch.manual_seed(seed + 2)
    text_config = CLIPTextConfig(vocab_size=len(byte_level_vocab()), **TINY_TEXT_CONFIG)
    text_encoder = CLIPTextModel(text_config).eval()
    return TinySDComponents(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(tokenizer_folder),
        scheduler=PNDMScheduler(**SD15_SCHEDULER_CONFIG),
    )


def save_tiny_sd_pipeline(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Write a tiny ``StableDiffusionPipeline`` folder (no safety checker) loadable offline."""
    from diffusers import StableDiffusionPipeline

    folder = Path(folder)
    pipe = StableDiffusionPipeline(
        **tiny_sd_components(seed).as_dict(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
