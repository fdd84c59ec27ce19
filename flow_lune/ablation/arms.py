"""The arms of the ablation and the check that they differ only where they should.

An arm is a set of trainer flags on top of the study's shared flags. Every pair of arms is compared on
the trainer's *resolved* arguments (the parsed ``Namespace`` before the runs, each run's ``args.json``
after): a difference in any key outside ``ARM_FLAGS`` and the per-run keys refuses the study.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

ASSESSOR = "{assessor}"  # placeholder in an arm's flags: the study's trained assessor folder

# The flags that define the arms; nothing else may differ between two arms of one seed.
ARM_FLAGS = frozenset({"kd_weight", "block_penalty_weight", "assessor", "timestep_sampling"})
# Keys that differ between runs by construction (each run has its own folder; resuming adds a flag).
PER_RUN_KEYS = frozenset({"output_dir", "resume_from_checkpoint"})

ARMS: dict[str, tuple[str, ...]] = {
    "a": ("--kd_weight", "0", "--block_penalty_weight", "0", "--assessor", "none"),  # flow loss only
    "b": ("--assessor", "none"),  # flow + per-block KD, lambda_b = w_b
    "c": ("--assessor", ASSESSOR),  # (b) with lambda_b from the assessor's fusion
    "d": ("--assessor", ASSESSOR, "--timestep_sampling", "adaptive"),  # (c) + sigmas from the assessor's profile
}
ARM_DESCRIPTIONS = {
    "a": "flow loss only (no KD)",
    "b": "flow + per-block KD, base weights (--assessor none)",
    "c": "(b) + assessor lambda_b",
    "d": "(c) + adaptive timestep sampling",
}


class ArmDifferenceError(ValueError):
    """Two arms differ in a flag that does not define the arms."""


def uses_assessor(flags: Sequence[str]) -> bool:
    """Whether an arm's flags name the study's assessor."""
    return ASSESSOR in flags


def arm_flags(flags: Sequence[str], assessor_dir: str) -> list[str]:
    """An arm's flags with the assessor placeholder replaced by the study's assessor folder."""
    return [assessor_dir if f == ASSESSOR else f for f in flags]


def differing_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ between two resolved argument dicts (a key missing on one side differs)."""
    missing = object()
    return sorted(k for k in set(a) | set(b) if a.get(k, missing) != b.get(k, missing))


def check_arms(resolved: Mapping[str, Mapping[str, Any]], allowed: frozenset[str] = ARM_FLAGS) -> dict[str, list[str]]:
    """Compare every pair of arms' resolved arguments; ``ArmDifferenceError`` naming each forbidden difference.

    Returns ``{"a-b": [differing arm flags], ...}`` for the report.
    """
    pairs: dict[str, list[str]] = {}
    problems = []
    for (name_a, args_a), (name_b, args_b) in itertools.combinations(sorted(resolved.items()), 2):
        keys = [k for k in differing_keys(args_a, args_b) if k not in PER_RUN_KEYS]
        bad = [k for k in keys if k not in allowed]
        for k in bad:
            problems.append(f"{name_a} vs {name_b}: --{k} is {args_a.get(k)!r} vs {args_b.get(k)!r}")
        pairs[f"{name_a}-{name_b}"] = keys
    if problems:
        raise ArmDifferenceError(
            "the arms differ in flags that do not define them (only "
            + ", ".join(f"--{k}" for k in sorted(allowed))
            + " may differ): "
            + "; ".join(problems)
            + ". Put shared flags in the study's trainer arguments, not in one arm."
        )
    return pairs
