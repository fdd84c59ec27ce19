"""FlowLunePipeline: sample a Flow Lune student, or an epsilon SD1.5 teacher in flow coordinates."""

from .pipeline_flow_lune import FlowLunePipeline, as_flow_lune_scheduler, model_timesteps, retrieve_timesteps

__all__ = ["FlowLunePipeline", "as_flow_lune_scheduler", "model_timesteps", "retrieve_timesteps"]
