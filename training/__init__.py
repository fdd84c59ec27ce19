"""Flow Lune training: the distillation objective and everything around the trainer loop.

Modules (imported on first use, so ``import flow_lune.training`` stays cheap):

- ``objective``: flow MSE against the teacher's v*, per-block KD, the total loss (DESIGN.md sections 2-5);
- ``block_features``: the nine UNet blocks, forward hooks, pooled features;
- ``weighting``: the per-block weighting interface (lambda_b) and its constant control;
- ``fusion``, ``assessor``: the geometric assessor and the fusion of its signals (DESIGN.md section 6);
- ``data``, ``prompts``, ``caching``: cached latents and text embeddings (DESIGN.md section 3);
- ``models``: loading the teacher, building the student;
- ``checkpoints``: atomic checkpoints, diffusers-layout hooks, random streams, the epoch sampler;
- ``logging_utils``: metrics.jsonl, the lambda plot, validation grids;
- ``export``: the FlowLunePipeline folder, the single file, the model card, the upload.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "BLOCK_NAMES": "block_features",
    "BASE_BLOCK_WEIGHTS": "block_features",
    "BlockFeatureHooks": "block_features",
    "pool_block_output": "block_features",
    "BlockWeights": "weighting",
    "BlockWeighting": "weighting",
    "ConstantBlockWeighting": "weighting",
    "build_block_weighting": "weighting",
    "ObjectiveConfig": "objective",
    "DistillationLoss": "objective",
    "distillation_loss": "objective",
    "flow_matching_loss": "objective",
    "block_kd": "objective",
    "total_loss": "objective",
    "teacher_velocity": "objective",
    "FusionConfig": "fusion",
    "fuse_block_weights": "fusion",
    "DataConfig": "data",
    "LatentPromptDataset": "data",
    "prepare_training_data": "data",
    "load_teacher": "models",
    "build_student": "models",
    "save_checkpoint": "checkpoints",
    "RandomStreams": "checkpoints",
    "EpochShuffleSampler": "checkpoints",
    "export_final": "export",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
