"""Working memory of one SD1.5 student step at 512x512 (64x64 latents), measured on CPU.

Runs one forward and backward of the full-size SD1.5 UNet (random weights, fp32 as the trainer keeps the
student) at 64x64 latents and 77x768 text embeddings, each configuration in a fresh subprocess, and prints
the peak resident memory above the memory after building the UNet: the fp32 gradients, the activations
kept for backward, the bf16 weight copies of autocast and transient buffers. This is the CPU analogue of
the step's GPU working memory, used for the README's GPU estimate (no GPU was available); CUDA's
allocator and attention kernels differ, so it is an approximation.

    python bench/bench_step_memory.py [--batches 1 2] [--precision bf16] [--threads 2]

Each configuration needs about 4 GB plus what it measures (about 9 GB at batch 2, bf16) and takes 1 to 3
minutes on 2 busy cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GIB = 1024**3


def rss_bytes() -> int:
    """The process's current resident set size, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def measure(batch: int, precision: str, checkpointing: bool, threads: int) -> dict:
    """One forward+backward in this process; peak RSS (ru_maxrss) above the RSS after building the UNet."""
    import torch
    from diffusers import UNet2DConditionModel

    from flow_lune.convert.configs import builtin_config

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    config = {k: v for k, v in builtin_config("unet").items() if not k.startswith("_")}
    unet = UNet2DConditionModel(**config).train()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    x, t, c = torch.randn(batch, 4, 64, 64), torch.rand(batch) * 1000, torch.randn(batch, 77, 768)
    base = rss_bytes()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        out = unet(x, t, encoder_hidden_states=c).sample
    after_forward = rss_bytes()
    out.float().pow(2).mean().backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {
        "batch": batch,
        "precision": precision,
        "gradient_checkpointing": checkpointing,
        "params": sum(p.numel() for p in unet.parameters()),
        "step_working_gb": round((peak - base) / 1e9, 2),
        "held_after_forward_gb": round((after_forward - base) / 1e9, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2], help="batch sizes (default 1 2)")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="autocast dtype (default bf16)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the machines here)")
    parser.add_argument("--one", nargs=2, metavar=("BATCH", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # the child: one configuration
        print(json.dumps(measure(int(args.one[0]), args.precision, args.one[1] == "1", args.threads)))
        return
    for batch in args.batches:
        for ckpt in ("0", "1"):
            cmd = [sys.executable, __file__, "--one", str(batch), ckpt, "--precision", args.precision]
            cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"measurement failed for batch {batch}, checkpointing {ckpt}:\n{proc.stderr[-2000:]}")
            print(proc.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
