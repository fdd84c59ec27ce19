#!/usr/bin/env python
"""Evaluate a Flow Lune student and/or an epsilon SD1.5 teacher over prompts, step counts and guidance scales.

Toy world (the default prompts, the shipped toy teacher and judge):

    python evaluate.py --student flow-lune-output/pipeline --output_dir eval-out

writes ``eval.json`` (per setting: the judge's accuracy overall and per attribute, toy FID against held-out
real images and against the teacher's DDIM samples, same-noise agreement with the teacher, images per
second; each toy FID against real images with its jackknife standard error, and each row's toy FID above the
teacher's reference with its error), ``grid.png`` (each prompt under its tile) and ``chart.png`` (quality
against steps, teacher and student on one chart); with ``--straightness``, each model's path straightness per
guidance (docs/reflow.md).
``--teacher_guidance G`` samples the teacher (its rows and the reference) at G only, and compares every student row
with that reference: for a reflowed student trained on pairs guided at G, which samples at ``--guidance 1``.
With ``--prompts_file`` (real SD1.5 models) it computes torchmetrics' CLIP score and,
with ``--reference_images``, its Inception FID instead of the judge's metrics.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

DEFAULT_STEPS = [1, 2, 4, 8, 25]  # accuracy saturates at many steps; the differences live at few
DEFAULT_GUIDANCE = [2.0, 3.0]  # the toy teacher reaches its best accuracy/FID trade-off here
DEFAULT_NUM_PROMPTS = 96  # the first 96 held-out captions: each of the 48 combinations twice
DEFAULT_HELDOUT = 480  # held-out real images for the toy FID reference (10 per combination)
DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # torchmetrics' default CLIP score model
FID_GROUPS = 10  # jackknife groups of the toy FID
# The jackknife errors need left-out sets of at least 4 times the judge's feature width (570 prompts for the toy
# judge's 128): below that the Frechet distance's small-sample bias moves with each group left out and the error
# overstates the spread between noise draws (docs/evaluation.md), so none is reported.
JACKKNIFE_PER_FEATURE = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate a Flow Lune student and/or its SD1.5 teacher.")
    g = parser.add_argument_group("models")
    g.add_argument("--student", default=None, help="a FlowLunePipeline folder or a Flow Lune .safetensors file")
    g.add_argument("--config", default=None, help="for a single-file student: a local pipeline folder with its configs")
    g.add_argument(
        "--teacher",
        default="toy",
        help="an SD1.5 pipeline folder; 'toy' (default) = the shipped toy teacher; 'none' to skip",
    )
    g.add_argument(
        "--teacher_samplers",
        nargs="+",
        default=["ddim"],
        choices=["ddim", "bridge"],
        help="ddim (default): diffusers' DDIM; bridge: the teacher via FlowLunePipeline.from_teacher, Euler",
    )
    g.add_argument(
        "--shift",
        type=float,
        default=None,
        help="sampling shift of the student (Euler) and the teacher bridge (default: the student's, else 1.0)",
    )
    g = parser.add_argument_group("settings")
    g.add_argument("--steps", type=int, nargs="+", default=DEFAULT_STEPS, help="sampling step counts")
    g.add_argument(
        "--guidance", type=float, nargs="+", default=DEFAULT_GUIDANCE, help="classifier-free guidance scales"
    )
    g.add_argument(
        "--teacher_guidance",
        type=float,
        default=None,
        help="the teacher's guidance, for its rows and the reference images (default: each --guidance); a student "
        "reflowed on pairs guided at G: --guidance 1 --teacher_guidance G",
    )
    g.add_argument(
        "--reference_steps",
        type=int,
        default=None,
        help="teacher DDIM steps of the reference images (default: the largest of --steps)",
    )
    g.add_argument("--num_prompts", type=int, default=DEFAULT_NUM_PROMPTS, help="toy prompts from the held-out split")
    g.add_argument(
        "--prompts_file", default=None, help="one prompt per line: real-model mode (CLIP score, Inception FID)"
    )
    g.add_argument("--seed", type=int, default=0, help="noise seed: image i starts from the same z for every model")
    g.add_argument("--batch_size", type=int, default=48, help="images per pipeline call")
    g = parser.add_argument_group("metrics")
    g.add_argument("--judge", default="toy", help="judge folder; 'toy' (default) = the shipped judge")
    g.add_argument("--heldout_images", type=int, default=DEFAULT_HELDOUT, help="held-out real images for the toy FID")
    g.add_argument("--reference_images", default=None, help="real mode: a folder of reference images for Inception FID")
    g.add_argument(
        "--clip_model", default=DEFAULT_CLIP, help="real mode: CLIP model id or local folder; 'none' to skip"
    )
    g.add_argument(
        "--fid_feature", type=int, default=2048, choices=[64, 192, 768, 2048], help="real mode: Inception feature layer"
    )
    g.add_argument(
        "--straightness",
        action="store_true",
        help="also report each model's path straightness (teacher through the bridge, student Euler) per guidance",
    )
    g.add_argument(
        "--straightness_steps",
        type=int,
        default=32,  # many steps: the path itself, not the step error, is what is measured
        help="Euler steps of the trajectories whose straightness is measured",
    )
    g.add_argument(
        "--straightness_prompts",
        type=int,
        default=48,  # each toy combination once: enough for a mean, cheap next to the quality settings
        help="prompts (the first N of the evaluation prompts) of the straightness trajectories",
    )
    g = parser.add_argument_group("output")
    g.add_argument("--output_dir", required=True, help="where eval.json, grid.png and chart.png go")
    g.add_argument("--grid_columns", type=int, default=8, help="prompts shown in the grid")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    g.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    for name in ("num_prompts", "batch_size", "heldout_images", "grid_columns", "straightness_steps",
                 "straightness_prompts"):  # fmt: skip
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.num_prompts < 2:
        parser.error(
            f"--num_prompts must be >= 2 (FID and the different-noise floor need two images), got {args.num_prompts}"
        )
    if any(s < 1 for s in args.steps):
        parser.error(f"--steps must all be >= 1, got {args.steps}")
    if any(g < 1.0 for g in args.guidance):
        parser.error(f"--guidance scales must be >= 1 (1 disables guidance), got {args.guidance}")
    if args.teacher_guidance is not None and args.teacher_guidance < 1.0:
        parser.error(f"--teacher_guidance must be >= 1 (1 disables guidance), got {args.teacher_guidance}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.student is None and args.teacher == "none":
        parser.error("nothing to evaluate: give --student, or a --teacher other than 'none'")
    if args.student is not None and not Path(args.student).exists():
        parser.error(f"--student {args.student!r}: no such file or folder")
    if args.student is not None and Path(args.student).is_file() and args.config is None:
        parser.error("--student is a single file: pass --config, a local pipeline folder with its configs")
    if args.teacher not in ("toy", "none") and not Path(args.teacher).is_dir():
        parser.error(f"--teacher {args.teacher!r}: no such folder (pass an SD1.5 pipeline folder, 'toy' or 'none')")
    if args.prompts_file is not None and not Path(args.prompts_file).is_file():
        parser.error(f"--prompts_file {args.prompts_file!r}: no such file")
    if args.reference_images is not None and not Path(args.reference_images).is_dir():
        parser.error(f"--reference_images {args.reference_images!r}: no such folder")
    if args.prompts_file is None and args.reference_images is not None:
        parser.error("--reference_images is for real-model mode: pass --prompts_file too")
    if args.reference_steps is not None and args.reference_steps < 1:
        parser.error(f"--reference_steps must be >= 1, got {args.reference_steps}")
    return args


def read_prompts(path: str) -> list[str]:
    prompts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts_file {path!r} holds no prompts.")
    return prompts


def read_images(folder: str, size: int) -> torch.Tensor:
    """Every image in ``folder`` (png, jpg, webp), centre-cropped and resized to ``size``, in [0, 1]."""
    import numpy as np
    from PIL import Image, ImageOps

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if len(files) < 2:
        raise ValueError(f"--reference_images {folder!r} holds {len(files)} images; FID needs at least 2.")
    out = []
    for p in files:
        image = ImageOps.fit(Image.open(p).convert("RGB"), (size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out)


def main(args: argparse.Namespace) -> dict:
    from tqdm.auto import tqdm

    from flow_lune.evaluation import (
        GroupedFID,
        clip_score,
        fixed_noise,
        inception_fid,
        jackknife_se,
        judge_accuracy,
        load_pipeline,
        make_runner,
        same_noise_agreement,
        sample_all,
        toy_fid,
        write_chart,
        write_grid,
        write_json,
    )
    from flow_lune.evaluation.sampling import is_flow_pipeline

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # 1. Prompts and mode.
    toy = args.prompts_file is None
    if toy:
        from flow_lune.toy import heldout_prompts

        prompts = heldout_prompts(args.num_prompts)
    else:
        prompts = read_prompts(args.prompts_file)

    # 2. Models and their runners (the teacher's reference sampler first).
    runners = []
    teacher = None
    if args.teacher != "none":
        from flow_lune.toy import teacher_path

        teacher = load_pipeline(teacher_path() if args.teacher == "toy" else args.teacher)
        if is_flow_pipeline(teacher):
            raise ValueError(f"--teacher {args.teacher!r} is a FlowLunePipeline; pass it as --student.")
    student = load_pipeline(args.student, args.config) if args.student is not None else None
    if student is not None and not is_flow_pipeline(student):
        raise ValueError(f"--student {args.student!r} is an epsilon SD1.5 pipeline; pass it as --teacher.")
    # the teacher bridge's sampling shift: --shift, else the student's, else 1.0 (also its straightness paths')
    bridge_shift = (
        args.shift if args.shift is not None else (student.scheduler.config.shift if student is not None else 1.0)
    )
    if teacher is not None:
        runners += [make_runner("teacher", teacher, s, shift=bridge_shift) for s in args.teacher_samplers]
    if student is not None:
        runners.append(make_runner("student", student, "euler", shift=args.shift))
    unet = runners[0].pipe.unet
    sample_size = unet.config.sample_size
    noise = fixed_noise(len(prompts), (unet.config.in_channels, sample_size, sample_size), args.seed)
    reference_steps = args.reference_steps or max(args.steps)

    # 3. Metric references.
    judge = real = None
    report: dict = {"prompts": prompts, "seed": args.seed, "mode": "toy" if toy else "real", "reference": {}}
    if toy:
        from flow_lune.toy import judge_path, toy_arrays
        from flow_lune.toy.judge import JudgeFeatures, load_judge

        judge = load_judge(judge_path() if args.judge == "toy" else args.judge)
        heldout = toy_arrays("heldout", args.heldout_images, seed=0)
        real = heldout.images.float() / 255.0
        kept = min(len(prompts), len(real)) * (FID_GROUPS - 1) // FID_GROUPS
        groups = FID_GROUPS if kept >= JACKKNIFE_PER_FEATURE * judge.config["feature_dim"] else 1
        fid = GroupedFID(JudgeFeatures(judge), real, groups)
        report["reference"]["toy_fid_groups"] = groups
        train_real = toy_arrays("train", args.heldout_images, seed=0).images.float() / 255.0
        # against the real features GroupedFID already holds: one pass over the held-out images, not two
        report["reference"]["toy_fid_heldout_vs_train"] = fid.score(fid.states(train_real))[0]
        report["reference"]["judge_accuracy_heldout"] = judge_accuracy(judge, real, heldout.captions)
    elif args.reference_images is not None:
        real = read_images(args.reference_images, sample_size * 8)

    # 4. Sample every setting; the teacher's DDIM reference images first. The teacher samples at
    #    --teacher_guidance when it is given, and every student row is then compared with that reference.
    teacher_scales = teacher_guidance_scales(args)

    def scales_of(runner) -> list[float]:
        return teacher_scales if runner.name == "teacher" else args.guidance

    settings = [
        (r, g, s) for g in dict.fromkeys([*args.guidance, *teacher_scales]) for r in runners if g in scales_of(r)
        for s in args.steps
    ]  # fmt: skip
    ref_runner = next((r for r in runners if r.name == "teacher" and r.sampler == "ddim"), None)
    if ref_runner is not None and reference_steps not in args.steps:  # the reference is a row too, scored alike
        settings = [(ref_runner, g, reference_steps) for g in teacher_scales] + settings
    bar = tqdm(
        total=len(prompts) * len(settings), unit="img", desc="sampling", disable=args.no_progress, file=sys.stderr
    )
    references: dict[float, torch.Tensor] = {}
    reference_fids: dict[float, tuple] = {}  # the reference's GroupedFID scores, per guidance
    results, grid_rows = [], []
    for runner, g, steps in settings:
        bar.set_postfix_str(f"{runner.label} {steps} steps g={g:g}")
        images, ips = sample_all(runner, prompts, noise, steps, g, args.batch_size, bar.update)
        if runner is ref_runner and steps == reference_steps:
            references[g] = images
        row = {"model": runner.name, "sampler": runner.sampler, "steps": steps, "guidance": g, "images_per_second": ips}
        if runner.sampler != "ddim":
            row["shift"] = runner.pipe.scheduler.config.shift
        if toy:
            acc = judge_accuracy(judge, images, prompts)
            row.update({"accuracy": acc["all"], "accuracy_per_attribute": {k: v for k, v in acc.items() if k != "all"}})
            row["_fid"] = fid.score(fid.states(images))
            row["toy_fid_real"] = row["_fid"][0]
            if groups > 1:
                row["toy_fid_real_se"] = jackknife_se(row["_fid"][1])
            if runner is ref_runner and steps == reference_steps:
                reference_fids[g] = row["_fid"]
        else:
            if args.clip_model != "none":
                row["clip_score"] = clip_score(images, prompts, args.clip_model)
            if real is not None:
                row["inception_fid"] = inception_fid(real, images, args.fid_feature)
        row["_images"] = images
        results.append(row)
        if g == scales_of(runner)[0]:
            grid_rows.append((f"{runner.label} {steps} steps g={g:g}", images[: args.grid_columns]))
    bar.close()

    # 5. Comparisons with the teacher's reference images (same guidance, or --teacher_guidance's).
    for row in results:
        images, scores = row.pop("_images"), row.pop("_fid", None)
        ref_guidance = row["guidance"] if args.teacher_guidance is None else args.teacher_guidance
        ref = references.get(ref_guidance)
        if ref is None:
            continue
        row["reference"] = f"teacher ddim {reference_steps} steps g={ref_guidance:g}"
        if row["model"] == "teacher" and row["sampler"] == "ddim" and row["steps"] == reference_steps:
            row["is_reference"] = True  # compared with itself: no agreement or FID to report
            continue
        row.update(same_noise_agreement(images, ref, prompts))
        if toy:
            row["toy_fid_teacher"] = toy_fid(judge, ref, images)
            above, se = GroupedFID.ratio(scores, reference_fids[ref_guidance])
            row["toy_fid_real_vs_reference"] = above
            if se is not None:
                row["toy_fid_real_vs_reference_se"] = se

    # 6. Straightness of each model's many-step path (flow coordinates: the teacher through the bridge).
    if args.straightness:
        report["straightness"] = straightness_rows(args, prompts, noise, teacher, bridge_shift, runners)

    # 7. Report.
    report["settings"] = results
    report["reference_steps"] = reference_steps
    write_json(out_dir / "eval.json", report)
    write_grid(out_dir / "grid.png", grid_rows, prompts, columns=args.grid_columns)
    metrics = (
        ["accuracy", "toy_fid_real", "same_noise_psnr"] if toy else ["clip_score", "inception_fid", "same_noise_psnr"]
    )
    write_chart(out_dir / "chart.png", results, metrics)
    print_table(results, toy)
    print(f"wrote {out_dir / 'eval.json'}, {out_dir / 'grid.png'}, {out_dir / 'chart.png'}")
    return report


def teacher_guidance_scales(args: argparse.Namespace) -> list[float]:
    """The teacher's guidance scales: ``--teacher_guidance`` alone when given, else every ``--guidance``."""
    return list(args.guidance) if args.teacher_guidance is None else [args.teacher_guidance]


