#!/usr/bin/env python
"""Make reflow pairs (noise z, the ODE's end x0_hat, prompt embeddings, prompt) from a teacher or a student.

    python generate_reflow_pairs.py --model toy --output_dir pairs-toy --num_pairs 2048 --guidance 3
    python generate_reflow_pairs.py --model flow-lune-output/pipeline --output_dir pairs-student --guidance 3
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 generate_reflow_pairs.py ...   # shards split by process

``--model``: ``tiny`` (the embedded tiny SD1.5 teacher), ``toy`` (the shipped toy teacher), an epsilon SD1.5
pipeline folder (sampled through ``FlowLunePipeline.from_teacher``) or a ``FlowLunePipeline`` folder (a distilled
student). A killed run restarted with the same flags keeps its finished shards. The pair set is read by
``train_flow_distill.py --objective reflow --reflow_data DIR`` and, as a ``datasets.Dataset``, by
``flow_lune.training.reflow_pairs.load_pairs_dataset(DIR)``. Math and guidance choices: docs/reflow.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROMPT_SOURCES = ("synthetic", "toy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Flow Lune: reflow pairs from a teacher or a distilled student.")
    # ----------Model----------
    parser.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (default: the embedded tiny teacher, for trying things out), 'toy' (the shipped toy teacher), "
        "an epsilon SD1.5 pipeline folder, or a FlowLunePipeline folder (a distilled student).",
    )
    parser.add_argument("--cache_dir", default="~/.cache/flow_lune", help="Where the tiny teacher is built.")
    # ----------Prompts----------
    parser.add_argument("--prompts_file", default=None, help="One prompt per line (overrides --prompts).")
    parser.add_argument(
        "--prompts",
        default="synthetic",
        choices=PROMPT_SOURCES,
        help="synthetic: the trainer's built-in prompts; toy: the toy world's 48 captions.",
    )
    # ----------The ODE----------
    parser.add_argument("--num_pairs", type=int, default=1024, help="Rows of the pair set.")
    parser.add_argument(
        "--steps", type=int, default=64, help="Euler steps: many, so x0_hat is close to the ODE's exact end."
    )
    parser.add_argument(
        "--guidance",
        type=float,
        default=3.0,  # the toy teacher's best accuracy/FID trade-off (DESIGN.md section 9); SD1.5 users pass ~7.5
        help="CFG scale of the ODE. > 1: the reflowed student learns the guided flow and samples at cfg 1.",
    )
    parser.add_argument(
        "--shift",
        type=float,
        default=None,
        help="Shift of the step grid; default the student's own, or 3.0 (the trainer's default) for a teacher.",
    )
    parser.add_argument("--resolution", type=int, default=None, help="Image size; default the model's.")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the noise z of every row.")
    # ----------Output----------
    parser.add_argument("--output_dir", required=True, help="The pair set's folder (resumed when it exists).")
    parser.add_argument("--shard_size", type=int, default=256, help="Rows per shard: the unit of resumption.")
    parser.add_argument("--batch_size", type=int, default=16, help="Rows per pipeline call.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    args = parser.parse_args(argv)
    for name in ("num_pairs", "steps", "shard_size", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.guidance >= 1:
        parser.error(f"--guidance must be >= 1 (1 = no guidance), got {args.guidance}")
    if args.shift is not None and not args.shift > 0:
        parser.error(f"--shift must be > 0, got {args.shift}")
    if args.resolution is not None and (args.resolution <= 0 or args.resolution % 8):
        parser.error(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if args.prompts_file is not None and not Path(args.prompts_file).is_file():
        parser.error(f"--prompts_file {args.prompts_file!r}: no such file")
    if args.model not in ("tiny", "toy") and not (Path(args.model) / "model_index.json").is_file():
        parser.error(f"--model {args.model!r}: not 'tiny', 'toy' or a pipeline folder with model_index.json")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    return args


def load_sampler_pipeline(args: argparse.Namespace):
    """The FlowLunePipeline whose ODE makes the pairs, and whether it is a teacher or a student."""
    from flow_lune.pipelines import FlowLunePipeline
    from flow_lune.schedulers import FlowLuneScheduler
    from flow_lune.training.models import default_teacher_dir, load_teacher

    if args.model == "tiny":
        path = default_teacher_dir(args.cache_dir)
    elif args.model == "toy":
        from flow_lune.toy import teacher_path

        path = teacher_path()
    else:
        path = Path(args.model)
    name = json.loads((Path(path) / "model_index.json").read_text(encoding="utf-8")).get("_class_name")
    if name == "FlowLunePipeline":
        pipe = FlowLunePipeline.from_pretrained(str(path), local_files_only=True)
        if args.shift is not None:
            pipe.scheduler = FlowLuneScheduler(shift=args.shift)
        kind = "student"
    else:
        teacher = load_teacher(str(path), cache_dir=args.cache_dir)
        pipe = FlowLunePipeline.from_teacher(teacher, shift=3.0 if args.shift is None else args.shift)
        kind = "teacher"
    pipe.set_progress_bar_config(disable=True)
    return pipe, kind


def read_prompts(args: argparse.Namespace, num_pairs: int) -> list[str]:
    if args.prompts_file is not None:
        return [line.strip() for line in Path(args.prompts_file).read_text(encoding="utf-8").splitlines() if line]
    if args.prompts == "toy":
        from flow_lune.toy import ATTRIBUTE_COMBINATIONS, caption_for

        return [caption_for(*c) for c in ATTRIBUTE_COMBINATIONS]
    from flow_lune.training.prompts import SyntheticPrompts

    synthetic = SyntheticPrompts(seed=args.seed)
    return synthetic.generate(min(num_pairs, synthetic.num_combinations))


def main(args: argparse.Namespace) -> Path | None:
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from flow_lune.training.encoding import encode_prompts
    from flow_lune.training.reflow_pairs import PairSampler, PairsConfig, make_pair_set, unet_digest
    from flow_lune.training.sources import sha256_json

    # 1. Processes: under accelerate launch / torchrun each process writes its own shards
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # PartialState does not read it itself

    # 2. The model whose ODE makes the pairs, and the prompts
    pipe, kind = load_sampler_pipeline(args)
    pipe.to(state.device)
    prompts = read_prompts(args, args.num_pairs)
    resolution = args.resolution or int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
    config = PairsConfig(
        model=args.model, model_kind=kind, model_digest=unet_digest(pipe.unet), num_pairs=args.num_pairs,
        steps=args.steps, guidance=float(args.guidance), shift=float(pipe.scheduler.config.shift),
        resolution=resolution, seed=args.seed, shard_size=args.shard_size, batch_size=args.batch_size,
        prompts_sha256=sha256_json(prompts),
    )  # fmt: skip

    # 3. The shards this process owns, then the index
    index = make_pair_set(
        args.output_dir, config, PairSampler(pipe, config), prompts,
        lambda texts: encode_prompts(texts, pipe.text_encoder, pipe.tokenizer),
        process_index=state.process_index, num_processes=state.num_processes, wait=state.wait_for_everyone,
        show_progress=state.is_local_main_process,
    )  # fmt: skip
    if index is not None:
        print(f"wrote {index} ({config.num_pairs} pairs, guidance {config.guidance:g}, {config.steps} steps)")
    return index


if __name__ == "__main__":
    args = parse_args()
    try:
        main(args)
    except ValueError as err:
        print(f"generate_reflow_pairs.py: error: {err}", file=sys.stderr)
        sys.exit(2)
