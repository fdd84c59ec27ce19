"""The assessor ablation: arms x seeds of ``train_flow_distill.py`` on the toy world, evaluated and reported.

``experiments/ablation.py`` is the command; this package holds its parts: ``arms`` (the arms and the check
that they differ only where they should), ``study`` (folders, markers, resumable steps), ``checkpoint_eval``
(every student against one teacher reference), ``stats`` (intervals, steps to target, loss spread) and
``report`` (results.json, report.md, charts).
"""

from .arms import ARM_FLAGS, ARMS, ArmDifferenceError, check_arms, differing_keys
from .stats import Interval, loss_spread, mean_interval, steps_to_target, t_quantile_975

__all__ = [
    "ARMS",
    "ARM_FLAGS",
    "ArmDifferenceError",
    "Interval",
    "check_arms",
    "differing_keys",
    "loss_spread",
    "mean_interval",
    "steps_to_target",
    "t_quantile_975",
]
