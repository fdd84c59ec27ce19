"""Start-up time of the scripts' ``--help`` and of an argument error, against a bare Python start.

Each script must parse its flags before importing torch, diffusers or accelerate, so ``--help`` and an argument
error cost about as much as starting Python. Prints, for each script (``train_flow_distill.py``,
``train_assessor.py``, and ``evaluate.py`` where it exists), the median wall time of ``--help`` and of one
argument error over ``--runs`` runs, alternated with ``python -c "import argparse"``, and their ratios to it.
No goal is asserted; the issue's figure was over 20 s for ``--help`` on a busy 2-core machine.

    python bench/bench_startup.py [--runs 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("train_flow_distill.py", "train_assessor.py", "evaluate.py")  # those present are measured
BAD_FLAG = ("--shift", "0")  # rejected by every script's parser (the shared sigma flags)


def wall(argv: list[str]) -> float:
    """Seconds from start to exit of ``argv`` (output discarded)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=REPO, check=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="Alternated runs per command; the median is reported.")
    args = parser.parse_args()
    baseline_cmd = [sys.executable, "-c", "import argparse"]
    scripts = [s for s in SCRIPTS if (REPO / s).is_file()]
    commands = {"python -c 'import argparse'": baseline_cmd}
    for s in scripts:
        commands[f"{s} --help"] = [sys.executable, str(REPO / s), "--help"]
        commands[f"{s} {' '.join(BAD_FLAG)}"] = [sys.executable, str(REPO / s), *BAD_FLAG]
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.runs):  # alternated, so bursts of outside load hit every command alike
        for name, argv in commands.items():
            times[name].append(wall(argv))
    base = statistics.median(times["python -c 'import argparse'"])
    print(f"{'command':45s} {'median s':>9s} {'min s':>7s} {'ratio to import argparse':>25s}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:45s} {median:9.3f} {min(values):7.3f} {median / base:25.2f}")


if __name__ == "__main__":
    main()
