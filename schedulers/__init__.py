"""FlowLuneScheduler: Euler sampling of a rectified-flow model (the flow math is in ``flow_lune.flow``)."""

from .scheduling_flow_lune import FlowLuneScheduler, FlowLuneSchedulerOutput

__all__ = ["FlowLuneScheduler", "FlowLuneSchedulerOutput"]
