"""Data time with warm caches against the training step budget.

Prints, in one process:

1. tiny configuration (the README's default run: tiny teacher, 8x8 latents, 77x32 text embeddings):
   the time to fetch one batch through a DataLoader (num_workers=0, i.e. on the training thread) and
   the time of one stand-in training step (teacher forward through the bridge, student forward and
   backward, fused AdamW step), alternated A/B over ``--runs`` runs: medians, minima and their ratio;
2. the share of a training loop's wall time spent waiting in ``next(dataloader)``, with 0 and 1 workers;
3. SD1.5-shaped rows (4x64x64 latents, 77x768 embeddings, fp32) read from a cache: per-batch fetch time
   (the full SD1.5 step these would feed takes seconds, DESIGN.md section 9).

The helpers ``fetch_times`` and ``wait_share`` can be imported by the trainer's bench.

    python bench/bench_data.py [--runs 5] [--batch_size 4] [--loop_steps 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from flow_lune.flow import EpsilonToFlowUNet, SigmaSampler, flow_state, flow_timestep  # noqa: E402
from flow_lune.tiny import SD15_SCHEDULER_CONFIG, tiny_sd_components, tiny_unet  # noqa: E402
from flow_lune.training.caching import CacheWriter  # noqa: E402
from flow_lune.training.data import DataConfig, LatentPromptDataset, collate, prepare_training_data  # noqa: E402
from flow_lune.training.models import TeacherComponents  # noqa: E402


def loader(dataset, batch_size: int, num_workers: int = 0, seed: int = 0) -> torch.utils.data.DataLoader:
    """The trainer's kind of DataLoader: shuffled with a seeded generator, our collate."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collate,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
    )


def fetch_times(dataset, batch_size: int, num_batches: int, seed: int = 0) -> list[float]:
    """Seconds per batch for ``num_batches`` batches fetched on this thread (num_workers=0)."""
    it = iter(loader(dataset, batch_size, 0, seed))
    times = []
    for _ in range(num_batches):
        start = time.perf_counter()
        try:
            next(it)
        except StopIteration:
            it = iter(loader(dataset, batch_size, 0, seed + 1))
            next(it)
        times.append(time.perf_counter() - start)
    return times


def wait_share(dataset, batch_size: int, step, num_steps: int, num_workers: int) -> float:
    """Fraction of a loop's wall time spent waiting in ``next(dataloader)``; ``step(batch)`` does the work."""
    it = iter(loader(dataset, batch_size, num_workers))
    next(it)  # start-up (worker spawn) is not steady-state waiting
    waited, start = 0.0, time.perf_counter()
    for _ in range(num_steps):
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader(dataset, batch_size, num_workers))
            batch = next(it)
        waited += time.perf_counter() - t0
        step(batch)
    return waited / (time.perf_counter() - start)


