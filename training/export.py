"""End of training: the FlowLunePipeline folder, the single file + ComfyUI workflow, the model card, the upload.

Everything is written under a temporary name and renamed when complete; nothing on disk is overwritten.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from flow_lune.atomic import atomic_file, atomic_folder

from .checkpoints import check_finite_parameters

logger = logging.getLogger(__name__)

PIPELINE_DIRNAME = "pipeline"  # the FlowLunePipeline folder inside --output_dir
SINGLE_FILE_NAME = "flow_lune.safetensors"  # the LDM single file inside --output_dir


@dataclass
class ExportResult:
    """What the end of training wrote."""

    pipeline_dir: Path
    single_file: Path | None
    workflow: Path | None
    model_card: Path


def _fresh(path: Path) -> None:
    if path.exists():
        raise FileExistsError(f"{path} exists already; use a new --output_dir (nothing is overwritten).")


def student_pipeline(student_unet: Any, teacher: Any, shift: float) -> Any:
    """The student as a ``FlowLunePipeline`` over the teacher's VAE, text encoder and tokenizer (no copies)."""
    from flow_lune.pipelines import FlowLunePipeline
    from flow_lune.schedulers import FlowLuneScheduler

    return FlowLunePipeline(
        vae=teacher.vae,
        text_encoder=teacher.text_encoder,
        tokenizer=teacher.tokenizer,
        unet=student_unet,
        scheduler=FlowLuneScheduler(shift=shift),
    )


