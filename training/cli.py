"""What the trainer and the assessor's trainer share: command-line flags, their checks, and the run's start.

Both scripts must read the same teacher, data and training sigmas (the assessor is trained on what
the student will see), so the flags are defined once here.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from flow_lune.flow import DENSITIES, SigmaSampler

from .data_config import DataConfig

OBJECTIVES = ("distill", "reflow")
UNCOND_PROB = 0.1  # diffusers' and SD's usual prompt dropout: enough for CFG, little cost to the conditional


def add_teacher_arguments(parser: argparse.ArgumentParser) -> None:
    """``--pretrained_teacher_model``, ``--revision``, ``--variant``, ``--teacher_config``."""
    parser.add_argument(
        "--pretrained_teacher_model",
        type=str,
        default=None,
        help="Teacher: Hub id, local diffusers folder, or single file (.safetensors). Default: a tiny SD1.5 teacher "
        "built offline under --cache_dir (for trying things out).",
    )
    parser.add_argument("--revision", type=str, default=None, help="Revision of the teacher on the Hub.")
    parser.add_argument("--variant", type=str, default=None, help="Variant of the teacher's weights, e.g. fp16.")
    parser.add_argument(
        "--teacher_config",
        type=str,
        default=None,
        help="For a single-file teacher: a local diffusers folder with the configs and tokenizer to convert with.",
    )


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The data sources of ``training/data.py``, their caches and prompt dropout."""
    parser.add_argument("--dataset_name", type=str, default=None, help="Image-caption dataset (Hub id or folder).")
    parser.add_argument("--dataset_config_name", type=str, default=None, help="The dataset's configuration.")
    parser.add_argument("--train_data_dir", type=str, default=None, help="imagefolder with metadata.jsonl.")
    parser.add_argument(
        "--image_column", type=str, default=DataConfig.image_column, help="Image column of the dataset."
    )
    parser.add_argument(
        "--caption_column", type=str, default=DataConfig.caption_column, help="Caption column of the dataset."
    )
    parser.add_argument(
        "--resolution", type=int, default=None, help="Image size; default the teacher's (sample_size * 8)."
    )
    parser.add_argument("--center_crop", action="store_true", help="Centre crop (default: seeded random crop).")
    parser.add_argument("--random_flip", action="store_true", help="Seeded horizontal flips, one view per image.")
    parser.add_argument("--latents_dataset", type=str, default=None, help="Dataset with latents and prompts.")
    parser.add_argument(
        "--latents_column", type=str, default=DataConfig.latents_column, help="Latents column of --latents_dataset."
    )
    parser.add_argument(
        "--prompt_column", type=str, default=DataConfig.prompt_column, help="Prompt column of --latents_dataset."
    )
    parser.add_argument(
        "--prompts_file", type=str, default=None, help="One prompt per line; the teacher generates the latents."
    )
    parser.add_argument(
        "--num_generated", type=int, default=DataConfig.num_generated, help="Latents the teacher generates."
    )
    parser.add_argument(
        "--generation_steps",
        type=int,
        default=DataConfig.generation_steps,
        help="Teacher sampling steps for generation.",
    )
    parser.add_argument(
        "--generation_guidance", type=float, default=DataConfig.generation_guidance, help="CFG scale for generation."
    )
    parser.add_argument("--max_train_samples", type=int, default=None, help="Keep only the first N rows.")
    parser.add_argument(
        "--cache_dir", type=str, default=DataConfig.cache_dir, help="Latent/embedding caches and the tiny teacher."
    )
    parser.add_argument(
        "--uncond_prob",
        type=float,
        default=UNCOND_PROB,
        help="Probability of replacing a prompt by '' (the student learns the unconditional velocity for CFG).",
    )
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="0: cached rows load in-process.")


def add_sigma_arguments(parser: argparse.ArgumentParser) -> None:
    """The training sigma density and shift of ``flow/sigmas.py``."""
    parser.add_argument(
        "--weighting_scheme",
        type=str,
        default=SigmaSampler.density,
        choices=DENSITIES,
        help="Density of training sigmas.",
    )
    parser.add_argument(
        "--logit_mean", type=float, default=SigmaSampler.logit_mean, help="logit_normal mean (SD3's default)."
    )
    parser.add_argument(
        "--logit_std", type=float, default=SigmaSampler.logit_std, help="logit_normal std (SD3's default)."
    )
    parser.add_argument(
        "--mode_scale", type=float, default=SigmaSampler.mode_scale, help="mode density scale (SD3 paper's)."
    )
    parser.add_argument(
        "--shift",
        type=float,
        default=SigmaSampler.shift,
        help="Time shift of training and sampling sigmas (> 1: toward noise).",
    )


