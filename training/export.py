"""End of training: the FlowLunePipeline folder, the single file + ComfyUI workflow, the model card, the upload.

Each part is written under a temporary name and renamed when complete, in the order of ``run_state``:
``export-plan.json``, ``pipeline/`` (with its model card), the single file and its workflows, and last
``run-complete.json``. :func:`finish_export` writes what is missing from ``pipeline/``, so an export killed at
any point is completed by running the trainer's command again.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from flow_lune.atomic import atomic_folder, atomic_text
from flow_lune.settings import SAMPLING, SamplingRecommendation, recipe_for

from .checkpoints import check_finite_parameters
from .cli import guided_pairs
from .run_state import (
    COMPLETE_NAME,
    PIPELINE_DIRNAME,
    PLAN_NAME,
    SINGLE_FILE_NAME,
    WORKFLOW_NAMES,
    read_json,
)

logger = logging.getLogger(__name__)


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


def save_flow_lune_pipeline(
    folder: Path, student_unet: Any, teacher: Any, shift: float, card: str | None = None
) -> Path:
    """A ``FlowLunePipeline`` folder: the student UNet (fp32), the teacher's VAE/text encoder/tokenizer, a
    ``FlowLuneScheduler(shift=shift)`` and the model card ``card`` as ``README.md``; written to a temporary
    folder and renamed, so ``folder`` in place is always complete."""
    folder = Path(folder)
    _fresh(folder)
    check_finite_parameters(student_unet)
    pipe = student_pipeline(student_unet, teacher, shift)

    def fill(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if card is not None:
            (tmp / "README.md").write_text(card)

    atomic_folder(folder, fill)
    return folder


def teacher_name(source: str) -> str:
    """How the model card and the file's title name the teacher: a Hub id as is; a local path by its last
    component only (no absolute local paths leave the machine)."""
    path = Path(source).expanduser()
    if path.is_absolute() or path.exists() or source.startswith((".", "~")):
        return f"local {path.name}"
    return source


def model_card_text(
    teacher_source: str,
    shift: float,
    args_summary: dict[str, Any],
    hub_model_id: str | None = None,
    sampling: SamplingRecommendation = SAMPLING,
) -> str:
    """The model description (Markdown): what the student is, how to sample it (``sampling``, the run's one
    recommendation, and where its numbers come from), its ComfyUI use, limitations, and the training flags."""
    name = teacher_name(teacher_source)
    repo = hub_model_id or "path/to/pipeline"
    rows = "\n".join(f"| `--{k}` | `{v}` |" for k, v in args_summary.items())
    steps, cfg = sampling.steps, sampling.guidance_scale
    example = recipe_for(teacher_source).validation_prompts[0]  # a prompt this teacher draws (toy: a toy caption)
    return f"""# Flow Lune student of `{name}`