class TinyStep:
    """A stand-in training step of the tiny configuration: teacher velocity v* by one teacher forward,
    student forward + backward on the flow MSE, fused AdamW. (The trainer's step adds block hooks and KD on
    the same forwards, which cost nothing measurable, DESIGN.md section 9.)"""

    def __init__(self, teacher: torch.nn.Module):
        self.teacher = EpsilonToFlowUNet(teacher.requires_grad_(False), SD15_SCHEDULER_CONFIG)
        self.student = tiny_unet(seed=1).train()
        self.optimizer = torch.optim.AdamW(self.student.parameters(), lr=1e-5, fused=True)
        self.sampler = SigmaSampler(density="logit_normal", shift=3.0)
        self.gen = torch.Generator().manual_seed(0)

    def __call__(self, batch: dict) -> None:
        x0, c = batch["latents"], batch["prompt_embeds"]
        sigma = self.sampler.sample(x0.shape[0], generator=self.gen).float()
        eps = torch.randn(x0.shape, generator=self.gen)
        x_sigma = flow_state(x0, eps, sigma)
        with torch.no_grad():
            v_target = self.teacher.velocity(x_sigma, sigma, c)
        v = self.student(x_sigma, flow_timestep(sigma), c).sample
        loss = (v - v_target).pow(2).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def summary(name: str, xs: list[float]) -> str:
    return f"{name}: median {statistics.median(xs) * 1e3:8.3f} ms   min {min(xs) * 1e3:8.3f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="alternated A/B runs (>= 5)")
    parser.add_argument("--batch_size", type=int, default=4, help="the README run's train_batch_size")
    parser.add_argument("--num_rows", type=int, default=256, help="rows in each benchmark dataset")
    parser.add_argument("--loop_steps", type=int, default=4, help="steps per wait-share loop (each a full step)")
    args = parser.parse_args()
    if args.runs < 5:
        parser.error("--runs must be >= 5")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # 1. Tiny configuration: a latents dataset of 8x8 latents and distinct prompts, tiny text encoder.
        import datasets

        c = tiny_sd_components(seed=0)
        parts = TeacherComponents(c.unet, c.vae, c.text_encoder, c.tokenizer, SD15_SCHEDULER_CONFIG)
        latents = torch.randn(args.num_rows, 4, 8, 8)
        rows = {"latents": latents.numpy().tolist(), "prompt": [f"prompt {i}" for i in range(args.num_rows)]}
        datasets.Dataset.from_dict(rows).save_to_disk(str(tmp / "tiny-latents"))
        config = DataConfig(latents_dataset=str(tmp / "tiny-latents"), cache_dir=str(tmp / "cache"), resolution=64)
        start = time.perf_counter()
        prepare_training_data(config, parts, None)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        dataset = prepare_training_data(config, parts, None)  # warm: verify and open the caches
        warm = time.perf_counter() - start
        print(f"tiny caches ({args.num_rows} rows): cold build {cold:.2f} s, warm open (checksums) {warm:.3f} s")

        step = TinyStep(c.unet)
        batch = collate([dataset[i] for i in range(args.batch_size)])
        step(batch)  # first call pays one-off allocations
        data_t, step_t = [], []
        for r in range(args.runs):  # A/B alternated
            data_t.append(statistics.median(fetch_times(dataset, args.batch_size, 5, seed=r)))
            start = time.perf_counter()
            step(batch)
            step_t.append(time.perf_counter() - start)
        print(f"tiny config, batch {args.batch_size}, {args.runs} alternated runs:")
        print("  " + summary("data fetch per batch (num_workers=0)", data_t))
        print("  " + summary("training step (stand-in)            ", step_t))
        print(
            f"  data / step: {statistics.median(data_t) / statistics.median(step_t):.4f} (medians), "
            f"{min(data_t) / min(step_t):.4f} (minima)"
        )

        # 2. Waiting share of a loop, alternating 0 and 1 workers.
        shares: dict[int, list[float]] = {0: [], 1: []}
        for _ in range(args.runs):
            for w in (0, 1):
                shares[w].append(wait_share(dataset, args.batch_size, step, args.loop_steps, w))
        for w, xs in shares.items():
            print(
                f"  waiting for data in a {args.loop_steps}-step loop, num_workers={w}: "
                f"median {100 * statistics.median(xs):.2f}%  min {100 * min(xs):.2f}% of wall time"
            )

        # 3. SD1.5-shaped rows in the cache format.
        n = args.num_rows
        with CacheWriter(tmp / "sd15-latents", {"bench": "latents"}) as writer:
            writer.write_json("prompts.json", [f"p{i}" for i in range(n)])
            writer.add_rows("latents", torch.randn(n, 4, 64, 64))
            lat = writer.commit(num_rows=n, meta={"source": "bench"})
        with CacheWriter(tmp / "sd15-embeds", {"bench": "embeds"}) as writer:
            writer.write_json("prompts.json", [f"p{i}" for i in range(n)])
            writer.add_rows("empty_prompt_embeds", torch.randn(1, 77, 768))
            writer.add_rows("prompt_embeds", torch.randn(n, 77, 768))
            emb = writer.commit(num_rows=n)
        big = LatentPromptDataset(lat, emb, [f"p{i}" for i in range(n)])
        times = [statistics.median(fetch_times(big, args.batch_size, 5, seed=r)) for r in range(args.runs)]
        print(f"SD1.5-shaped rows (4x64x64 + 77x768 fp32, {n} rows), batch {args.batch_size}:")
        print("  " + summary("data fetch per batch (num_workers=0)", times))


if __name__ == "__main__":
    main()