def add_objective_arguments(parser: argparse.ArgumentParser) -> None:
    """``--objective distill|reflow`` and ``--reflow_data`` (docs/reflow.md).

    Three defaults depend on the objective, so their flags default to None here and
    :func:`resolve_objective_defaults` fills them in after parsing: ``--kd_weight`` and ``--block_penalty_weight``
    (0 for reflow: its target departs from the teacher's curved field on purpose, and KD would cost a teacher
    forward per step), ``--uncond_prob`` (0 for pairs made with guidance > 1: the student learns the guided flow
    and samples at cfg 1; the usual dropout for pairs at guidance 1, so CFG still works at sampling).
    """
    group = parser.add_argument_group("Objective")
    group.add_argument(
        "--objective",
        type=str,
        default="distill",  # the first stage: distil the teacher; reflow is a second stage on pairs
        choices=OBJECTIVES,
        help="distill: match the teacher's velocity on noised real latents; reflow: train on straight lines "
        "between reflow pairs (--reflow_data, from generate_reflow_pairs.py).",
    )
    group.add_argument(
        "--reflow_data", type=str, default=None, help="A finished pair set from generate_reflow_pairs.py."
    )
    parser.set_defaults(kd_weight=None, block_penalty_weight=None, uncond_prob=None)


def objective_defaults(objective: str, pair_guidance: float | None = None) -> dict[str, float]:
    """The defaults of ``--kd_weight``, ``--block_penalty_weight`` and ``--uncond_prob`` for an objective."""
    from .objective import ObjectiveConfig

    if objective == "distill":
        return {
            "kd_weight": ObjectiveConfig.kd_weight,
            "block_penalty_weight": ObjectiveConfig.block_penalty_weight,
            "uncond_prob": UNCOND_PROB,
        }
    guided = pair_guidance is not None and pair_guidance > 1
    return {"kd_weight": 0.0, "block_penalty_weight": 0.0, "uncond_prob": 0.0 if guided else UNCOND_PROB}


def resolve_objective_defaults(args: argparse.Namespace) -> None:
    """Check ``--objective``/``--reflow_data`` and fill in the objective-dependent defaults left at None."""
    pair_guidance = None
    if args.objective == "reflow":
        if args.reflow_data is None:
            raise ValueError("--objective reflow needs --reflow_data DIR (a pair set from generate_reflow_pairs.py).")
        from .reflow_pairs import pairs_guidance

        pair_guidance = pairs_guidance(args.reflow_data)  # ValueError naming the fix when not a finished set
        given = [f for f in ("dataset_name", "train_data_dir", "latents_dataset", "prompts_file") if getattr(args, f)]
        if given:
            raise ValueError(
                f"--objective reflow trains on --reflow_data only; drop --{given[0]} (its latents are not used)."
            )
    elif args.reflow_data is not None:
        raise ValueError("--reflow_data is for --objective reflow; add --objective reflow or drop --reflow_data.")
    for name, value in objective_defaults(args.objective, pair_guidance).items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def check_shared_arguments(args: argparse.Namespace) -> None:
    """One clear ValueError for bad teacher, data or sigma flags, before any work."""
    if not 0.0 <= args.uncond_prob <= 1.0:
        raise ValueError(f"--uncond_prob must be in [0, 1], got {args.uncond_prob}.")
    SigmaSampler(args.weighting_scheme, args.shift, args.logit_mean, args.logit_std, args.mode_scale)  # checks
    teacher = args.pretrained_teacher_model
    if teacher is None and (args.revision or args.variant):
        raise ValueError("--revision/--variant need --pretrained_teacher_model.")
    if teacher is not None:
        looks_local = teacher.endswith((".safetensors", ".ckpt")) or teacher.startswith((".", "/", "~"))
        if looks_local and not Path(teacher).expanduser().exists():
            raise ValueError(f"--pretrained_teacher_model {teacher!r} does not exist; pass a folder, file or Hub id.")
    data_args = argparse.Namespace(**vars(args))
    data_args.resolution = args.resolution if args.resolution is not None else 512  # the teacher's decides later
    DataConfig.from_args(data_args).check()


def start_run(args: argparse.Namespace, gradient_accumulation_steps: int = 1) -> Any:
    """The run's ``Accelerator`` (trackers from ``--report_to``, logs under ``--output_dir/--logging_dir``),
    logging configured, ``set_seed(--seed)`` for anything outside the counter-based streams, the output folder
    made on the main process."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logging.getLogger(__name__).info(accelerator.state)
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    return accelerator
