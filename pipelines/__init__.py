"""FlowLunePipeline: text-to-image sampling of a rectified-flow SD1.5 UNet."""

from .pipeline_flow_lune import FlowLunePipeline, as_flow_lune_scheduler

__all__ = ["FlowLunePipeline", "as_flow_lune_scheduler"]
