"""Benchmark: full-size SD1.5 diffusers -> single file, against a plain safetensors read-and-write.

Both sides read the same three source files tensor by tensor with ``safe_open`` and write one
.safetensors file of the same bytes. The plain side does nothing else (header, raw bytes); the
conversion adds the key accounting, the shape checks, the source sha256 (background thread),
the check of the written file and the workflow JSON; a third side runs the conversion without
the source hash, to show what the hash costs. They run alternately in one process
(the machine has bursts of slowdown from outside load), and each run's peak extra resident
memory is sampled every 5 ms: total RSS (which counts source pages mapped by safe_open) and
anonymous RSS (memory the process itself allocated).

    python bench/bench_convert.py --folder /tmp/sd15-random-fp32 --runs 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

from flow_lune.convert import convert_to_single_file  # noqa: E402
from flow_lune.convert.random_weights import write_random_pipeline  # noqa: E402
from flow_lune.convert.sfio import OutTensor, header_bytes, tensor_bytes  # noqa: E402

FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)


def rss_bytes() -> tuple[int, int]:
    """(total RSS, anonymous RSS) of this process, from /proc/self/status."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssAnon:")):
                name, value = line.split(":", 1)
                fields[name] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["RssAnon"]


class PeakRSS:
    """Sample RSS every 5 ms in a thread; ``extra`` is the peak above the level at start."""

    def __enter__(self) -> PeakRSS:
        self.start = rss_bytes()
        self.peak = list(self.start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            now = rss_bytes()
            self.peak = [max(a, b) for a, b in zip(self.peak, now)]
            self._stop.wait(0.005)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.extra_total = self.peak[0] - self.start[0]
        self.extra_anon = self.peak[1] - self.start[1]


def plain_copy(folder: Path, dst: Path) -> None:
    """The floor: read every tensor with safe_open and write the same bytes into one safetensors file."""
    handles = [safe_open(str(folder / rel), framework="pt") for rel in FILES]
    entries = []
    for i, h in enumerate(handles):
        for key in h.keys():
            sl = h.get_slice(key)
            dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[sl.get_dtype()]
            entries.append(OutTensor(f"{i}.{key}", dtype, tuple(sl.get_shape()), lambda h=h, k=key: h.get_tensor(k)))
    with open(dst, "wb") as f:
        f.write(header_bytes(entries, {"format": "pt"}))
        for e in entries:
            f.write(tensor_bytes(e.fetch()))


def convert(folder: Path, dst: Path) -> None:
    convert_to_single_file(folder, dst, progress=False)


def convert_no_hash(folder: Path, dst: Path) -> None:
    """The conversion without the source sha256 (``--no-source-hash``): shows what the hash costs."""
    convert_to_single_file(folder, dst, progress=False, source_hash=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, help="full-size SD1.5 pipeline folder (built when missing)")
    parser.add_argument("--workdir", type=Path, help="where outputs go (default: a temporary folder)")
    parser.add_argument("--runs", type=int, default=5, help="alternating runs of each side (at least 5)")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32", help="dtype of a built folder")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = args.folder or work / f"sd15-random-{args.dtype}"
    if not (folder / "model_index.json").is_file():
        print(f"building random full-size SD1.5 ({args.dtype}) in {folder} ...", flush=True)
        t = time.perf_counter()
        write_random_pipeline(folder, torch.float32 if args.dtype == "fp32" else torch.float16)
        print(f"  built in {time.perf_counter() - t:.1f} s", flush=True)
    size = sum((folder / rel).stat().st_size for rel in FILES)
    print(f"source: {folder} ({size / 1e9:.2f} GB in {len(FILES)} files)")

    sides = {"plain": plain_copy, "convert": convert, "nohash": convert_no_hash}
    times: dict[str, list[float]] = {k: [] for k in sides}
    mem: dict[str, list[tuple[int, int]]] = {k: [] for k in sides}
    for name, fn in sides.items():  # warm-up: page cache, imports, meta models
        dst = work / f"{name}.safetensors"
        fn(folder, dst)
        dst.unlink()
        dst.with_suffix(".workflow.json").unlink(missing_ok=True)
    for run in range(args.runs):
        for name, fn in sides.items():
            dst = work / f"{name}.safetensors"
            with PeakRSS() as peak:
                t = time.perf_counter()
                fn(folder, dst)
                elapsed = time.perf_counter() - t
            times[name].append(elapsed)
            mem[name].append((peak.extra_total, peak.extra_anon))
            print(
                f"run {run}: {name:8s} {elapsed:6.2f} s  peak extra RSS {peak.extra_total / 1e9:.3f} GB "
                f"(anonymous {peak.extra_anon / 1e9:.3f} GB)",
                flush=True,
            )
            dst.unlink()  # a fresh DST each time (replacing an existing file adds an fsync)
            dst.with_suffix(".workflow.json").unlink(missing_ok=True)

    print()
    for name in sides:
        print(
            f"{name:8s} median {statistics.median(times[name]):6.2f} s  min {min(times[name]):6.2f} s  "
            f"peak extra RSS max {max(m[0] for m in mem[name]) / 1e9:.3f} GB "
            f"(anonymous max {max(m[1] for m in mem[name]) / 1e9:.3f} GB)"
        )
    for name in ("convert", "nohash"):
        ratio_median = statistics.median(times[name]) / statistics.median(times["plain"])
        ratio_min = min(times[name]) / min(times["plain"])
        pair_ratios = [c / p for c, p in zip(times[name], times["plain"])]
        print(
            f"{name} / plain: median ratio {ratio_median:.2f}, min ratio {ratio_min:.2f}, "
            f"per-pair ratios {', '.join(f'{r:.2f}' for r in pair_ratios)}"
        )
    best = size / min(times["convert"]) / 1e9
    print(f"goal: ratio <= 1.2 and extra RSS < 0.5 GB; best convert throughput {best:.2f} GB/s")


if __name__ == "__main__":
    main()
