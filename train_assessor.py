#!/usr/bin/env python
"""Train the Flow Lune assessor ("David") on a teacher's per-block features (DESIGN.md section 6).

    accelerate launch train_assessor.py --pretrained_teacher_model PATH --output_dir assessor

The assessor sees the teacher's pooled block features at flow states built exactly as the trainer builds
them (same data sources, same sigma sampling, same teacher query) and learns, per block: the sigma bin
(timestep head, 100 bins), the feature pattern (k-means clusters of the teacher's features, fixed before
training), and an embedding in which two views of one sample (nearby sigma, partly fresh noise) agree and
other samples disagree (InfoNCE). It writes ``config.json``, ``model.safetensors``, ``profile.json`` and
``profile.png`` into ``--output_dir``; pass that folder to ``train_flow_distill.py --assessor``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# Only torch-free modules here: --help and argument errors return before torch, diffusers or accelerate load.
from flow_lune.settings import (
    ASSESSOR_EMBED_DIM,
    ASSESSOR_HIDDEN_DIM,
    ASSESSOR_NUM_BINS,
    ASSESSOR_NUM_PATTERNS,
    INFONCE_TEMPERATURE,
    TIMESTEP_LABEL_WIDTH,
    VIEW_NOISE_MIX,
    VIEW_SIGMA_JITTER,
)
from flow_lune.training.cli import (
    add_data_arguments,
    add_sigma_arguments,
    add_teacher_arguments,
    check_shared_arguments,
    quiet_third_party,
    run_script,
    start_run,
)

logger = None  # accelerate's logger, made in main() once accelerate is imported


def parse_args(input_args: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train the Flow Lune assessor on a teacher's block features.",
        usage="%(prog)s [-h] [--output_dir DIR] [--pretrained_teacher_model ID_OR_PATH] [options]",  # short: errors
    )

    # ----------Model, data and sigmas: the trainer's flags (training/cli.py)----------
    add_teacher_arguments(parser)
    add_data_arguments(parser)
    add_sigma_arguments(parser)

    # ----------Assessor----------
    parser.add_argument("--embed_dim", type=int, default=ASSESSOR_EMBED_DIM, help="Size of each block's embedding.")
    parser.add_argument("--hidden_dim", type=int, default=ASSESSOR_HIDDEN_DIM, help="Hidden width of each companion.")
    parser.add_argument("--num_bins", type=int, default=ASSESSOR_NUM_BINS, help="Sigma bins of the timestep head.")
    parser.add_argument(
        "--num_patterns", type=int, default=ASSESSOR_NUM_PATTERNS, help="Patterns (k-means clusters) per block."
    )
    parser.add_argument(
        "--cluster_samples", type=int, default=1024, help="Teacher states for feature statistics and k-means."
    )
    parser.add_argument("--temperature", type=float, default=INFONCE_TEMPERATURE, help="InfoNCE temperature.")
    parser.add_argument(
        "--view_sigma_jitter",
        type=float,
        default=VIEW_SIGMA_JITTER,
        help="Second view: sigma + jitter * N(0,1).",
    )
    parser.add_argument(
        "--view_noise_mix",
        type=float,
        default=VIEW_NOISE_MIX,
        help="Second view: share of fresh noise.",
    )
    parser.add_argument(
        "--timestep_label_width",
        type=float,
        default=TIMESTEP_LABEL_WIDTH,
        help="Soft bin targets' std, in bins.",
    )
    parser.add_argument(
        "--profile_samples", type=int, default=2500, help="Teacher states for the profile, spread evenly over bins."
    )
    parser.add_argument("--profile_batch_size", type=int, default=50, help="Teacher batch while profiling.")

    # ----------Training----------
    parser.add_argument("--output_dir", type=str, default="flow-lune-assessor", help="Where the assessor goes.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of everything (data order, sigmas, noise).")
    parser.add_argument("--train_batch_size", type=int, default=16, help="Samples per device (>= 2: contrastive).")
    parser.add_argument("--max_train_steps", type=int, default=2000, help="Optimizer steps.")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="AdamW learning rate.")
    parser.add_argument("--adam_weight_decay", type=float, default=1e-4, help="AdamW weight decay.")
    parser.add_argument("--lr_scheduler", type=str, default="cosine", help="diffusers get_scheduler name.")
    parser.add_argument("--lr_warmup_steps", type=int, default=50, help="Warmup steps.")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"], help="Teacher.")
    parser.add_argument("--report_to", type=str, default="tensorboard", help="Trackers ('all', 'none', ...).")
    parser.add_argument("--logging_dir", type=str, default="logs", help="Under output_dir.")
    parser.add_argument("--logging_steps", type=int, default=10, help="Log every N steps.")

    args = parser.parse_args(input_args)
    try:
        check_args(args)
    except ValueError as err:
        parser.error(str(err))  # one "error: ..." line, exit 2
    return args


def check_args(args: argparse.Namespace) -> None:
    """One clear ValueError for out-of-range flags or a taken --output_dir, before any work (no torch import)."""
    if args.train_batch_size < 2:
        raise ValueError(f"--train_batch_size must be >= 2 (in-batch negatives), got {args.train_batch_size}.")
    if args.max_train_steps < 1:
        raise ValueError(f"--max_train_steps must be >= 1, got {args.max_train_steps}.")
    if args.num_patterns < 2 or args.num_bins < 2:
        raise ValueError(f"--num_patterns and --num_bins must be >= 2, got {args.num_patterns}, {args.num_bins}.")
    if args.cluster_samples < max(args.num_patterns, 2):
        raise ValueError(
            f"--cluster_samples must be >= --num_patterns ({args.num_patterns}), got {args.cluster_samples}."
        )
    if args.profile_batch_size < 1:
        raise ValueError(f"--profile_batch_size must be >= 1, got {args.profile_batch_size}.")
    if args.profile_samples < args.num_bins:
        raise ValueError(f"--profile_samples must be >= --num_bins ({args.num_bins}), got {args.profile_samples}.")
    check_shared_arguments(args)
    out = Path(args.output_dir)
    taken = [n for n in ("config.json", "model.safetensors", "profile.json", "profile.png") if (out / n).exists()]
    if taken:
        raise ValueError(f"--output_dir {out} already holds {taken}; choose a new folder (nothing is overwritten).")


def main(args: argparse.Namespace) -> None:
    print(f"Flow Lune assessor: training into {args.output_dir}; loading libraries and the teacher...", flush=True)
    quiet_third_party()
    global logger
    import torch
    from accelerate.logging import get_logger
    from diffusers.optimization import get_scheduler

    from flow_lune.flow import SigmaSampler
    from flow_lune.training.assessor import Assessor, AssessorConfig
    from flow_lune.training.assessor_loop import (
        AssessorStep,
        pooled_teacher_features,
        profile_assessor,
        train_assessor_steps,
    )
    from flow_lune.training.assessor_training import (
        AssessorTrainingConfig,
        TeacherBlockFeatures,
        initialise_from_features,
    )
    from flow_lune.training.block_features import BLOCK_NAMES, block_channels
    from flow_lune.training.data import DataConfig, collate, prepare_training_data
    from flow_lune.training.models import load_teacher_from_args, teacher_resolution
    from flow_lune.training.profile import save_profile

    logger = get_logger(__name__)

    # 1. Accelerator, logging, seed, output folder
    output_dir = Path(args.output_dir)
    accelerator = start_run(args)

    # 2. Teacher (frozen, never prepared), in the mixed-precision dtype like the trainer's
    #    (the same teacher_id as train_flow_distill.py, so the two scripts share the data caches)
    teacher, teacher_id = load_teacher_from_args(args, accelerator)
    if args.resolution is None:
        args.resolution = teacher_resolution(teacher)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    teacher.unet.to(accelerator.device, dtype=weight_dtype)
    teacher.text_encoder.to(accelerator.device)
    teacher.vae.to(accelerator.device)

    # 3. Data: the trainer's sources and caches; the teacher's features, sigma sampler and loss settings
    data_config = DataConfig.from_args(args)
    data_config.teacher_id = teacher_id
    dataset = prepare_training_data(data_config, teacher, accelerator)
    empty_embeds = dataset.empty_prompt_embeds
    loader_gen = torch.Generator().manual_seed(args.seed)
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        generator=loader_gen,
        collate_fn=collate,
        drop_last=len(dataset) >= args.train_batch_size,
        num_workers=args.dataloader_num_workers,
    )
    features = TeacherBlockFeatures(teacher.unet, teacher.scheduler_config)
    sampler = SigmaSampler(args.weighting_scheme, args.shift, args.logit_mean, args.logit_std, args.mode_scale)
    training_config = AssessorTrainingConfig(
        temperature=args.temperature,
        view_sigma_jitter=args.view_sigma_jitter,
        view_noise_mix=args.view_noise_mix,
        timestep_label_width=args.timestep_label_width,
    )

    # 4. The assessor, sized from the teacher's block channels
    config = AssessorConfig(
        block_channels=block_channels(teacher.unet),
        block_names=list(BLOCK_NAMES),
        embed_dim=args.embed_dim,
        hidden_dim=args.hidden_dim,
        num_bins=args.num_bins,
        num_patterns=args.num_patterns,
    )
    assessor = Assessor(config).to(accelerator.device)
    logger.info(f"Assessor: {assessor.num_parameters() / 1e6:.2f}M parameters over {config.num_blocks} blocks.")

    # 5. Feature statistics and k-means patterns: the same seeded states on every process, so no communication
    pooled = pooled_teacher_features(
        features,
        dataset,
        sampler,
        args.cluster_samples,
        args.train_batch_size,
        torch.Generator().manual_seed(args.seed + 1),
        args.uncond_prob,
        empty_embeds,
        accelerator.device,
        show_progress=accelerator.is_local_main_process,
    )
    initialise_from_features(assessor, pooled, seed=args.seed)

    # 6. Optimizer, scheduler, prepare
    optimizer = torch.optim.AdamW(assessor.parameters(), lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(assessor, optimizer, dataloader, lr_scheduler)
    if accelerator.is_main_process:
        accelerator.init_trackers("flow-lune-assessor", config={k: v for k, v in vars(args).items() if v is not None})

    # 7. Train: one AssessorStep per batch, logged every --logging_steps
    assessor_step = AssessorStep(
        accelerator=accelerator,
        assessor=assessor,
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        features=features,
        sampler=sampler,
        training_config=training_config,
        empty_embeds=empty_embeds,
        uncond_prob=args.uncond_prob,
        generator=torch.Generator().manual_seed(args.seed + 1000 * (accelerator.process_index + 1)),
    )
    step = train_assessor_steps(
        assessor_step,
        dataloader,
        args.max_train_steps,
        args.logging_steps,
        show_progress=accelerator.is_local_main_process,
    )
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        # 8. Profile (main process): evenly many states per sigma bin
        assessor = accelerator.unwrap_model(model).eval()
        profile = profile_assessor(
            assessor,
            features,
            dataset,
            args.profile_samples,
            args.profile_batch_size,
            torch.Generator().manual_seed(args.seed + 2),
            args.uncond_prob,
            empty_embeds,
            accelerator.device,
        )

        # 9. Save: config.json, model.safetensors, profile.json, profile.png
        assessor.save_pretrained(output_dir)
        save_profile(profile, output_dir)
        mean_acc = sum(map(sum, profile.timestep_accuracy)) / (config.num_blocks * config.num_bins)
        logger.info(f"Saved the assessor to {output_dir} (mean timestep accuracy {mean_acc:.3f}).")
        accelerator.log({"profile_timestep_accuracy": mean_acc}, step=step)
    accelerator.end_training()


if __name__ == "__main__":
    run_script(main, parse_args)
