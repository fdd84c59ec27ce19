"""The toy world's model architectures and the build's stage settings (``python -m flow_lune.toy.build``)."""

from __future__ import annotations

from dataclasses import dataclass, replace

VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (
        16,
        16,
        32,
        32,
    ),  # four blocks: factor 8 as SD1.5; 261k parameters (measured when Flow Lune was designed)
    "layers_per_block": 1,
    "norm_num_groups": 8,  # divides 16
    "latent_channels": 4,
    "sample_size": 64,
}

UNET_CONFIG = {
    "sample_size": 8,  # 64 px at the VAE's factor 8
    "in_channels": 4,
    "out_channels": 4,
    # SD1.5's block layout, so the nine hooked blocks, the assessor and the LDM converter apply unchanged
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (
        32,
        64,
        64,
        64,
    ),  # 2.17M parameters: trains in ~30 min on 2 cores (measured when Flow Lune was designed)
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "cross_attention_dim": 64,  # = the text encoder's hidden size
    "attention_head_dim": 8,  # SD1.5's value (read as the number of heads)
    "use_linear_projection": False,  # SD1.5's conv 1x1 proj_in/proj_out
}

TEXT_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,  # six-word captions from 22 words: two layers suffice
    "num_attention_heads": 4,
    "max_position_embeddings": 77,  # CLIP's context length, as SD1.5
    "projection_dim": 64,
    "hidden_act": "quick_gelu",
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 1,
}


@dataclass
class BuildConfig:
    """Sizes and optimisation settings of every stage."""

    seed: int = 0
    train_images: int = 4800  # 100 draws of each of the 48 attribute combinations
    heldout_images: int = 480  # 10 per combination: judge and VAE checks
    judge_steps: int = 400  # >= 99.9% held-out accuracy by ~200 steps of batch 64
    vae_steps: int = 1000  # foreground weighting restores the colour of small shapes in ~400 steps
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_foreground_weight: float = 10.0  # pixels of the shape count 10x (it fixed the lost colours of small shapes)
    vae_kl_weight: float = 1e-6  # SD's VAE: a KL term only to keep the latent scale tame
    unet_steps: int = 4000  # 2000 steps gave 93-96%; 0.32 s a step here leaves room for twice that
    unet_batch: int = 64
    unet_lr: float = 8e-4
    unet_warmup: int = 100
    ema_decay: float = 0.998  # averages over ~500 steps: a quarter of the run
    min_snr_gamma: float = 5.0  # min-SNR weighting (Hang et al. 2023), its recommended value
    caption_dropout: float = 0.1  # empty prompt 10% of the time: classifier-free guidance
    check_prompts: int = 96  # DDIM 25 check at the end: two draws of each combination
    check_guidance: tuple[float, ...] = (2.0, 3.0)
    threads: int = 1  # one torch thread often faster under contention on 2 cores
    reuse: str | None = None  # a previous build's folder: take its judge and VAE, rerun from the latents on

    def quick(self) -> BuildConfig:
        """A few steps per stage: for smoke tests of the whole build."""
        return replace(
            self, train_images=96, heldout_images=48, judge_steps=5, vae_steps=5, vae_batch=8,
            unet_steps=5, unet_batch=8, unet_warmup=2, check_prompts=4, check_guidance=(3.0,),
        )  # fmt: skip
