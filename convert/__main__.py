"""``flow-lune-convert`` / ``python -m flow_lune.convert``: to-single-file, to-diffusers, inspect."""

from __future__ import annotations

import argparse
import os
import sys

from flow_lune.settings import SD15_SAMPLING

from .errors import ConversionError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flow-lune-convert",
        description="Convert Flow Lune models between diffusers and the ComfyUI/A1111 single-file layout, "
        "with every key accounted for.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    # ---- to-single-file
    p = sub.add_parser("to-single-file", help="diffusers folder / UNet / checkpoint -> original-layout .safetensors")
    p.add_argument(
        "src", help="diffusers pipeline folder, UNet folder or file, checkpoint-N folder, or earlier-trainer .pt"
    )
    p.add_argument("dst", help="output .safetensors (or .ckpt with --allow-pickle)")
    p.add_argument(
        "--base", help="pipeline folder or single file to take the VAE and text encoder from (UNet-only SRC)"
    )
    p.add_argument("--config", help="local diffusers folder with the UNet config, for SRC without one")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="cast floating tensors (default: keep)")
    p.add_argument("--ema", choices=["use", "drop"], help="what to do with EMA weights (unet_ema/, model_ema.*)")
    p.add_argument(
        "--shift",
        type=float,
        help="sigma shift of the flow student (default: SRC scheduler's, else 3.0). Given explicitly it also "
        "declares SRC's UNet a Flow Lune student: needed when SRC's scheduler is an epsilon/v-prediction teacher "
        "scheduler (PNDM, DDIM, ... with beta_schedule), which is otherwise refused so that a teacher is never "
        "labelled prediction_type 'flow'",
    )
    p.add_argument(
        "--prediction-type",
        choices=["flow", "epsilon"],
        help="what DST declares in modelspec.prediction_type (default flow: a Flow Lune student). 'epsilon' writes a "
        "plain SD1.5 file, e.g. a teacher for train_flow_distill.py --pretrained_teacher_model: no flow_lune.shift "
        "or other flow keys, and DST.workflow.json is a plain ComfyUI graph (loader -> KSampler euler/normal, no "
        "ModelSamplingSD3). Allowed when SRC's scheduler predicts epsilon, or SRC has no scheduler (UNet folder or "
        "file); refused for a flow or v-prediction scheduler, a training checkpoint, and with --shift",
    )
    p.add_argument(
        "--cfg",
        type=float,
        help="guidance scale for the header and workflow (default: what SRC recommends, in a pipeline folder's "
        f"model card or a UNet file's header, else {SD15_SAMPLING.guidance_scale:g}, SD1.5's unmeasured default; "
        "7.5 for epsilon)",
    )
    p.add_argument(
        "--steps",
        type=int,
        help="Euler steps for the header and workflow (default: what SRC recommends, else "
        f"{SD15_SAMPLING.steps}, SD1.5's unmeasured default)",
    )
    p.add_argument("--title", help="modelspec.title (default: DST's name)")
    p.add_argument(
        "--no-workflow",
        action="store_true",
        help="do not write the ComfyUI workflows DST.workflow.json (API format) and DST.workflow-editor.json",
    )
    p.add_argument("--no-source-hash", action="store_true", help="skip the sha256 of the source files")
    _common(p)

    # ---- to-diffusers
    p = sub.add_parser("to-diffusers", help="original-layout single file (full or UNet-only) -> diffusers folder")
    p.add_argument("src", help="SD1.5 original-layout .safetensors")
    p.add_argument("dst", help="output folder")
    p.add_argument(
        "--config", help="local diffusers folder to take configs (and tokenizer) from; default built-in SD1.5"
    )
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="cast floating tensors (default: keep)")
    p.add_argument("--ema", choices=["use", "drop"], help="what to do with model_ema.* keys")
    p.add_argument(
        "--shift",
        type=float,
        help="write a FlowLunePipeline with FlowLuneScheduler(shift) even without the file's Flow Lune header "
        "(default: a file with modelspec.prediction_type 'flow' / flow_lune.shift gives a FlowLunePipeline with "
        "its shift, any other a StableDiffusionPipeline)",
    )
    _common(p)

    # ---- inspect
    p = sub.add_parser("inspect", help="say what a file or folder is")
    p.add_argument("path", help="file or folder")
    p.add_argument("--reference", help="a model to compare the UNet with (e.g. the SD1.5 teacher)")
    p.add_argument("--config", help="local diffusers folder with the UNet config (for LDM files not SD1.5-sized)")
    p.add_argument("--allow-pickle", action="store_true", help="look inside a pickle named .safetensors")
    p.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--allow-pickle", action="store_true", help="read pickles named .safetensors / write a .ckpt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(argv: list[str] | None = None) -> int:
    """Run the command; a ConversionError is printed without a traceback and gives exit status 2."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the converter never downloads
    try:
        if args.command == "to-single-file":
            from .to_single_file import convert_to_single_file

            result = convert_to_single_file(
                args.src,
                args.dst,
                base=args.base,
                config=args.config,
                dtype=args.dtype,
                ema=args.ema,
                shift=args.shift,
                prediction_type=args.prediction_type,
                cfg=args.cfg,
                steps=args.steps,
                title=args.title,
                overwrite=args.overwrite,
                allow_pickle=args.allow_pickle,
                write_workflow=not args.no_workflow,
                source_hash=not args.no_source_hash,
                progress=not args.no_progress,
            )
            print(result.summary())
        elif args.command == "to-diffusers":
            from .to_diffusers import convert_to_diffusers

            result = convert_to_diffusers(
                args.src,
                args.dst,
                config=args.config,
                dtype=args.dtype,
                ema=args.ema,
                shift=args.shift,
                overwrite=args.overwrite,
                allow_pickle=args.allow_pickle,
                progress=not args.no_progress,
            )
            print(result.summary())
        else:
            from .inspect_model import inspect_path, report_json

            report = inspect_path(
                args.path, reference=args.reference, config=args.config, allow_pickle=args.allow_pickle
            )
            print(report_json(report) if args.json else report.format())
    except ConversionError as err:
        print(f"flow-lune-convert: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