A rectified-flow student distilled with Flow Lune's `train_flow_distill.py` from the epsilon-prediction
Stable Diffusion 1.5 teacher `{name}`. Same UNet architecture; it predicts the flow velocity
`v = eps - x0` at `x_sigma = (1 - sigma) x0 + sigma eps`, timestep `1000 * sigma`, and samples with
Euler steps on a shift-{shift:g} sigma grid (`FlowLuneScheduler(shift={shift:g})`, compatible with diffusers'
`FlowMatchEulerDiscreteScheduler` and ComfyUI's `ModelSamplingSD3` node).

**Sampling:** {steps} Euler steps, guidance {cfg:g}, shift {shift:g} (the shift it was trained with).{_basis(sampling)}

## Use with diffusers

```python
import torch
from flow_lune import FlowLunePipeline

device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.float16 if device == "cuda" else torch.float32
pipe = FlowLunePipeline.from_pretrained("{repo}", dtype=dtype).to(device)
prompt = "{example}"
image = pipe(prompt, num_inference_steps={steps}, guidance_scale={cfg:g}).images[0]
image.save("sample.png")
```

## Use with ComfyUI / A1111

`{SINGLE_FILE_NAME}` (in the training output folder) is the single file in the original (LDM) key layout; load it with
`CheckpointLoaderSimple` and put a `ModelSamplingSD3` node with shift {shift:g} in front of the sampler (ComfyUI
loads SD1.5 files as epsilon models otherwise). `{WORKFLOW_NAMES[0]}` (API format) and `{WORKFLOW_NAMES[1]}`
(editor format) next to it do exactly that, with {steps} euler steps at cfg {cfg:g}.

## Limitations

The student learns the teacher's DDIM trajectories; it inherits the teacher's abilities, biases and licence, and
{_limitation(args_summary)}

## Training

| flag | value |
|---|---|
{rows}
"""


def _basis(sampling: SamplingRecommendation) -> str:
    return f"\nThe steps and guidance: {sampling.basis}." if sampling.basis else ""


def _limitation(args_summary: dict[str, Any]) -> str:
    if args_summary.get("objective") == "reflow":
        return "it was trained by reflow on pairs from a model's own ODE, for few-step sampling (docs/reflow.md)."
    return "it is no better than the teacher sampled with DDIM at the same number of steps. It is not a few-step model."


def recommended_sampling(
    teacher: str | None, objective: str = "distill", pair_guidance: float | None = None
) -> SamplingRecommendation:
    """What the exported card, header and workflow recommend: the recipe of the run's teacher
    (``settings.recipe_for(teacher).sampling``: the toy world's measured one, or SD1.5's) for distillation.

    Reflow: the recipe's ``reflow_sampling_steps`` (toy: measured; SD1.5: not). On pairs made with guidance > 1 the
    student learnt the guided flow: cfg 1. On pairs at guidance 1 it keeps the recipe's CFG. docs/reflow.md gives
    the reasons.
    """
    recipe = recipe_for(teacher)
    base = recipe.sampling
    if objective != "reflow":
        return base
    guided = guided_pairs(pair_guidance)
    cfg = 1.0 if guided else base.guidance_scale
    basis = (
        f"reflow on pairs made at guidance {pair_guidance:g}, so the guidance is in the flow: cfg 1"
        if guided
        else f"reflow on unguided pairs: the guidance of the {recipe.name} recipe"
    )
    basis += f"; {recipe.reflow_sampling_steps} steps, {recipe.reflow_steps_basis}"
    return replace(base, steps=recipe.reflow_sampling_steps, guidance_scale=cfg, basis=basis)


def model_card(
    teacher_source: str,
    shift: float,
    args_summary: dict[str, Any],
    hub_model_id: str | None = None,
    sampling: SamplingRecommendation = SAMPLING,
) -> str:
    """The whole ``README.md``: YAML card data (licence, library, tags, base model when it is a Hub id) and
    :func:`model_card_text`; no template placeholders."""
    from huggingface_hub import ModelCardData

    from flow_lune.convert.recommendation import CARD_SAMPLING_KEY

    hub_teacher = teacher_name(teacher_source) == teacher_source and "/" in teacher_source
    data = ModelCardData(
        license="creativeml-openrail-m",  # SD1.5's licence carries over to derivatives
        library_name="diffusers",
        base_model=teacher_source if hub_teacher else None,
        tags=["text-to-image", "diffusers", "flow-lune", "rectified-flow", "distillation", "stable-diffusion"],
        # the recommendation, machine-readable: flow-lune-convert to-single-file takes it from here
        **{CARD_SAMPLING_KEY: asdict(replace(sampling, shift=float(shift)))},
    )
    text = model_card_text(teacher_source, shift, args_summary, hub_model_id, sampling)
    return f"---\n{data.to_yaml()}\n---\n\n{text}"


def write_model_card(
    folder: Path,
    teacher_source: str,
    shift: float,
    args_summary: dict[str, Any],
    hub_model_id: str | None = None,
    sampling: SamplingRecommendation = SAMPLING,
) -> Path:
    """``README.md`` in ``folder`` (:func:`model_card`), written atomically."""
    path = Path(folder) / "README.md"
    atomic_text(path, model_card(teacher_source, shift, args_summary, hub_model_id, sampling))
    return path


def export_single_file(
    pipeline_dir: Path,
    dst: Path,
    shift: float,
    title: str,
    overwrite: bool = False,
    sampling: SamplingRecommendation = SAMPLING,
) -> tuple[Path, Path | None]:
    """The LDM single file and its ComfyUI workflows, through ``flow_lune.convert.convert_to_single_file``, with
    the sampling recommendation (:func:`recommended_sampling`) in the metadata and the workflows."""
    from flow_lune.convert import convert_to_single_file

    result = convert_to_single_file(
        pipeline_dir, dst, shift=shift, cfg=sampling.guidance_scale, steps=sampling.steps, title=title,
        overwrite=overwrite, progress=False,
    )  # fmt: skip
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
    requested_args: dict[str, Any] | None = None,
    steps: int | None = None,
    sampling: SamplingRecommendation = SAMPLING,
) -> ExportResult:
    """Write the export plan, the pipeline folder with its model card, then (:func:`finish_export`) the single
    file + workflows and the completion record. Main process only.

    ``requested_args`` (the flags as given) go into the plan, so a repeated command is recognised as the same.
    ``sampling`` (:func:`recommended_sampling`) is recorded with the run's ``shift``.
    """
    output_dir = Path(output_dir)
    sampling = replace(sampling, shift=float(shift))
    plan = {
        "shift": shift,
        "title": f"Flow Lune student of {teacher_name(teacher.source)}",
        "single_file": single_file,
        "steps": steps,
        "args": requested_args or {},
        "sampling": asdict(sampling),
    }
    atomic_text(output_dir / PLAN_NAME, json.dumps(plan, indent=2))
    card = model_card(teacher.source, shift, args_summary, hub_model_id, sampling)
    save_flow_lune_pipeline(output_dir / PIPELINE_DIRNAME, student_unet, teacher, shift, card=card)
    return finish_export(output_dir)


def finish_export(output_dir: Path) -> ExportResult:
    """Complete an export whose plan and ``pipeline/`` are in place: the single file and its workflows (redone
    unless all three are there; they are this run's, the plan says so), then ``run-complete.json``, last."""
    output_dir = Path(output_dir)
    plan = read_json(output_dir / PLAN_NAME)
    pipeline_dir = output_dir / PIPELINE_DIRNAME
    if plan is None or not pipeline_dir.is_dir():
        raise FileNotFoundError(f"{output_dir} has no export plan and pipeline/ to finish an export from.")
    file = workflow = None
    names = [PIPELINE_DIRNAME]
    if plan["single_file"]:
        parts = [output_dir / SINGLE_FILE_NAME, *(output_dir / n for n in WORKFLOW_NAMES)]
        if all(p.exists() for p in parts):
            file, workflow = parts[0], parts[1]
        else:
            sampling = SamplingRecommendation(**plan["sampling"]) if "sampling" in plan else SAMPLING
            file, workflow = export_single_file(
                pipeline_dir, parts[0], plan["shift"], title=plan["title"], overwrite=True, sampling=sampling
            )
        names += [SINGLE_FILE_NAME, *WORKFLOW_NAMES]
    record = {**plan, "files": names}
    atomic_text(output_dir / COMPLETE_NAME, json.dumps(record, indent=2))
    return ExportResult(
        pipeline_dir=pipeline_dir, single_file=file, workflow=workflow, model_card=pipeline_dir / "README.md"
    )


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
    "mixed_precision", "seed",
)  # fmt: skip  # the flags the model card reports


def final_student(unet: Any, lora: bool = False) -> Any:
    """The UNet to export from the one ``sharding.sampling_weights`` gives (unsharded, EMA weights in): LoRA merged."""
    return merge_lora(unet) if lora else unet