def save_flow_lune_pipeline(folder: Path, student_unet: Any, teacher: Any, shift: float) -> Path:
    """A ``FlowLunePipeline`` folder: the student UNet (fp32), the teacher's VAE/text encoder/tokenizer and a
    ``FlowLuneScheduler(shift=shift)``; written to a temporary folder and renamed."""
    folder = Path(folder)
    _fresh(folder)
    check_finite_parameters(student_unet)
    pipe = student_pipeline(student_unet, teacher, shift)
    atomic_folder(folder, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
    return folder


def model_card_text(
    teacher_source: str, shift: float, args_summary: dict[str, Any], hub_model_id: str | None = None
) -> str:
    """The model description (Markdown) that goes into diffusers' model-card template."""
    repo = hub_model_id or "<this folder>"
    rows = "\n".join(f"| `--{k}` | `{v}` |" for k, v in args_summary.items())
    return f"""# Flow Lune student of `{teacher_source}`

A rectified-flow student distilled with Flow Lune's `train_flow_distill.py` from the epsilon-prediction
Stable Diffusion 1.5 teacher `{teacher_source}`. Same UNet architecture; it predicts the flow velocity
`v = eps - x0` at `x_sigma = (1 - sigma) x0 + sigma eps`, timestep `1000 * sigma`, and samples with
Euler steps on a shift-{shift:g} sigma grid (`FlowLuneScheduler(shift={shift:g})`, compatible with diffusers'
`FlowMatchEulerDiscreteScheduler` and ComfyUI's `ModelSamplingSD3` node).

## Use with diffusers

```python
import torch
from flow_lune import FlowLunePipeline

pipe = FlowLunePipeline.from_pretrained("{repo}", torch_dtype=torch.float16)
image = pipe("a photograph of a lighthouse on a cliff at sunset", num_inference_steps=28, guidance_scale=7.5).images[0]
```

## Use with ComfyUI / A1111

`{SINGLE_FILE_NAME}` (in the training output folder) is the single file in the original (LDM) key layout; load it with
`CheckpointLoaderSimple` and put a `ModelSamplingSD3` node with shift {shift:g} in front of the sampler (ComfyUI
loads SD1.5 files as epsilon models otherwise). The `.workflow.json` next to it does exactly that.

## Training

| flag | value |
|---|---|
{rows}
"""


def write_model_card(
    folder: Path, teacher_source: str, shift: float, args_summary: dict[str, Any], hub_model_id: str | None = None
) -> Path:
    """``README.md`` in ``folder``, from diffusers' training model-card template, offline (what
    ``load_or_create_model_card(from_training=True)`` builds when the Hub has no card)."""
    from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, populate_model_card
    from huggingface_hub import ModelCard, ModelCardData

    card = ModelCard.from_template(
        card_data=ModelCardData(
            license="creativeml-openrail-m",  # SD1.5's licence carries over to derivatives
            library_name="diffusers",
            inference=True,
            base_model=teacher_source if "/" in teacher_source and not Path(teacher_source).exists() else None,
        ),
        template_path=MODEL_CARD_TEMPLATE_PATH,
        model_description=model_card_text(teacher_source, shift, args_summary, hub_model_id),
    )
    card = populate_model_card(
        card, tags=["text-to-image", "diffusers", "flow-lune", "rectified-flow", "distillation", "stable-diffusion"]
    )
    path = Path(folder) / "README.md"
    atomic_file(path, lambda tmp: card.save(str(tmp)))
    return path


REFLOW_WORKFLOW_STEPS = 4  # reflow is for few-step sampling; the toy goal is 4 steps (measurement pending)


def recommended_sampling(objective: str, pair_guidance: float | None = None) -> tuple[float | None, int | None]:
    """``(cfg, steps)`` that the exported workflow and header recommend; None: the converter's default.

    Distillation keeps CFG and the teacher's step counts (converter defaults). Reflow on pairs made with guidance
    > 1 learnt the guided flow: cfg 1, few steps. Reflow on pairs at guidance 1 keeps CFG (converter's cfg), few
    steps. docs/reflow.md gives the reasons.
    """
    if objective != "reflow":
        return None, None
    guided = pair_guidance is not None and pair_guidance > 1
    return (1.0 if guided else None), REFLOW_WORKFLOW_STEPS


def export_single_file(
    pipeline_dir: Path, dst: Path, shift: float, title: str, cfg: float | None = None, steps: int | None = None
) -> tuple[Path, Path | None]:
    """The LDM single file and its ComfyUI workflow, through ``flow_lune.convert.convert_to_single_file``;
    ``cfg``/``steps`` None: the converter's defaults."""
    from flow_lune.convert import convert_to_single_file

    extra = {"steps": steps} if steps is not None else {}
    result = convert_to_single_file(pipeline_dir, dst, shift=shift, title=title, cfg=cfg, progress=False, **extra)
    logger.info(result.summary())
    return result.dst, result.workflow


def export_final(
    output_dir: Path,
    student_unet: Any,
    teacher: Any,
    shift: float,
    args_summary: dict[str, Any],
    hub_model_id: str | None = None,
    single_file: bool = True,
    cfg: float | None = None,
    steps: int | None = None,
) -> ExportResult:
    """Write the pipeline folder with its model card, then the single file + workflow (recommending ``cfg`` and
    ``steps``; None: the converter's defaults). Main process only."""
    output_dir = Path(output_dir)
    pipeline_dir = save_flow_lune_pipeline(output_dir / PIPELINE_DIRNAME, student_unet, teacher, shift)
    card = write_model_card(pipeline_dir, teacher.source, shift, args_summary, hub_model_id)
    file, workflow = (None, None)
    if single_file:
        file, workflow = export_single_file(
            pipeline_dir, output_dir / SINGLE_FILE_NAME, shift, title=f"Flow Lune student of {teacher.source}",
            cfg=cfg, steps=steps,
        )  # fmt: skip
    return ExportResult(pipeline_dir=pipeline_dir, single_file=file, workflow=workflow, model_card=card)


def push_to_hub(output_dir: Path, hub_model_id: str, token: str | None = None) -> str:
    """One upload of the finished output folder (pipeline, single file, workflow, logs; no checkpoints)."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(hub_model_id, exist_ok=True, token=token).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        commit_message="Flow Lune: end of training",
        ignore_patterns=["checkpoint-*", "*.tmp", "*.tmp/*", "logs/*"],
        token=token,
    )
    return repo_id


def merge_lora(unet: Any) -> Any:
    """The student with its LoRA adapter merged into the base weights and removed (a plain UNet again)."""
    unet.fuse_lora()
    unet.unload_lora()
    return unet.to(torch.float32)


SUMMARY_FLAGS = (
    "learning_rate", "lr_scheduler", "train_batch_size", "gradient_accumulation_steps", "shift", "weighting_scheme",
    "loss_weighting", "kd_weight", "block_penalty_weight", "assessor", "uncond_prob", "lora_rank", "use_ema",
    "mixed_precision", "seed", "objective", "reflow_data",
)  # fmt: skip  # the flags the model card reports


def final_student(accelerator: Any, student: Any, ema: Any | None = None, lora: bool = False) -> Any:
    """The UNet to export: unwrapped, with the EMA weights copied in when there is an EMA, LoRA merged."""
    unet = accelerator.unwrap_model(student)
    if ema is not None:
        ema.copy_to(unet.parameters())
    return merge_lora(unet) if lora else unet
