#!/usr/bin/env python
"""Distil an epsilon-prediction Stable Diffusion 1.5 teacher into a rectified-flow student (Flow Lune).

    accelerate launch train_flow_distill.py --output_dir flow-lune-output

Without ``--pretrained_teacher_model`` this is the toy world's default job: it distils the shipped toy teacher
(``flow_lune.toy.teacher_path()``) on the toy images with a recipe sized for 2 CPU cores, logs the judge's
accuracy at each validation, and ends with an evaluation table (``eval/summary.md``). With a teacher given the
defaults are SD1.5's; ``flow_lune.settings`` holds both recipes, and a flag the user gives always wins.
``--pretrained_teacher_model tiny`` is a tiny random-weight teacher for fast tests.

Several CPU processes: ``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 train_flow_distill.py ...``. The math
lives in ``flow_lune.training`` (DESIGN.md sections 2 to 7); this script only wires it together, in the layout of
diffusers' example trainers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

# Only torch-free modules here: --help and argument errors return before torch, diffusers or accelerate load.
from flow_lune.settings import (
    ADAPTIVE_JITTER,
    BASE_BLOCK_WEIGHTS,
    BASE_JITTER,
    BLOCK_PENALTY_WEIGHT,
    KD_WEIGHT,
    LOSS_WEIGHTINGS,
    RELIABILITY_THRESHOLD,
    FusionConfig,
)
from flow_lune.training.cli import (
    add_data_arguments,
    add_objective_arguments,
    add_sigma_arguments,
    add_teacher_arguments,
    check_shared_arguments,
    quiet_third_party,
    resolve_objective_defaults,
    run_script,
    start_run,
)
from flow_lune.training.recipe import check_recipe_flags, resolve_recipe
from flow_lune.training.run_state import (
    PIPELINE_DIRNAME,
    SINGLE_FILE_NAME,
    TrainingFailed,
    check_output_dir,
    completion_message,
    finished_run,
    interrupted_export,
    remove_set_aside,
    requested_arguments,
    set_aside,
)

logger = None  # accelerate's logger, made in main() once accelerate is imported
RECIPE_DEFAULT = "default: the recipe's (flow_lune.settings)"  # help text of a flag the recipe fills


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Flow Lune: distil an epsilon SD1.5 teacher into a flow student.",
        usage="%(prog)s [-h] [--output_dir DIR] [--pretrained_teacher_model ID_OR_PATH] [options]",  # short: errors
    )

    # ----------Model Arguments----------
    add_teacher_arguments(parser)
    parser.add_argument(
        "--student_model",
        type=str,
        default=None,
        help="Start the student from this UNet (diffusers UNet or pipeline folder, or a checkpoint-N folder) "
        "instead of a copy of the teacher's UNet.",
    )
    # ----------Data Arguments----------
    add_data_arguments(parser)
    # ----------Objective Arguments----------
    add_sigma_arguments(parser)
    parser.add_argument("--loss_weighting", type=str, default="none", choices=LOSS_WEIGHTINGS)
    parser.add_argument("--kd_weight", type=float, default=KD_WEIGHT, help="Weight of sum_b w_b KD_b.")
    parser.add_argument(
        "--block_penalty_weight",
        type=float,
        default=BLOCK_PENALTY_WEIGHT,
        help="Weight of sum_b lambda_b KD_b.",
    )
    parser.add_argument(
        "--base_block_weights",
        type=float,
        nargs=9,
        default=list(BASE_BLOCK_WEIGHTS),
        metavar="W",
        help="w_b of the 9 blocks.",
    )
    add_objective_arguments(parser)  # --objective distill|reflow, --reflow_data (docs/reflow.md)
    # ----------Assessor Arguments----------
    parser.add_argument("--assessor", type=str, default="none", help="'none' (lambda_b = w_b) or an assessor folder.")
    parser.add_argument("--fusion_alpha", type=float, default=FusionConfig.alpha, help="Weight of e_t in lambda_b.")
    parser.add_argument("--fusion_beta", type=float, default=FusionConfig.beta, help="Weight of e_p in lambda_b.")
    parser.add_argument("--fusion_delta", type=float, default=FusionConfig.delta, help="Weight of 1 - coh.")
    parser.add_argument("--lambda_min", type=float, default=FusionConfig.lam_min, help="Lower clip of lambda_b.")
    parser.add_argument("--lambda_max", type=float, default=FusionConfig.lam_max, help="Upper clip of lambda_b.")
    parser.add_argument(
        "--timestep_sampling",
        type=str,
        default="density",
        choices=("density", "adaptive"),
        help="adaptive: sigma bins weighted by the assessor's profile (needs --assessor PATH).",
    )
    parser.add_argument("--reliability_threshold", type=float, default=RELIABILITY_THRESHOLD)
    parser.add_argument("--base_jitter", type=float, default=BASE_JITTER, help="Sigma jitter, in bin widths.")
    parser.add_argument(
        "--adaptive_jitter", type=float, default=ADAPTIVE_JITTER, help="How much a bin's pattern entropy widens it."
    )
    # ----------Training Arguments----------
    parser.add_argument("--output_dir", type=str, default="flow-lune-output")
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Start over in --output_dir: the old folder is set aside once the flags are checked and deleted once "
        "the new run has started. Without it, repeating the command of a finished run says so and exits.",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seeds data order, sigmas, noise, dropout, caches.")
    parser.add_argument("--train_batch_size", type=int, default=None, help=f"Per process; {RECIPE_DEFAULT}.")
    parser.add_argument("--num_train_epochs", type=int, default=None, help="Default 1, when no step count is set.")
    parser.add_argument(
        "--max_train_steps", type=int, default=None, help=f"Overrides --num_train_epochs; {RECIPE_DEFAULT}."
    )
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--learning_rate", type=float, default=None, help=RECIPE_DEFAULT)
    parser.add_argument("--scale_lr", action="store_true", help="Multiply lr by accumulation * batch * processes.")
    parser.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        help='"linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"',
    )
    parser.add_argument("--lr_warmup_steps", type=int, default=0, help="0: the student starts from trained weights.")
    parser.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit.")
    parser.add_argument("--adam_beta1", type=float, default=0.9)
    parser.add_argument("--adam_beta2", type=float, default=0.999)
    parser.add_argument("--adam_weight_decay", type=float, default=1e-2)
    parser.add_argument("--adam_epsilon", type=float, default=1e-08)
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="0 disables clipping.")
    parser.add_argument("--use_ema", action="store_true", help="Keep an EMA of the student (diffusers EMAModel).")
    parser.add_argument("--ema_decay", type=float, default=0.9999)
    parser.add_argument("--lora_rank", type=int, default=None, help="Train a peft LoRA of this rank instead.")
    parser.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha; default the rank.")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    parser.add_argument("--allow_tf32", action="store_true")
    parser.add_argument(
        "--torch_threads", type=int, default=None, help=f"torch.set_num_threads (0: torch's); {RECIPE_DEFAULT}."
    )
    parser.add_argument(
        "--max_nonfinite_steps", type=int, default=10, help="Stop after this many non-finite losses in a row."
    )
    # ----------Logging, Checkpoints, Validation----------
    parser.add_argument("--logging_dir", type=str, default="logs")
    parser.add_argument("--report_to", type=str, default="tensorboard", help='"tensorboard", "wandb", "all", "none".')
    parser.add_argument("--logging_steps", type=int, default=1, help="One metrics.jsonl record every N steps.")
    parser.add_argument("--checkpointing_steps", type=int, default=500)
    parser.add_argument("--checkpoints_total_limit", type=int, default=None)
    parser.add_argument("--resume_from_checkpoint", type=str, default=None, help='"latest" or a checkpoint folder.')
    parser.add_argument(
        "--validation_steps",
        type=int,
        default=None,
        help=f"Teacher/student grid every N steps and at the end; {RECIPE_DEFAULT}.",
    )
    parser.add_argument("--validation_prompts", type=str, nargs="+", default=None, help=RECIPE_DEFAULT)
    parser.add_argument("--num_validation_inference_steps", type=int, default=None, help=RECIPE_DEFAULT)
    parser.add_argument(
        "--validation_guidance_scale", type=float, default=None, help=f"Also the evaluation's; {RECIPE_DEFAULT}."
    )
    parser.add_argument(
        "--judge_prompts",
        type=int,
        default=None,
        help=f"Toy teacher: held-out toy prompts the judge reads at each validation (0: off); {RECIPE_DEFAULT}.",
    )
    parser.add_argument(
        "--eval_prompts",
        type=int,
        default=None,
        help=f"Toy teacher: toy prompts of the evaluation after training (0: none); {RECIPE_DEFAULT}.",
    )
    parser.add_argument(
        "--eval_steps",
        type=int,
        nargs="+",
        default=[25, 8, 4],  # teacher DDIM 25 is the reference; the student's few-step settings are the question
        help="Sampling steps of the evaluation (teacher DDIM and student Euler); the largest is the reference.",
    )
    parser.add_argument("--no_single_file", action="store_true", help="Skip the single-file + workflow export.")
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the output once, at the end.")
    parser.add_argument("--hub_model_id", type=str, default=None, help="Repository id; the token comes from HF_TOKEN.")

    parser.set_defaults(num_generated=None, generation_guidance=None)  # filled by the recipe
    args = parser.parse_args(input_args)
    args.recipe_log = resolve_recipe(args).lines(args.pretrained_teacher_model or "toy")
    try:
        resolve_objective_defaults(args)  # --kd_weight, --block_penalty_weight, --uncond_prob depend on --objective
        check_args(args)
    except ValueError as err:
        parser.error(str(err))  # one "error: ..." line, exit 2
    return args


def check_args(args: argparse.Namespace) -> None:
    """One clear ValueError for contradictory or out-of-range flags or an unusable --output_dir, before any work
    (no torch import); ``parse_args`` reports it through the parser."""
    positive = ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps")
    for name in (*positive, "logging_steps", "num_train_epochs", "max_nonfinite_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise ValueError(f"--max_train_steps must be >= 1, got {args.max_train_steps}.")
    for name in ("kd_weight", "block_penalty_weight", "max_grad_norm", "lr_warmup_steps"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}.")
    if not args.learning_rate > 0:
        raise ValueError(f"--learning_rate must be > 0, got {args.learning_rate}.")
    FusionConfig(args.fusion_alpha, args.fusion_beta, args.fusion_delta, args.lambda_min, args.lambda_max)
    check_shared_arguments(args)
    check_recipe_flags(args)
    if args.timestep_sampling == "adaptive" and args.assessor == "none":
        raise ValueError("--timestep_sampling adaptive needs --assessor PATH (it reads PATH/profile.json).")
    if args.assessor != "none" and not Path(args.assessor).is_dir():
        raise ValueError(f"--assessor {args.assessor!r} is not a folder; pass 'none' or an assessor folder.")
    if args.lora_rank is not None:
        if args.lora_rank < 1:
            raise ValueError(f"--lora_rank must be >= 1, got {args.lora_rank}.")
        if args.use_ema:
            raise ValueError("--use_ema with --lora_rank is not supported: drop one of them.")
    if args.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise ValueError(
                "--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`, or drop the flag."
            ) from err
    if args.push_to_hub and not args.hub_model_id:
        raise ValueError("--push_to_hub needs --hub_model_id (the token comes from the HF_TOKEN environment variable).")
    if args.hub_model_id and not args.push_to_hub:
        raise ValueError("--hub_model_id is given without --push_to_hub; add --push_to_hub or drop the id.")
    if not args.validation_prompts:
        raise ValueError("--validation_prompts needs at least one prompt.")
    check_output_dir(args.output_dir, requested_arguments(args), args.resume_from_checkpoint, args.overwrite_output_dir)


def trackable_config(args: argparse.Namespace) -> dict:
    """The flags as tracker hyperparameters: scalars and strings only."""
    out = {}
    for key, value in vars(args).items():
        out[key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return out


def main(args: argparse.Namespace) -> Path:
    output_dir = Path(args.output_dir)
    main_process = os.environ.get("RANK", "0") == "0"  # before accelerate: torchrun/accelerate set RANK
    requested = requested_arguments(args)  # the flags as given, before main() fills in defaults
    # 0. A second run of a finished command: say so and stop; an interrupted export: finish it from pipeline/
    done = None if args.overwrite_output_dir else finished_run(output_dir)
    if done is not None:
        if main_process and args.eval_prompts and not (output_dir / "eval" / "summary.md").is_file():
            # the evaluation runs after run-complete.json and writes summary.md last: it did not finish
            print(f"{output_dir} holds a finished run whose evaluation did not finish: evaluating.", file=sys.stderr)
            quiet_third_party()
            if args.torch_threads:
                import torch

                torch.set_num_threads(args.torch_threads)
            final_evaluation(args, output_dir / PIPELINE_DIRNAME, output_dir)
        elif main_process:
            print(completion_message(output_dir, done), file=sys.stderr)
        return output_dir / PIPELINE_DIRNAME
    if not args.overwrite_output_dir and interrupted_export(output_dir) and (output_dir / PIPELINE_DIRNAME).is_dir():
        if main_process:
            from flow_lune.training.export import finish_export

            quiet_third_party()
            result = finish_export(output_dir)
            print(
                f"Finished the interrupted export of {output_dir}: {result.pipeline_dir}"
                + (f", {result.single_file}" if result.single_file else ""),
                file=sys.stderr,
            )
            if args.push_to_hub:
                from flow_lune.training.export import push_to_hub

                push_to_hub(output_dir, args.hub_model_id, token=os.environ.get("HF_TOKEN"))
        return output_dir / PIPELINE_DIRNAME

    if main_process:
        print("\n".join(args.recipe_log), file=sys.stderr)
    print(f"Flow Lune: training into {output_dir}; loading libraries and the teacher...", file=sys.stderr, flush=True)
    quiet_third_party()
    global logger
    import torch
    from accelerate.logging import get_logger
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from flow_lune.atomic import atomic_text
    from flow_lune.flow import EpsilonToFlowUNet, SigmaSampler
    from flow_lune.training.block_features import BlockFeatureHooks, block_channels
    from flow_lune.training.block_penalty import build_block_penalty
    from flow_lune.training.checkpoints import (
        EpochShuffleSampler,
        register_checkpoint_hooks,
        resume_position,
        save_checkpoint,
    )
    from flow_lune.training.data import DataConfig, collate, prepare_training_data
    from flow_lune.training.export import (
        SUMMARY_FLAGS,
        export_final,
        final_student,
        push_to_hub,
        recommended_sampling,
    )
    from flow_lune.training.metrics import PhaseTimes, TrainingLog, read_metrics
    from flow_lune.training.models import build_student, load_teacher_from_args, prepare_student, teacher_resolution
    from flow_lune.training.objective import ObjectiveConfig
    from flow_lune.training.optimization import build_lr_scheduler, build_optimizer
    from flow_lune.training.plots import plot_training
    from flow_lune.training.recipe import materialize_toy_data
    from flow_lune.training.seeds import RandomStreams
    from flow_lune.training.sharding import sampling_weights, shard_ema
    from flow_lune.training.step import DistillationStep, ReflowStep
    from flow_lune.training.validation import JudgeReadings, log_validation

    logger = get_logger(__name__, log_level="INFO")
    times = PhaseTimes()  # timings.json: data, training, validation, export, evaluation (bench_default_job.py)

    # 1. Accelerator, logging, seed, output folder (an old one set aside with --overwrite_output_dir)
    accelerator = start_run(args, args.gradient_accumulation_steps)
    if args.lora_rank is not None and accelerator.distributed_type == "FSDP":
        raise ValueError("--lora_rank under FSDP is not supported; the adapter is small: use DDP (ddp.yaml).")
    set_aside_dir = None
    if args.overwrite_output_dir and accelerator.is_main_process:
        set_aside_dir = set_aside(output_dir)
        if set_aside_dir is not None:
            logger.info(f"--overwrite_output_dir: the old {output_dir} is set aside as {set_aside_dir}")
    accelerator.wait_for_everyone()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # 2. Teacher: frozen, out of accelerator.prepare, queried in flow coordinates through the bridge
    teacher, teacher_id = load_teacher_from_args(args, accelerator)
    teacher_flow = EpsilonToFlowUNet(teacher.unet, teacher.scheduler_config)
    if args.resolution is None:
        args.resolution = teacher_resolution(teacher)

    # 3. Student: fp32 trainable weights (a copy of the teacher's UNet, or --student_model)
    student = build_student(teacher.unet, args.student_model)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    teacher.unet.to(accelerator.device, dtype=weight_dtype)
    teacher.vae.to(accelerator.device, dtype=torch.float32)  # VAE encoding in fp32
    teacher.text_encoder.to(accelerator.device, dtype=torch.float32)  # embeddings are cached; keep export exact
    student = prepare_student(
        student, accelerator.device, weight_dtype, args.lora_rank, args.lora_alpha, args.gradient_checkpointing
    )
    ema = None
    if args.use_ema:
        ema = EMAModel(
            student.parameters(), decay=args.ema_decay, model_cls=UNet2DConditionModel, model_config=student.config
        )
        ema.to(accelerator.device)

    # 4. Block hooks (unwrapped modules), block penalty lambda_b, sigma sampler
    student_hooks = BlockFeatureHooks(student).attach()
    teacher_hooks = BlockFeatureHooks(teacher.unet).attach()
    fusion = FusionConfig(args.fusion_alpha, args.fusion_beta, args.fusion_delta, args.lambda_min, args.lambda_max)
    block_penalty = build_block_penalty(args.assessor, args.base_block_weights, fusion, accelerator.device)
    if args.assessor != "none":  # an assessor reads the student's pooled block features: same channel counts
        expected, found = block_channels(student), list(block_penalty.assessor.config.block_channels)
        if expected != found:
            raise ValueError(
                f"--assessor {args.assessor} was built for a UNet with block channels {found}; this student has "
                f"{expected}. Train an assessor on this teacher (train_assessor.py) or pass --assessor none."
            )
    sigma_sampler = SigmaSampler(args.weighting_scheme, args.shift, args.logit_mean, args.logit_std, args.mode_scale)
    if args.timestep_sampling == "adaptive":
        from flow_lune.training.profile import adaptive_sampler_from_profile

        sigma_sampler = adaptive_sampler_from_profile(
            Path(args.assessor) / "profile.json",
            base=sigma_sampler,
            reliability_threshold=args.reliability_threshold,
            base_jitter=args.base_jitter,
            adaptive_jitter=args.adaptive_jitter,
        )
    objective = ObjectiveConfig(args.loss_weighting, args.kd_weight, args.block_penalty_weight, args.base_block_weights)
    streams = RandomStreams(args.seed, accelerator.process_index)

    # 5. Data: cached latents x0 and prompt embeddings (the toy images or captions written once under --cache_dir);
    #    for reflow, the pairs (z, x0_hat) and their embeddings
    collate_fn = collate
    if args.objective == "reflow":
        from flow_lune.training.reflow_pairs import ReflowPairs, check_pairs_match, collate_pairs

        train_dataset, collate_fn = ReflowPairs(args.reflow_data), collate_pairs
        check_pairs_match(train_dataset, teacher.text_encoder, args.resolution)
    else:
        with times.phase("data/toy_set"):
            materialize_toy_data(args, accelerator)
        data_config = DataConfig.from_args(args)
        data_config.teacher_id = teacher_id
        with times.phase("data/latents_and_embeddings"):  # VAE encoding, or the teacher's generated latents
            train_dataset = prepare_training_data(data_config, teacher, accelerator)
    train_sampler = EpochShuffleSampler(len(train_dataset), args.seed)
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=args.train_batch_size,
        sampler=train_sampler,
        collate_fn=collate_fn,
        num_workers=args.dataloader_num_workers,
    )

    # 6. Optimizer and learning-rate schedule, sized to the real number of optimizer steps
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = build_optimizer(
        student.parameters(), args.learning_rate, (args.adam_beta1, args.adam_beta2), args.adam_weight_decay,
        args.adam_epsilon, args.use_8bit_adam, accelerator.device,
    )  # fmt: skip
    batches_per_process = math.ceil(len(train_dataloader) / accelerator.num_processes)
    num_update_steps_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * num_update_steps_per_epoch
    lr_scheduler = build_lr_scheduler(
        args.lr_scheduler, optimizer, args.lr_warmup_steps, max_train_steps, accelerator.num_processes
    )

    # 7. Prepare with accelerate; checkpoint hooks; trackers
    student, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        student, optimizer, train_dataloader, lr_scheduler
    )
    if ema is not None:
        shard_ema(ema, student.parameters())  # FSDP: each process averages its own slice of the student
    register_checkpoint_hooks(accelerator, ema=ema, lora=args.lora_rank is not None)
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_train_epochs = math.ceil(max_train_steps / num_update_steps_per_epoch)
    if accelerator.is_main_process:
        accelerator.init_trackers("flow-lune", config=trackable_config(args))
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(f"  Num examples = {len(train_dataset)}; num epochs = {num_train_epochs}")
    logger.info(f"  Batch per process = {args.train_batch_size}; total batch = {total_batch_size}")
    logger.info(f"  Gradient accumulation = {args.gradient_accumulation_steps}; optimizer steps = {max_train_steps}")

    # 8. Resume at the exact batch and step
    global_step, first_epoch, resume_batches = resume_position(
        accelerator, args.resume_from_checkpoint, output_dir, num_update_steps_per_epoch,
        args.gradient_accumulation_steps, student=student,
    )  # fmt: skip
    remove_set_aside(set_aside_dir)  # the new run has started: the overwritten one goes
    if accelerator.is_main_process:
        name = (
            "args.json" if global_step == 0 and not (output_dir / "args.json").exists() else f"args-{global_step}.json"
        )
        atomic_text(output_dir / name, json.dumps(vars(args), indent=2, default=str))
    training_log = TrainingLog(accelerator, output_dir / "metrics.jsonl", total_batch_size, global_step)

    # The judge (toy teacher): its accuracy on the student's samples of held-out toy prompts at each validation
    read_with_judge = JudgeReadings(
        args.judge_prompts, accelerator, teacher, training_log, args.shift, args.num_validation_inference_steps,
        args.validation_guidance_scale, args.seed, logger.info,
    )  # fmt: skip
    if global_step == 0 and read_with_judge.active:  # the untrained student (and the teacher) as the starting point
        with times.phase("initial_validation"), sampling_weights(accelerator, student, ema) as unet:
            read_with_judge(unet, 0, with_teacher=True)

    # 9. Train: one DistillationStep per micro-batch; logging, checkpoints and validation at optimizer steps
    step = (ReflowStep if args.objective == "reflow" else DistillationStep)(
        accelerator, student, teacher_flow, student_hooks, teacher_hooks, block_penalty, objective, sigma_sampler,
        streams, optimizer, lr_scheduler, train_dataset.empty_prompt_embeds.to(accelerator.device),
        uncond_prob=args.uncond_prob, max_grad_norm=args.max_grad_norm, max_nonfinite_steps=args.max_nonfinite_steps,
    )  # fmt: skip
    progress_bar = tqdm(
        range(max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process
    )
    updates, first_step = 0, global_step  # optimizer steps taken in this process's run
    loop_start = time.perf_counter()
    for epoch in range(first_epoch, num_train_epochs):
        if global_step >= max_train_steps:
            break
        skip = resume_batches if epoch == first_epoch else 0
        dataloader = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        dataloader.set_epoch(epoch)
        train_sampler.set_epoch(epoch)
        for offset, batch in enumerate(dataloader):
            step(batch, epoch, skip + offset)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress_bar.update(1)
            if step.end_update(global_step):
                updates += 1
                if ema is not None:
                    ema.step(student.parameters())

            if global_step % args.logging_steps == 0 or global_step == max_train_steps:
                record = training_log.log(global_step, lr_scheduler.get_last_lr()[0], step)
                if record is not None:
                    speed = f"{record['samples_per_second']:.1f}"
                    progress_bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", sps=speed)

            if global_step % args.checkpointing_steps == 0:
                with times.phase("checkpoints"):
                    save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit)

            if global_step % args.validation_steps == 0 and global_step != max_train_steps:
                # every process: under FSDP the student's weights are gathered; the main process samples
                with times.phase("validation"), sampling_weights(accelerator, student, ema) as unet:
                    if accelerator.is_main_process:
                        log_validation(
                            accelerator, unet, teacher, args.validation_prompts, global_step, output_dir, args.shift,
                            args.resolution, args.num_validation_inference_steps, args.validation_guidance_scale,
                            args.seed,
                        )  # fmt: skip
                        read_with_judge(unet, global_step)
                accelerator.wait_for_everyone()
            if global_step >= max_train_steps:
                break

    # 10. Final validation, export, evaluation (toy teacher) and (optional) upload
    loop_seconds = time.perf_counter() - loop_start
    times.seconds["training"] = loop_seconds - sum(times.seconds.get(k, 0.0) for k in ("validation", "checkpoints"))
    progress_bar.close()
    student_hooks.remove()
    teacher_hooks.remove()
    accelerator.wait_for_everyone()
    if updates == 0 and global_step > first_step:
        raise TrainingFailed(
            f"No optimizer step was taken: all {global_step - first_step} steps had non-finite losses, so the "
            "student is untrained and nothing is exported. Check the teacher's weights for NaN/inf, or lower "
            "--learning_rate."
        )
    # every process: the student to sample and export (EMA weights in; under FSDP gathered onto the main process)
    with sampling_weights(accelerator, student, ema) as unet:
        if accelerator.is_main_process:
            with times.phase("final_validation"):
                log_validation(
                    accelerator, unet, teacher, args.validation_prompts, global_step, output_dir, args.shift,
                    args.resolution, args.num_validation_inference_steps, args.validation_guidance_scale, args.seed,
                    samples_for=None if args.no_single_file else SINGLE_FILE_NAME,
                )  # fmt: skip
                read_with_judge(unet, global_step)
            training_log.close()
            plot_training(read_metrics(output_dir / "metrics.jsonl"), output_dir)
            with times.phase("export"):
                unet = final_student(unet, lora=args.lora_rank is not None)
                summary = {k: getattr(args, k) for k in SUMMARY_FLAGS}
                summary.update(max_train_steps=max_train_steps, processes=accelerator.num_processes)
                pair_guidance = train_dataset.config["guidance"] if args.objective == "reflow" else None
                # the recommendation of the teacher's recipe (toy: measured; SD1.5: not), reflow's own for reflow
                sampling = recommended_sampling(args.pretrained_teacher_model, args.objective, pair_guidance)
                if args.objective == "reflow":
                    summary.update(objective="reflow", reflow_pair_guidance=pair_guidance)
                result = export_final(
                    output_dir, unet, teacher, args.shift, summary, args.hub_model_id,
                    single_file=not args.no_single_file, requested_args=requested, steps=global_step,
                    sampling=sampling,
                )  # fmt: skip
    if accelerator.is_main_process:
        logger.info(f"Saved the FlowLunePipeline to {result.pipeline_dir}")
        if args.eval_prompts:
            with times.phase("evaluation"):
                final_evaluation(args, result.pipeline_dir, output_dir)
        timings = times.as_dict()
        atomic_text(output_dir / "timings.json", json.dumps(timings, indent=2) + "\n")
        logger.info("Time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
        if args.push_to_hub:
            repo_id = push_to_hub(output_dir, args.hub_model_id, token=os.environ.get("HF_TOKEN"))
            logger.info(f"Uploaded {output_dir} to {repo_id}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return output_dir / PIPELINE_DIRNAME


def final_evaluation(args: argparse.Namespace, pipeline_dir: Path, output_dir: Path) -> dict:
    """The toy evaluation after training, through ``evaluate.py`` (beside this script): teacher DDIM and student
    Euler at ``--eval_steps`` and the validation guidance (a student reflowed on guided pairs: the teacher at the
    pairs' guidance, ``evaluate.py --teacher_guidance``), on ``--eval_prompts`` held-out toy prompts. Writes
    ``eval/eval.json``, ``grid.png``, ``chart.png`` and ``summary.md`` (the table, also printed); returns the report.
    """
    import importlib.util
    import time

    from flow_lune.atomic import atomic_text
    from flow_lune.evaluation.report import summary_table
    from flow_lune.toy import teacher_path

    script = Path(__file__).with_name("evaluate.py")
    if not script.is_file():
        raise ValueError(f"{script} is missing: the evaluation after training needs it; pass --eval_prompts 0.")
    spec = importlib.util.spec_from_file_location("flow_lune_evaluate", script)
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    eval_dir = output_dir / "eval"
    guidance = args.validation_guidance_scale
    teacher_guidance = None
    if args.objective == "reflow":  # both callers (after training, and a rerun of a finished run) get it from here
        from flow_lune.training.cli import guided_pairs
        from flow_lune.training.reflow_pairs import pairs_guidance

        pair_guidance = pairs_guidance(args.reflow_data)
        teacher_guidance = pair_guidance if guided_pairs(pair_guidance) else None
    argv = [
        "--student", str(pipeline_dir), "--teacher", str(teacher_path()), "--output_dir", str(eval_dir),
        "--steps", *map(str, args.eval_steps), "--guidance", str(guidance), "--num_prompts", str(args.eval_prompts),
        "--heldout_images", str(min(480, max(2 * args.eval_prompts, 96))), "--seed", str(args.seed),
    ]  # fmt: skip
    if teacher_guidance is not None:
        argv += ["--teacher_guidance", str(teacher_guidance)]
    logger.info(f"Evaluating: python evaluate.py {' '.join(argv)}")
    start = time.perf_counter()
    report = evaluate.main(evaluate.parse_args(argv))
    seconds = time.perf_counter() - start
    reference = report["reference"]
    table = summary_table(report["settings"], guidance, teacher_guidance)
    scales = f"guidance {guidance:g}" + ("" if teacher_guidance is None else f" (teacher {teacher_guidance:g})")
    text = (
        f"# Evaluation of {pipeline_dir}\n\n"
        f"{args.eval_prompts} held-out toy prompts, {scales}, seed {args.seed}; the reference is the "
        f"teacher's DDIM {report['reference_steps']} steps (same noise per prompt). Accuracy: the judge finds every "
        "attribute of the prompt. Toy FID: Frechet distance on the judge's features, against held-out real images "
        "and against the teacher's reference samples.\n\n"
        f"{table}\n"
        f"Held-out real images against train images: toy FID {reference['toy_fid_heldout_vs_train']:.2f}; the judge "
        f"on held-out real images: {100 * reference['judge_accuracy_heldout']['all']:.1f}%.\n\n"
        f"Evaluated in {seconds:.0f} s. Recompute with `python evaluate.py {' '.join(argv)}`.\n"
    )
    atomic_text(eval_dir / "summary.md", text)
    print(f"\nEvaluation (eval/summary.md), {scales}:\n{table}", flush=True)
    return report


if __name__ == "__main__":
    run_script(main, parse_args)
