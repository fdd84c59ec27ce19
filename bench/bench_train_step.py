"""Training step time against the sum of its parts, and the share of step time spent waiting for data.

For a small configuration (the tiny SD1.5 teacher, 8x8 latents) and the full SD1.5 UNet (random weights
from SD1.5's config, 859.5M parameters) at 32x32 latents, each round times, in this one process:

  A. one whole training step as train_flow_distill.py runs it: sigma/noise/dropout draws, the teacher's v*
     (one forward with block hooks), the student forward, the loss, accelerate's backward, grad clipping,
     fused AdamW step, lr schedule step, zero_grad;
  B. its parts alone: teacher forward (with hooks), student forward + backward (with hooks and the same
     loss formulas), optimizer step.

It prints medians and minima over ``--runs`` rounds of A / sum(B) (goal <= 1.10), then runs a loop of
steps fed by a DataLoader over a warm cache of LatentPromptDataset rows and prints the share of wall time
spent in ``next(dataloader)`` (goal <= 2%).

    python bench/bench_train_step.py [--runs 5] [--skip_full] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.optimization import get_scheduler  # noqa: E402

from flow_lune.flow import EpsilonToFlowUNet, SigmaSampler, flow_state, flow_timestep  # noqa: E402
from flow_lune.tiny import SD15_SCHEDULER_CONFIG, tiny_unet  # noqa: E402
from flow_lune.training.block_features import BlockFeatureHooks  # noqa: E402
from flow_lune.training.block_penalty import ConstantBlockPenalty  # noqa: E402
from flow_lune.training.caching import CacheWriter  # noqa: E402
from flow_lune.training.checkpoints import EpochShuffleSampler  # noqa: E402
from flow_lune.training.data import LatentPromptDataset, collate  # noqa: E402
from flow_lune.training.objective import ObjectiveConfig, block_kd, flow_matching_loss, total_loss  # noqa: E402
from flow_lune.training.seeds import RandomStreams  # noqa: E402
from flow_lune.training.step import DistillationStep  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class Setup:
    """Teacher, student (prepared by accelerate), fused AdamW, hooks: what the trainer holds during the loop."""

    def __init__(self, teacher: torch.nn.Module, batch: int, latent: int, cond_dim: int):
        self.accelerator = Accelerator(cpu=True)
        self.teacher = EpsilonToFlowUNet(teacher.requires_grad_(False).eval(), SD15_SCHEDULER_CONFIG)
        student = copy.deepcopy(teacher).requires_grad_(True).train()
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=True)
        lr_scheduler = get_scheduler("constant", optimizer=optimizer)
        self.student, self.optimizer, self.lr_scheduler = self.accelerator.prepare(student, optimizer, lr_scheduler)
        self.s_hooks = BlockFeatureHooks(self.accelerator.unwrap_model(self.student)).attach()
        self.t_hooks = BlockFeatureHooks(teacher).attach()
        self.sampler = SigmaSampler()
        self.step = DistillationStep(
            self.accelerator, self.student, self.teacher, self.s_hooks, self.t_hooks, ConstantBlockPenalty(),
            ObjectiveConfig(), self.sampler, RandomStreams(0), self.optimizer, self.lr_scheduler,
            torch.zeros(77, cond_dim), uncond_prob=0.1, max_grad_norm=1.0, max_nonfinite_steps=10,
        )  # fmt: skip
        self.batch, self.latent, self.cond_dim = batch, latent, cond_dim
        self.step_index = 0

    def fake_batch(self) -> dict:
        return {"latents": torch.randn(self.batch, 4, self.latent, self.latent),
                "prompt_embeds": torch.randn(self.batch, 77, self.cond_dim)}  # fmt: skip

    def train_step(self, batch: dict) -> None:
        """One step of train_flow_distill.py: its DistillationStep (one process, no accumulation, max_grad_norm 1)."""
        self.step(batch, 0, self.step_index)
        self.step.end_update(self.step_index)
        self.step_index += 1

    def parts(self, batch: dict) -> tuple[float, float, float]:
        """Teacher forward, student forward+backward, optimizer step, each timed alone."""
        x0, c = batch["latents"].float(), batch["prompt_embeds"].float()
        sigma = self.sampler.sample(x0.shape[0], torch.Generator().manual_seed(1))
        x_sigma = flow_state(x0, torch.randn_like(x0), sigma)
        t0 = time.perf_counter()
        with torch.no_grad():
            v_target = self.teacher.velocity(x_sigma, sigma, c)
        teacher_feats = self.t_hooks.features
        t1 = time.perf_counter()
        v = self.student(x_sigma, flow_timestep(sigma), c, return_dict=False)[0]
        kd = block_kd(self.s_hooks.features, teacher_feats)
        loss = total_loss(flow_matching_loss(v, v_target, sigma), kd, torch.ones(9), torch.ones(9), 0.25, 0.05)
        loss.backward()
        t2 = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        self.s_hooks.clear()
        self.t_hooks.clear()
        return t1 - t0, t2 - t1, t3 - t2


def ratio_rounds(setup: Setup, runs: int) -> None:
    batch = setup.fake_batch()
    setup.train_step(batch)  # warm-up: allocator, optimizer state
    setup.parts(batch)
    steps, teacher, student, opt, ratios = [], [], [], [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        setup.train_step(batch)
        steps.append(time.perf_counter() - t0)
        t, s, o = setup.parts(batch)
        teacher.append(t), student.append(s), opt.append(o)
        ratios.append(steps[-1] / (t + s + o))
    med = statistics.median
    print(f"  step {med(steps):.4f} s (min {min(steps):.4f}); parts: teacher fwd {med(teacher):.4f}, "
          f"student fwd+bwd {med(student):.4f}, optimizer {med(opt):.4f} (medians)")  # fmt: skip
    print(f"  step / sum(parts): median {med(ratios):.3f}, min {min(ratios):.3f} over {runs} rounds (goal <= 1.10)")


def data_wait_share(setup: Setup, dataset, steps: int) -> None:
    """Share of loop wall time spent in next(dataloader), caches warm (the trainer's DataLoader and sampler)."""
    sampler = EpochShuffleSampler(len(dataset), 0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=setup.batch, sampler=sampler, collate_fn=collate)
    for _ in loader:  # warm the page cache
        pass
    waits, total, done = 0.0, 0.0, 0
    start = time.perf_counter()
    while done < steps:
        it = iter(loader)
        while done < steps:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            waits += time.perf_counter() - t0
            setup.train_step(batch)
            done += 1
    total = time.perf_counter() - start
    print(f"  data wait {waits / total * 100:.2f}% of {total:.2f} s over {steps} steps "
          f"({waits / steps * 1000:.2f} ms/batch; goal <= 2%)")  # fmt: skip


def cached_dataset(folder: Path, rows: int, latent: int, cond_dim: int) -> LatentPromptDataset:
    """A LatentPromptDataset over safetensors caches written the way training/data.py writes them."""
    prompts = [f"prompt {i}" for i in range(rows)]
    with CacheWriter(folder / "latents", {"bench": latent}) as writer:
        writer.write_json("prompts.json", prompts)
        writer.add_rows("latents", torch.randn(rows, 4, latent, latent))
        lat = writer.commit(num_rows=rows, meta={"source": "bench"})
    with CacheWriter(folder / "embeds", {"bench": cond_dim}) as writer:
        writer.write_json("prompts.json", prompts)
        writer.add_rows("empty_prompt_embeds", torch.randn(1, 77, cond_dim))
        writer.add_rows("prompt_embeds", torch.randn(rows, 77, cond_dim))
        emb = writer.commit(num_rows=rows)
    return LatentPromptDataset(lat, emb, prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="A/B rounds (>= 5)")
    parser.add_argument("--skip_full", action="store_true", help="only the small configuration")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--data_steps", type=int, default=20, help="steps of the data-wait loop (small)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        print("small: tiny SD1.5 UNet (32/32/64/64 channels), batch 4, 8x8 latents, 77x32 text embeddings")
        small = Setup(tiny_unet(0), batch=4, latent=8, cond_dim=32)
        ratio_rounds(small, args.runs)
        data_wait_share(small, cached_dataset(Path(tmp) / "small", 64, 8, 32), args.data_steps)
        del small
        if args.skip_full:
            return
        config = json.loads((REPO / "convert" / "configs" / "sd15" / "unet.json").read_text())
        config = {k: v for k, v in config.items() if not k.startswith("_")}
        torch.manual_seed(0)
        teacher = UNet2DConditionModel(**config)
        n = sum(p.numel() for p in teacher.parameters()) / 1e6
        print(f"full: SD1.5 UNet ({n:.1f}M parameters, random weights), fp32, batch 1, 32x32 latents, 77x768")
        full = Setup(teacher, batch=1, latent=32, cond_dim=768)
        ratio_rounds(full, args.runs)
        data_wait_share(full, cached_dataset(Path(tmp) / "full", 16, 32, 768), steps=max(3, args.runs))


if __name__ == "__main__":
    main()
