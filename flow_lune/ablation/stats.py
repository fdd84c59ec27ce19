"""Statistics of the ablation report: mean and t-interval over seeds, steps to a target, loss spread.

Each function computes one quantity; the report only arranges their results.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

# Student t quantiles t_{0.975, df} for df = 1..30 (two-sided 95%), from the standard tables.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z975 = 1.959964  # the normal quantile, the limit of t_{0.975, df}


def t_quantile_975(df: int) -> float:
    """``t_{0.975, df}``: the table up to df = 30, then Cornish-Fisher to second order (< 0.01% off there):

    ``z + (z^3 + z) / (4 df) + (5 z^5 + 16 z^3 + 3 z) / (96 df^2)``.
    """
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be an int >= 1, got {df!r}.")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass
class Interval:
    """Mean over seeds and its two-sided 95% t-interval ``mean +- t_{0.975, n-1} s / sqrt(n)``."""

    mean: float
    low: float | None  # None with a single value: no spread to estimate
    high: float | None
    n: int
    std: float | None  # sample standard deviation (n - 1)

    def as_dict(self) -> dict:
        return asdict(self)


def mean_interval(values: Sequence[float]) -> Interval:
    """``mean +- t_{0.975, n-1} * s / sqrt(n)`` with ``s`` the sample standard deviation of ``values``."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_interval needs at least one value.")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"mean_interval needs finite values, got {values}.")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, None, None, 1, None)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, std)


def steps_to_target(curve: Mapping[int, float], target: float) -> int | None:
    """The first evaluated training step whose value is ``>= target``; None when no evaluated step reaches it."""
    for step in sorted(curve):
        if curve[step] >= target:
            return int(step)
    return None


def loss_spread(records: Sequence[Mapping], key: str, tail: float) -> dict:
    """Mean and standard deviation (n - 1) of ``key`` over the records of the last ``tail`` fraction of steps.

    The tail is the records whose step is ``> (1 - tail) * last step``.
    """
    if not 0.0 < tail <= 1.0:
        raise ValueError(f"tail must be in (0, 1], got {tail}.")
    if not records:
        raise ValueError("loss_spread needs metrics records; the run logged none.")
    last = max(int(r["step"]) for r in records)
    start = (1.0 - tail) * last
    values = [float(r[key]) for r in records if int(r["step"]) > start and key in r]
    if len(values) < 2:
        raise ValueError(f"the last {tail:.0%} of training holds {len(values)} {key!r} records; log more often.")
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return {
        "key": key,
        "from_step": math.floor(start) + 1,
        "to_step": last,
        "count": len(values),
        "mean": mean,
        "std": std,
    }
