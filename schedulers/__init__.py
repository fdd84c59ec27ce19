"""Flow convention, the FlowLuneScheduler, the teacher bridge and training sigma sampling."""

from .flow import euler_step, expand_sigma, flow_state, flow_velocity, shift_sigma
from .scheduling_flow_lune import FlowLuneScheduler, FlowLuneSchedulerOutput
from .sigma_sampling import (
    DENSITIES,
    LOSS_WEIGHTINGS,
    SIGMA_MIN,
    AdaptiveSigmaSampler,
    SigmaSampler,
    bin_edges,
    cosmap_density,
    loss_weighting,
    sample_u,
)
from .teacher_bridge import (
    EpsilonToFlowUNet,
    TeacherQuery,
    TeacherSchedule,
    guided_velocity,
    noise_norm,
    sigma_from_t,
    t_from_sigma,
    teacher_input,
    teacher_query,
    velocity_from_eps,
)

__all__ = [
    "DENSITIES",
    "LOSS_WEIGHTINGS",
    "SIGMA_MIN",
    "AdaptiveSigmaSampler",
    "EpsilonToFlowUNet",
    "FlowLuneScheduler",
    "FlowLuneSchedulerOutput",
    "SigmaSampler",
    "TeacherQuery",
    "TeacherSchedule",
    "bin_edges",
    "cosmap_density",
    "euler_step",
    "expand_sigma",
    "flow_state",
    "flow_velocity",
    "guided_velocity",
    "loss_weighting",
    "noise_norm",
    "sample_u",
    "shift_sigma",
    "sigma_from_t",
    "t_from_sigma",
    "teacher_input",
    "teacher_query",
    "velocity_from_eps",
]
