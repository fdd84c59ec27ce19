"""Flow Lune training: the distillation objective and everything around the trainer loop.

Modules (imported on first use, so ``import flow_lune.training`` stays cheap):

- ``objective``: flow MSE against the teacher's v*, per-block KD, the total loss (DESIGN.md sections 2-5);
- ``step``: one training step (loss, gated backward, metric sums), shared by the trainer and its benchmark;
- ``block_features``: the nine UNet blocks, forward hooks, pooled features;
- ``block_penalty``: lambda_b of the KD penalty, constant (``--assessor none``) or from the assessor;
- ``fusion``, ``assessor``, ``profile``: the geometric assessor, the fusion of its signals, its profile;
- ``data`` (dataset, entry point), ``data_config``, ``sources``, ``encoding``, ``data_caches``, ``caching``,
  ``prompts``: cached latents and text embeddings (DESIGN.md section 3);
- ``seeds``: every seed derived from ``--seed`` (random streams, per-row streams);
- ``models``: loading the teacher, building the student;
- ``checkpoints``: atomic checkpoints, diffusers-layout hooks, the epoch sampler;
- ``metrics``, ``plots``, ``validation``: metrics.jsonl, the charts, teacher/student validation sampling;
- ``export``: the FlowLunePipeline folder, the single file, the model card, the upload;
- ``cli``: the flags both trainers share, their checks, the scripts' entry point (torch-free);
- ``run_state``: what an output folder holds (finished run, interrupted export, checkpoints), torch-free.

The flags' defaults live in ``flow_lune.settings`` (torch-free), so the scripts parse before importing torch.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "BLOCK_NAMES": "block_features",
    "BASE_BLOCK_WEIGHTS": "block_features",
    "BlockFeatureHooks": "block_features",
    "pool_block_output": "block_features",
    "BlockWeights": "block_penalty",
    "BlockPenalty": "block_penalty",
    "ConstantBlockPenalty": "block_penalty",
    "AssessorBlockPenalty": "block_penalty",
    "build_block_penalty": "block_penalty",
    "ObjectiveConfig": "objective",
    "DistillationOutput": "objective",
    "distillation_loss": "objective",
    "flow_matching_loss": "objective",
    "block_kd": "objective",
    "total_loss": "objective",
    "DistillationStep": "step",
    "FusionConfig": "fusion",
    "fuse_block_weights": "fusion",
    "DataConfig": "data",
    "LatentPromptDataset": "data",
    "prepare_training_data": "data",
    "TeacherComponents": "models",
    "load_teacher": "models",
    "build_student": "models",
    "save_checkpoint": "checkpoints",
    "RandomStreams": "seeds",
    "EpochShuffleSampler": "checkpoints",
    "export_final": "export",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
