"""A ComfyUI workflow (API prompt format) that samples a Flow Lune file correctly.

ComfyUI loads every SD1.5 file as an epsilon model; nothing in the file can change that. A flow
model samples right only through ``ModelSamplingSD3`` (discrete flow sigmas with the shift, CONST
model: denoised = x - sigma * v), which is what this graph puts between the loader and the sampler.
An epsilon file (a teacher) gets the same graph without that node: ComfyUI's own way to sample SD1.5.
"""

from __future__ import annotations

DEFAULT_BASE_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"  # SD1.5's usual file name, for CLIP and VAE
DEFAULT_NEGATIVE = ""  # distilled with the empty prompt as the unconditional branch


def comfyui_workflow(
    ckpt_name: str,
    *,
    shift: float | None,
    cfg: float,
    steps: int,
    width: int = 512,
    height: int = 512,
    unet_only: bool = False,
    base_ckpt_name: str = DEFAULT_BASE_CHECKPOINT,
    prompt: str = "a photograph of a lighthouse on a cliff at sunset",
    seed: int = 0,
) -> dict:
    """API-format graph: loader -> ModelSamplingSD3(shift) -> KSampler(euler, simple, cfg) -> VAEDecode -> SaveImage.

    ``shift`` None: an epsilon model, loader -> KSampler(euler, normal, cfg) with no ModelSamplingSD3 (a plain
    SD1.5 graph, e.g. to sample the teacher beside its student with the same prompt and seed).
    A UNet-only file loads through ``UNETLoader``, with CLIP and VAE taken from ``base_ckpt_name``.
    """
    graph: dict[str, dict] = {}
    if unet_only:
        graph["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": ckpt_name, "weight_dtype": "default"}}
        graph["2"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": base_ckpt_name}}
        model, clip, vae = ["1", 0], ["2", 1], ["2", 2]
    else:
        graph["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}}
        model, clip, vae = ["1", 0], ["1", 1], ["1", 2]
    if shift is not None:
        graph["3"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": model, "shift": float(shift)}}
        model = ["3", 0]
    graph["4"] = {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": clip}}
    graph["5"] = {"class_type": "CLIPTextEncode", "inputs": {"text": DEFAULT_NEGATIVE, "clip": clip}}
    graph["6"] = {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}}
    graph["7"] = {
        "class_type": "KSampler",
        "inputs": {
            "model": model,
            "positive": ["4", 0],
            "negative": ["5", 0],
            "latent_image": ["6", 0],
            "seed": seed,
            "steps": int(steps),
            "cfg": float(cfg),
            "sampler_name": "euler",
            # flow: ModelSamplingSD3's own sigma table, evenly spaced in t; epsilon: ComfyUI's default for SD1.5
            "scheduler": "simple" if shift is not None else "normal",
            "denoise": 1.0,
        },
    }
    graph["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": vae}}
    graph["9"] = {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "flow_lune"}}
    return graph
