"""Model work for the data caches: text embeddings, image preprocessing and VAE encoding, teacher generation.

- Text embeddings are the text encoder's last hidden state over 77 tokens padded to "max_length", from the
  pipeline's own ``encode_text`` (what ``FlowLunePipeline`` feeds the UNet), in float32.
- Images: shorter side resized to ``resolution``, centre or seeded random crop, optional seeded flip, encoded
  once by the VAE in float32 as ``latent_dist.mode() * scaling_factor``.
- Generated latents: ``FlowLunePipeline.from_teacher`` on the sigmas of DDIM's timesteps (the exact bridge,
  which *is* DDIM with eta 0), each row's starting noise from its own seeded generator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .seeds import row_rng

if TYPE_CHECKING:
    from .data_config import DataConfig
    from .models import TeacherComponents


def device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def encode_prompts(prompts: Sequence[str], text_encoder: Any, tokenizer: Any) -> torch.Tensor:
    """Last hidden state (B, 77, D) over prompts padded to "max_length", in float32 (the pipeline's encoding)."""
    from flow_lune.pipelines.pipeline_flow_lune import encode_text

    return encode_text(tokenizer, text_encoder, list(prompts), device_of(text_encoder)).float()


def preprocess_image(image: Any, config: DataConfig, row: int) -> tuple[torch.Tensor, dict]:
    """An image as (3, r, r) pixels in [-1, 1], and the crop/flip applied.

    Shorter side resized to ``resolution`` (bilinear, as diffusers' trainers via torchvision), then a
    centre crop or a crop at a random offset, then a horizontal flip with probability 1/2 if
    ``random_flip``; the random choices come from the stream seeded by ``(seed, row)``.
    """
    from PIL import Image

    image = image.convert("RGB")
    r = config.resolution
    w, h = image.size
    if min(w, h) != r:
        short, long = (w, h) if w <= h else (h, w)
        long = int(r * long / short)
        w, h = (r, long) if w <= h else (long, r)
        image = image.resize((w, h), Image.BILINEAR)
    rng = row_rng(config.seed, row, "transform")
    if config.center_crop:
        top, left = int(round((h - r) / 2.0)), int(round((w - r) / 2.0))
    else:
        top, left = rng.randint(0, h - r), rng.randint(0, w - r)
    image = image.crop((left, top, left + r, top + r))
    flip = bool(config.random_flip and rng.random() < 0.5)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return pixels, {"crop_top_left": [top, left], "flip": flip}


@torch.no_grad()
def encode_images(pixels: torch.Tensor, vae: Any) -> torch.Tensor:
    """``vae.encode(pixels).latent_dist.mode() * scaling_factor`` in float32."""
    x = pixels.to(device_of(vae), torch.float32)
    return (vae.encode(x).latent_dist.mode() * vae.config.scaling_factor).float()


def generation_sigmas(scheduler_config: Mapping[str, Any], steps: int) -> torch.Tensor:
    """Flow sigmas of DDIM's timesteps for ``steps`` steps, ``sigma(t) = s_t / (a_t + s_t)``, float64."""
    from diffusers import DDIMScheduler

    from flow_lune.flow import TeacherSchedule, sigma_from_t

    ddim = DDIMScheduler.from_config(dict(scheduler_config))
    ddim.set_timesteps(steps)
    return sigma_from_t(ddim.timesteps, TeacherSchedule.from_scheduler_config(scheduler_config))


@torch.no_grad()
def generate_latents(
    teacher: TeacherComponents,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    noise: torch.Tensor,
    steps: int,
    guidance: float,
) -> torch.Tensor:
    """The teacher's x0 for a batch: ``FlowLunePipeline.from_teacher`` over DDIM's sigmas, with CFG.

    Starts at ``x = n(sigma_0) * noise`` (the teacher's ``x_t = noise``), Euler-steps the guided bridge velocity
    (float64 sigmas: the teacher is queried at DDIM's integer timesteps exactly) and ends at sigma = 0. Equal to
    DDIM (eta 0) with ``set_alpha_to_one=True`` over the raw UNet, per DESIGN.md section 2. Returns float32.
    """
    from flow_lune.flow import noise_norm
    from flow_lune.pipelines import FlowLunePipeline

    sigmas = generation_sigmas(teacher.scheduler_config, steps)  # float64
    pipe = FlowLunePipeline.from_teacher(teacher)
    pipe.set_progress_bar_config(disable=True)
    device = device_of(teacher.unet)
    latents = noise.to(device, torch.float32) * noise_norm(sigmas[0].float()).to(device)
    b, _, h, w = latents.shape
    x0 = pipe(
        height=h * pipe.vae_scale_factor,
        width=w * pipe.vae_scale_factor,
        prompt_embeds=cond.to(device),
        negative_prompt_embeds=uncond.to(device).expand(b, -1, -1),
        sigmas=sigmas,
        latents=latents,
        guidance_scale=guidance,
        output_type="latent",
    ).images
    return x0.float()
