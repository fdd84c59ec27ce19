"""What the trainer and the assessor's trainer share: command-line flags, their checks, and the run's start.

Both scripts must read the same teacher, data and training sigmas (the assessor is trained on what
the student will see), so the flags are defined once here.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flow_lune.settings import (
    DENSITIES,
    LOGIT_MEAN,
    LOGIT_STD,
    MODE_SCALE,
    SIGMA_DENSITY,
    TINY_TEACHER,
    TOY_DATA,
    TOY_TEACHER,
    TRAINING_SHIFT,
    check_sigma_settings,
)

from .data_config import DataConfig
from .run_state import TrainingFailed

# Nothing here imports torch: the scripts parse and check their flags before loading it.

OBJECTIVES = ("distill", "reflow")
UNCOND_PROB = 0.1  # diffusers' and SD's usual prompt dropout: enough for CFG, little cost to the conditional


def add_teacher_arguments(parser: argparse.ArgumentParser) -> None:
    """``--pretrained_teacher_model``, ``--revision``, ``--variant``, ``--teacher_config``."""
    parser.add_argument(
        "--pretrained_teacher_model",
        type=str,
        default=None,
        help="Teacher: Hub id, local diffusers folder, or single file (.safetensors); 'toy': the shipped toy teacher "
        "(train_flow_distill.py's default); 'tiny': a tiny random-weight teacher built under --cache_dir (fast tests; "
        "train_assessor.py's default).",
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
    parser.add_argument(
        "--train_data_dir", type=str, default=None, help="imagefolder with metadata.jsonl; 'toy': the toy images."
    )
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
        "--prompts_file",
        type=str,
        default=None,
        help="One prompt per line; the teacher generates the latents. 'toy': the toy world's 48 captions.",
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
        default=SIGMA_DENSITY,
        choices=DENSITIES,
        help="Density of training sigmas.",
    )
    parser.add_argument("--logit_mean", type=float, default=LOGIT_MEAN, help="logit_normal mean (SD3's default).")
    parser.add_argument("--logit_std", type=float, default=LOGIT_STD, help="logit_normal std (SD3's default).")
    parser.add_argument("--mode_scale", type=float, default=MODE_SCALE, help="mode density scale (SD3 paper's).")
    parser.add_argument(
        "--shift",
        type=float,
        default=TRAINING_SHIFT,
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


def guided_pairs(pair_guidance: float | None) -> bool:
    """Whether a reflow pair set was made with guidance > 1: its student learns the guided flow, is trained
    without prompt dropout, samples at cfg 1 and is measured against the teacher at that guidance (docs/reflow.md)."""
    return pair_guidance is not None and pair_guidance > 1


def objective_defaults(objective: str, pair_guidance: float | None = None) -> dict[str, float]:
    """The defaults of ``--kd_weight``, ``--block_penalty_weight`` and ``--uncond_prob`` for an objective."""
    from .objective import ObjectiveConfig

    if objective == "distill":
        return {
            "kd_weight": ObjectiveConfig.kd_weight,
            "block_penalty_weight": ObjectiveConfig.block_penalty_weight,
            "uncond_prob": UNCOND_PROB,
        }
    uncond_prob = 0.0 if guided_pairs(pair_guidance) else UNCOND_PROB
    return {"kd_weight": 0.0, "block_penalty_weight": 0.0, "uncond_prob": uncond_prob}


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
    check_sigma_settings(args.weighting_scheme, args.shift, args.logit_std)
    teacher = args.pretrained_teacher_model
    if teacher in (None, TOY_TEACHER, TINY_TEACHER) and (args.revision or args.variant):
        raise ValueError("--revision/--variant need --pretrained_teacher_model (a Hub id; 'toy'/'tiny' are built in).")
    if teacher is not None:
        single_file = teacher.endswith((".safetensors", ".ckpt"))
        looks_local = single_file or teacher.startswith((".", "/", "~"))
        if looks_local and not Path(teacher).expanduser().exists():
            raise ValueError(f"--pretrained_teacher_model {teacher!r} does not exist; pass a folder, file or Hub id.")
        if single_file:
            check_path_kind("--pretrained_teacher_model", teacher, folder=False)
    data_args = argparse.Namespace(**vars(args))
    data_args.resolution = args.resolution if args.resolution is not None else 512  # the teacher's decides later
    DataConfig.from_args(data_args).check()
    if getattr(args, "teacher_config", None) is not None:
        check_path_kind("--teacher_config", args.teacher_config, folder=True)
    if args.prompts_file not in (None, TOY_DATA):  # "toy" is written under --cache_dir when the run starts
        check_path_kind("--prompts_file", args.prompts_file, folder=False)
    if args.train_data_dir not in (None, TOY_DATA):
        check_path_kind("--train_data_dir", args.train_data_dir, folder=True)


def check_path_kind(flag: str, value: str, folder: bool) -> None:
    """ValueError when ``value`` is missing, or is a folder where a file is expected (or the other way round)."""
    path = Path(value).expanduser()
    want = "folder" if folder else "file"
    if not path.exists():
        raise ValueError(f"{flag} {value!r}: no such {want}.")
    if folder and not path.is_dir():
        raise ValueError(f"{flag} {value!r} is a file, not a folder; pass the folder.")
    if not folder and path.is_dir():
        raise ValueError(f"{flag} {value!r} is a folder, not a file; pass the file itself.")


class _DropMessages(logging.Filter):
    """Drops the records of one logger whose message contains one of ``fragments``."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