def straightness_rows(args: argparse.Namespace, prompts, noise, teacher, bridge_shift: float, runners) -> list[dict]:
    """Mean and spread of ``flow_lune.evaluation.straightness`` per model and guidance; printed too. The teacher's
    paths are its bridge's at ``bridge_shift`` (flow states, like the student's), whatever its samplers were."""
    from flow_lune.evaluation import make_runner, straightness_summary

    pipes = []
    if teacher is not None:
        pipes.append(("teacher", "bridge", make_runner("teacher", teacher, "bridge", shift=bridge_shift).pipe))
    pipes += [("student", "euler", r.pipe) for r in runners if r.name == "student"]
    n = min(args.straightness_prompts, len(prompts))
    rows = []
    for name, sampler, pipe in pipes:
        for g in teacher_guidance_scales(args) if name == "teacher" else args.guidance:
            summary = straightness_summary(pipe, noise[:n], args.straightness_steps, g, prompts[:n], args.batch_size)
            rows.append({
                "model": name, "sampler": sampler, "guidance": g, "steps": args.straightness_steps, "prompts": n,
                "straightness": summary["mean"], "straightness_std": summary["std"],
            })  # fmt: skip
            print(f"straightness {name} {sampler} g={g:g} ({args.straightness_steps} steps, {n} prompts): "
                  f"{rows[-1]['straightness']:.5f} +- {rows[-1]['straightness_std']:.5f}")  # fmt: skip
    return rows


def print_table(results: list[dict], toy: bool) -> None:
    """One line per setting; in the toy world the toy FID's standard error and the row's toy FID above the
    reference (``+- se``) too."""
    from flow_lune.evaluation.report import above_reference

    toy_cols = ["accuracy", "toy_fid_real", "toy_fid_real_se", "toy_fid_teacher"]
    cols = toy_cols if toy else ["clip_score", "inception_fid"]
    cols += ["same_noise_psnr", "different_noise_psnr", "images_per_second"]
    header = f"{'model':<18}{'steps':>6}{'g':>6}" + "".join(f"{c:>22}" for c in cols)
    print(header + (f"{'toy_fid_vs_reference':>22}" if toy else ""))
    for r in results:
        cells = "".join(f"{r[c]:>22.4f}" if r.get(c) is not None else f"{'-':>22}" for c in cols)
        if toy:
            cells += f"{above_reference(r):>22}"
        print(f"{r['model'] + ' ' + r['sampler']:<18}{r['steps']:>6}{r['guidance']:>6g}" + cells)


if __name__ == "__main__":
    args = parse_args()
    start = time.perf_counter()
    try:
        main(args)
    except ValueError as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"done in {time.perf_counter() - start:.0f} s")
