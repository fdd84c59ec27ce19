"""Flow math of Flow Lune, each formula once (DESIGN.md sections 1, 2 and 4).

- ``convention``: the flow state, the Euler step, the shift, guidance, and ``flow_timestep(sigma)``;
- ``bridge``: the exact bridge from an epsilon DDPM teacher, and ``EpsilonToFlowUNet``, the one teacher query;
- ``sigmas``: training sigma densities, the adaptive per-bin sampler and its bins;
- ``loss_weight``: per-sample weights of the flow loss;
- ``reflow``: the reflow target between a pair (noise, the ODE's end).
"""

from .bridge import (
    EpsilonToFlowUNet,
    TeacherQuery,
    TeacherSchedule,
    noise_norm,
    sigma_from_t,
    t_from_sigma,
    teacher_input,
    teacher_query,
    velocity_from_eps,
)
from .convention import (
    FLOW_TIMESTEPS,
    euler_step,
    expand_sigma,
    flow_state,
    flow_timestep,
    guided_velocity,
    shift_sigma,
    sigma_from_flow_timestep,
    x0_from_velocity,
)
from .loss_weight import LOSS_WEIGHTINGS, loss_weight
from .reflow import reflow_target
from .sigmas import (
    ADAPTIVE_JITTER,
    BASE_JITTER,
    DENSITIES,
    RELIABILITY_THRESHOLD,
    SIGMA_MIN,
    AdaptiveSigmaSampler,
    SigmaSampler,
    cosmap_density,
    sample_u,
    sigma_to_bin,
)

__all__ = [
    "ADAPTIVE_JITTER",
    "BASE_JITTER",
    "DENSITIES",
    "FLOW_TIMESTEPS",
    "LOSS_WEIGHTINGS",
    "RELIABILITY_THRESHOLD",
    "SIGMA_MIN",
    "AdaptiveSigmaSampler",
    "EpsilonToFlowUNet",
    "SigmaSampler",
    "TeacherQuery",
    "TeacherSchedule",
    "cosmap_density",
    "euler_step",
    "expand_sigma",
    "flow_state",
    "flow_timestep",
    "guided_velocity",
    "loss_weight",
    "noise_norm",
    "reflow_target",
    "sample_u",
    "shift_sigma",
    "sigma_from_flow_timestep",
    "sigma_from_t",
    "sigma_to_bin",
    "t_from_sigma",
    "teacher_input",
    "teacher_query",
    "velocity_from_eps",
    "x0_from_velocity",
]