QUIET = {
    # transformers: image processors fall back to PIL without torchvision; Flow Lune uses no image processor
    "transformers.utils.import_utils": ("requires torchvision (not installed)",),
    # diffusers: `.to(dtype)` lists the modules that should stay float32; an empty list says nothing
    "diffusers.models.modeling_utils": ("should be kept in float32: []",),
    # bitsandbytes on an AVX512-bf16 CPU: its optional 4-bit CPU kernel; Flow Lune uses no 4-bit layer
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
}  # logger name -> message fragments dropped at that logger


def quiet_third_party() -> None:
    """Silence, at their source loggers, the third-party messages that tell a Flow Lune user nothing (``QUIET``).

    Other messages of those loggers stay. accelerate's notice of the defaults ``accelerate launch`` filled in
    (``num_processes`` 0 and the like) is printed by the launcher before this script starts; the README's
    Troubleshooting section says how to avoid it (``accelerate config default``)."""
    for name, fragments in QUIET.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in log.filters):
            log.addFilter(_DropMessages(*fragments))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers' fork warning (caches are built first)


def run_script(main: Callable[[argparse.Namespace], Any], parse_args: Callable[[], argparse.Namespace]) -> None:
    """A script's entry point: parse (argument errors: the parser's ``error:`` line, exit 2), run ``main``; a
    ValueError found after parsing (a broken checkpoint, a foreign assessor, an unreadable image, a run with no
    update, ``TrainingFailed``) is printed as one ``error:`` line with exit 1. ``FLOW_LUNE_TRACEBACK=1`` shows
    the traceback."""
    args = parse_args()
    try:
        main(args)
    except (ValueError, TrainingFailed) as err:
        if os.environ.get("FLOW_LUNE_TRACEBACK") == "1":
            raise
        sys.exit(f"{Path(sys.argv[0]).name}: error: {err}")


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
    check_process_count(accelerator, int(os.environ.get("WORLD_SIZE", "1")))
    set_seed(args.seed)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    return accelerator


def check_process_count(accelerator: Any, launched: int) -> None:
    """ValueError when the launcher started ``launched`` processes (``WORLD_SIZE``) but accelerate set up fewer:
    without a GPU, ``accelerate launch`` with a GPU config (DDP, FSDP, DeepSpeed) starts processes that each
    train alone (``DistributedType.NO``) into the same ``--output_dir``."""
    if launched > accelerator.num_processes:
        raise ValueError(
            f"{launched} processes were launched (WORLD_SIZE={launched}) but accelerate set up "
            f"{accelerator.num_processes} ({accelerator.distributed_type}): no GPU was found for the launch "
            "configuration, so each process would train alone. The GPU configs (DDP, FSDP, DeepSpeed) need GPUs; "
            "on CPU launch with `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N SCRIPT ...`."
        )
