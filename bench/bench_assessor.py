"""The assessor's share of the training step time (goal: at most 5%).

Prints, in one process:

1. tiny configuration (tiny teacher and student, 8x8 latents, batch ``--batch_size``): one full distillation
   step (``objective.distillation_loss`` + backward + fused AdamW) with ``ConstantBlockPenalty`` (A, the
   ``--assessor none`` control) and with ``AssessorBlockPenalty`` (B), alternated A/B over ``--runs`` runs of
   ``--steps`` steps (order ABBA...): medians, minima, and B/A - 1; plus the weighting call alone over the A step time.
2. with ``--sd15``: the assessor at SD1.5 channel counts (hidden 256, embed 64) on SD1.5-sized pooled
   features, against one forward of a randomly initialised full SD1.5 UNet at 32x32 latents, batch 1, fp32
   (measured alternately in this run). A training step holds at least one teacher forward plus a student
   forward and backward (about 5.8 forwards, DESIGN.md section 9), so call / forward bounds the step share
   from above by that factor.

    python bench/bench_assessor.py [--runs 7] [--steps 5] [--batch_size 4] [--sd15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from flow_lune.flow import EpsilonToFlowUNet, SigmaSampler  # noqa: E402
from flow_lune.tiny import SD15_SCHEDULER_CONFIG, tiny_unet  # noqa: E402
from flow_lune.training.assessor import Assessor, AssessorConfig  # noqa: E402
from flow_lune.training.block_features import BASE_BLOCK_WEIGHTS, BLOCK_NAMES, BlockFeatureHooks, block_channels  # noqa: E402
from flow_lune.training.block_penalty import (
    AssessorBlockPenalty,  # noqa: E402
    ConstantBlockPenalty,  # noqa: E402
)
from flow_lune.training.fusion import FusionConfig  # noqa: E402
from flow_lune.training.objective import ObjectiveConfig, distillation_loss  # noqa: E402

SD15_UNET_CONFIG = {  # runwayml/stable-diffusion-v1-5 unet/config.json, the parts that differ from the defaults
    "sample_size": 64,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
}


def assessor_for(channels: list[int]) -> Assessor:
    """An assessor with the default sizes; its cost does not depend on trained values."""
    assessor = Assessor(AssessorConfig(channels, list(BLOCK_NAMES)))
    return assessor.eval().requires_grad_(False)


def summary(name: str, times: list[float]) -> str:
    return f"{name:<34} median {statistics.median(times) * 1e3:9.2f} ms   min {min(times) * 1e3:9.2f} ms"


def bench_tiny(runs: int, steps: int, batch_size: int) -> None:
    g = torch.Generator().manual_seed(0)
    teacher = tiny_unet(seed=0).eval().requires_grad_(False)
    student = tiny_unet(seed=1).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=True)
    bridge = EpsilonToFlowUNet(teacher, SD15_SCHEDULER_CONFIG)
    sampler = SigmaSampler()
    config = ObjectiveConfig()
    weightings = {
        "A none": ConstantBlockPenalty(BASE_BLOCK_WEIGHTS),
        "B assessor": AssessorBlockPenalty(assessor_for(block_channels(teacher)), BASE_BLOCK_WEIGHTS, FusionConfig()),
    }
    x0 = torch.randn(batch_size, 4, 8, 8, generator=g)
    embeds = torch.randn(batch_size, 77, 32, generator=g)

    def step(weighting) -> float:
        start = time.perf_counter()
        sigma = sampler.sample(batch_size, g)
        eps = torch.randn(x0.shape, generator=g)
        out = distillation_loss(student, bridge, s_hooks, t_hooks, x0, eps, sigma, embeds, weighting, config)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times = {k: [] for k in weightings}
    call_times = []
    with BlockFeatureHooks(student) as s_hooks, BlockFeatureHooks(teacher) as t_hooks:
        for w in weightings.values():  # warm-up
            step(w)
        for r in range(runs):  # A B, then B A: no order bias
            order = list(weightings.items()) if r % 2 == 0 else list(reversed(weightings.items()))
            for name, w in order:
                times[name].append(statistics.median(step(w) for _ in range(steps)))
        # the weighting call alone, on pooled features of the tiny UNet's shapes
        pooled = [torch.randn(batch_size, c, generator=g) for c in block_channels(teacher)]
        sigma = sampler.sample(batch_size, g)
        with torch.no_grad():
            for _ in range(runs):
                start = time.perf_counter()
                for _ in range(steps):
                    weightings["B assessor"](pooled, pooled, sigma)
                call_times.append((time.perf_counter() - start) / steps)
    a, b = times["A none"], times["B assessor"]
    print(f"== tiny configuration: batch {batch_size}, {runs} runs x {steps} steps (A/B alternated) ==")
    print(summary("step, --assessor none (A)", a))
    print(summary("step, --assessor PATH (B)", b))
    print(summary("assessor call alone", call_times))
    print(
        f"B/A - 1 (medians): {statistics.median(b) / statistics.median(a) - 1:+.2%}   "
        f"(minima): {min(b) / min(a) - 1:+.2%}"
    )
    print(
        f"call / step A (medians): {statistics.median(call_times) / statistics.median(a):.2%}   "
        f"(minima): {min(call_times) / min(a):.2%}"
    )


def bench_sd15(runs: int, batch_size: int) -> None:
    from diffusers import UNet2DConditionModel

    g = torch.Generator().manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval().requires_grad_(False)
    channels = block_channels(unet)
    weighting = AssessorBlockPenalty(assessor_for(channels), BASE_BLOCK_WEIGHTS, FusionConfig())
    n_assessor = weighting.assessor.num_parameters()
    n_unet = sum(p.numel() for p in unet.parameters())
    pooled = [torch.randn(batch_size, c, generator=g) for c in channels]
    sigma = torch.rand(batch_size, generator=g)
    x = torch.randn(1, 4, 32, 32, generator=g)
    c = torch.randn(1, 77, 768, generator=g)
    t = torch.tensor([500.0])
    fwd, call = [], []
    with torch.no_grad():
        unet(x, t, c)  # warm-up
        weighting(pooled, pooled, sigma)
        for _ in range(runs):
            start = time.perf_counter()
            unet(x, t, c)
            fwd.append(time.perf_counter() - start)
            start = time.perf_counter()
            for _ in range(10):
                weighting(pooled, pooled, sigma)
            call.append((time.perf_counter() - start) / 10)
    print(
        f"== SD1.5 channel counts {channels}: assessor {n_assessor / 1e6:.2f}M parameters "
        f"= {n_assessor / n_unet:.2%} of the UNet's {n_unet / 1e6:.1f}M =="
    )
    print(summary("UNet forward, 32x32, batch 1", fwd))
    print(summary(f"assessor call, batch {batch_size}", call))
    r_med = statistics.median(call) / statistics.median(fwd)
    print(
        f"call / one UNet forward (medians): {r_med:.2%}   (minima): {min(call) / min(fwd):.2%}; "
        f"a step is >= 5.8 forwards, so call / step <= {r_med / 5.8:.2%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="A/B rounds (>= 5).")
    parser.add_argument("--steps", type=int, default=5, help="Steps per round; the round's median is kept.")
    parser.add_argument("--batch_size", type=int, default=4, help="Training batch.")
    parser.add_argument("--sd15", action="store_true", help="Also measure at SD1.5 channel counts (about 3.5 GB).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    args = parser.parse_args()
    if args.runs < 5:
        raise ValueError(f"--runs must be >= 5 for medians and minima, got {args.runs}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    bench_tiny(args.runs, args.steps, args.batch_size)
    if args.sd15:
        bench_sd15(args.runs, args.batch_size)


if __name__ == "__main__":
    main()
