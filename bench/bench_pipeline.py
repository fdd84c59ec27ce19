"""Pipeline overhead: FlowLunePipeline.__call__ wall time over the summed time of its model calls.

Model calls are the text encoder, every UNet call and the VAE decoder (``post_quant_conv`` + ``decoder``),
timed by forward pre/post hooks in the same process. The same ratio is measured for diffusers'
``StableDiffusionPipeline`` doing the same work (same components, EulerDiscreteScheduler, same steps,
guidance on). The two alternate, A then B, and medians and minima are printed.

Goal: FlowLune's ratio at most 1.05, and not above diffusers'.

    python bench/bench_pipeline.py [--runs 7] [--steps 6] [--latent 32]
"""

import argparse
import statistics
import time

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel

from flow_lune.pipelines import FlowLunePipeline
from flow_lune.schedulers import FlowLuneScheduler
from flow_lune.tiny import SD15_SCHEDULER_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG, tiny_sd_components

# Small but not tiny: SD1.5's UNet layout at a quarter of its widths (320..1280 -> 64..256).
BENCH_UNET = {**TINY_UNET_CONFIG, "block_out_channels": (64, 128, 256, 256), "sample_size": 32}


class ModelTimer:
    """Sums the wall time spent inside the given modules' forward calls (pre hook to post hook)."""

    def __init__(self, *modules: torch.nn.Module):
        self.total = 0.0
        self._start: dict[int, float] = {}
        for m in modules:
            m.register_forward_pre_hook(self._pre)
            m.register_forward_hook(self._post)

    def _pre(self, module, args):
        self._start[id(module)] = time.perf_counter()

    def _post(self, module, args, output):
        self.total += time.perf_counter() - self._start.pop(id(module))


def build(latent: int):
    parts = tiny_sd_components(seed=0)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**BENCH_UNET, "sample_size": latent}).eval()
    torch.manual_seed(1)
    vae = AutoencoderKL(**{**TINY_VAE_CONFIG, "sample_size": latent * 8}).eval()
    common = dict(vae=vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=unet)
    flow = FlowLunePipeline(**common, scheduler=FlowLuneScheduler(shift=3.0))
    euler = EulerDiscreteScheduler.from_config(SD15_SCHEDULER_CONFIG)
    sd = StableDiffusionPipeline(
        **common, scheduler=euler, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    for p in (flow, sd):
        p.set_progress_bar_config(disable=True)
    timer = ModelTimer(parts.text_encoder, unet, vae.post_quant_conv, vae.decoder)
    return flow, sd, timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="alternating runs per pipeline (>= 5)")
    parser.add_argument("--steps", type=int, default=6, help="sampling steps (a few-step student's range)")
    parser.add_argument("--latent", type=int, default=32, help="latent side; images are 8x larger")
    parser.add_argument("--guidance", type=float, default=7.5, help="CFG on: two UNet halves per step")
    args = parser.parse_args()
    if args.runs < 5:
        parser.error(f"--runs {args.runs}: need at least 5 for medians and minima")

    flow, sd, timer = build(args.latent)
    size = args.latent * 8
    kwargs = dict(num_inference_steps=args.steps, guidance_scale=args.guidance, height=size, width=size)
    results = {"FlowLunePipeline": [], "StableDiffusionPipeline": []}

    def run(name, pipe, seed):
        timer.total = 0.0
        start = time.perf_counter()
        pipe("a photo of a cat", generator=torch.Generator().manual_seed(seed), **kwargs)
        wall = time.perf_counter() - start
        results[name].append((wall, timer.total))

    run("FlowLunePipeline", flow, 0)  # warm-up: first-call kernel selection, not counted
    run("StableDiffusionPipeline", sd, 0)
    for v in results.values():
        v.clear()
    for i in range(args.runs):
        order = [("FlowLunePipeline", flow), ("StableDiffusionPipeline", sd)]
        for name, pipe in order if i % 2 == 0 else order[::-1]:
            run(name, pipe, i)

    print(
        f"UNet block_out_channels {BENCH_UNET['block_out_channels']}, {args.latent}x{args.latent} latents "
        f"({size}px), {args.steps} steps, guidance {args.guidance}, {args.runs} alternating runs, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"{'pipeline':<26}{'wall med':>10}{'wall min':>10}{'models med':>12}{'ratio med':>11}{'ratio min':>11}")
    ratios = {}
    for name, rows in results.items():
        walls = [w for w, _ in rows]
        models = [m for _, m in rows]
        ratio = [w / m for w, m in rows]
        ratios[name] = ratio
        print(
            f"{name:<26}{statistics.median(walls):>10.3f}{min(walls):>10.3f}{statistics.median(models):>12.3f}"
            f"{statistics.median(ratio):>11.4f}{min(ratio):>11.4f}"
        )
    flow_r, sd_r = ratios["FlowLunePipeline"], ratios["StableDiffusionPipeline"]
    print(
        f"FlowLune overhead ratio: median {statistics.median(flow_r):.4f}, min {min(flow_r):.4f} (goal <= 1.05); "
        f"diffusers: median {statistics.median(sd_r):.4f}, min {min(sd_r):.4f}"
    )
    rel = [f / s for f, s in zip(flow_r, sd_r)]
    print(f"FlowLune ratio / diffusers ratio, per pair: median {statistics.median(rel):.4f}, min {min(rel):.4f}")


if __name__ == "__main__":
    main()
