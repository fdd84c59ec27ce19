"""Measurements of the shipped toy world that are not an evaluator run.

1. The shipped judge on fresh held-out real images (rows ``--start`` on; the build scored rows 0..479):
   accuracy per attribute and overall.
2. ``FlowLunePipeline.from_teacher(toy teacher)`` on DDIM's sigmas against ``StableDiffusionPipeline`` +
   ``DDIMScheduler`` (eta 0, final alpha 1, no clipping), same noise, guidance 3: relative max difference of
   the final latents, ``max|a - b| / max|b|``, per step count, in float32.

    python bench/bench_toy.py [--images 960] [--start 480] [--steps 3 10 25] [--prompts 4]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from flow_lune import FlowLunePipeline  # noqa: E402
from flow_lune.evaluation import attribute_accuracy, ddim_scheduler  # noqa: E402
from flow_lune.flow import TeacherSchedule, noise_norm, sigma_from_t  # noqa: E402
from flow_lune.toy import heldout_prompts, judge_path, teacher_path, toy_arrays  # noqa: E402
from flow_lune.toy.judge import load_judge  # noqa: E402


def judge_on_heldout(count: int, start: int) -> dict:
    data = toy_arrays("heldout", count, start=start)
    return attribute_accuracy(load_judge(judge_path()).predict(data.images.float() / 255.0), data.labels)


@torch.no_grad()
def ddim_equivalence(steps: list[int], num_prompts: int) -> dict[int, float]:
    from diffusers import StableDiffusionPipeline

    teacher = StableDiffusionPipeline.from_pretrained(str(teacher_path()), local_files_only=True)
    ddim = ddim_scheduler(teacher.scheduler.config)
    pipe = StableDiffusionPipeline(**{**teacher.components, "scheduler": ddim})
    flow = FlowLunePipeline.from_teacher(pipe)
    for p in (pipe, flow):
        p.set_progress_bar_config(disable=True)
    prompts = heldout_prompts(num_prompts)
    z = torch.randn(num_prompts, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = {}
    for n in steps:
        ddim.set_timesteps(n)
        sigmas = sigma_from_t(ddim.timesteps, TeacherSchedule.from_scheduler_config(ddim.config))
        ref = pipe(prompts, num_inference_steps=n, guidance_scale=3.0, latents=z, output_type="latent").images
        got = flow(
            prompts, sigmas=sigmas, guidance_scale=3.0, latents=noise_norm(sigmas[0]).float() * z, output_type="latent"
        ).images
        out[n] = ((got - ref).abs().max() / ref.abs().max()).item()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=960, help="held-out images for the judge (20 per combination)")
    parser.add_argument("--start", type=int, default=480, help="first held-out row: past the build's own check")
    parser.add_argument("--steps", type=int, nargs="+", default=[3, 10, 25], help="DDIM step counts to compare")
    parser.add_argument("--prompts", type=int, default=4, help="prompts in the DDIM comparison")
    args = parser.parse_args()
    if args.images < 1 or args.start < 0 or args.prompts < 1 or any(s < 1 for s in args.steps):
        parser.error("--images, --prompts and --steps must be >= 1 and --start >= 0")
    t = time.perf_counter()
    acc = judge_on_heldout(args.images, args.start)
    print(
        f"judge on {args.images} held-out real images (rows {args.start}..{args.start + args.images - 1}): "
        + ", ".join(f"{k} {v:.4f}" for k, v in acc.items())
        + f" ({time.perf_counter() - t:.1f} s)"
    )
    for n, err in ddim_equivalence(args.steps, args.prompts).items():
        print(
            f"from_teacher vs StableDiffusionPipeline+DDIM, {n} steps, {args.prompts} prompts, g=3: "
            f"rel. max diff {err:.2e}"
        )


if __name__ == "__main__":
    main()
