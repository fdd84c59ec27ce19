#!/usr/bin/env python
"""Does reflow make few-step sampling better? Teacher (DDIM), distilled and reflowed student on the toy world.

    python experiments/reflow.py --output_dir reflow-study            # the full experiment (toy teacher)
    python experiments/reflow.py --output_dir reflow-quick --quick    # tiny teacher, a few steps (tests)

Stages, each skipped when its output is complete (a killed experiment restarted redoes nothing finished):

1. **distilled**: ``train_flow_distill.py`` with the default job's recipe (toy teacher: 500 steps, batch 32),
   seed 0, on the toy training images. ``--distilled DIR`` uses an existing FlowLunePipeline folder instead.
2. **pairs**: ``generate_reflow_pairs.py`` at the evaluation's guidance (the reflowed student learns the guided
   flow and samples at cfg 1, docs/reflow.md), from the teacher's exact ODE through the bridge (default,
   ``--pairs_from teacher``) or from the distilled student's (``--pairs_from distilled``).
3. **reflow**: ``train_flow_distill.py --objective reflow`` from the distilled student, one run per seed.
4. **evaluation**: every model from the same prompts and the same noise (``flow_lune.ablation.checkpoint_eval``):
   the teacher with DDIM, the distilled student with Euler at the same guidance, the reflowed students with
   Euler at cfg 1, at each step count; the reference is the teacher's DDIM at ``--reference_steps``. Plus
   each model's path straightness (``flow_lune.evaluation.straightness``).
5. **report**: ``report/report.md`` (tables, the goals of issue 11 checked), ``results.json`` (every number,
   the command, the commit) and ``quality.png`` (accuracy and toy FID against steps).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # train_flow_distill.py and generate_reflow_pairs.py live here

FULL = dict(
    teacher="toy",
    judge="toy",
    train_images=4800,  # the default job's toy training split
    distill_steps=500,  # the default job's recipe (flow_lune.settings.TOY_RECIPE)
    num_pairs=2048,  # ~43 per attribute combination
    pair_steps=32,  # Euler steps of the pairs' ODE: the teacher's through the bridge at 32 has DDIM 25's quality
    reflow_steps=1000,
    reflow_batch_size=32,
    reflow_learning_rate=1e-4,  # half the distillation's: a fine-tune of a trained student
    seeds=3,  # reflow runs (the distilled student and the pairs are one, seed 0)
    euler_steps=[1, 2, 4, 8, 25],
    num_prompts=96,  # each of the 48 attribute combinations twice
    heldout_images=480,
    reference_steps=25,
    straightness_steps=32,  # evaluate.py's default
    straightness_prompts=48,
)
QUICK = dict(
    teacher="tiny",
    judge="tiny",
    train_images=16,
    distill_steps=2,
    num_pairs=8,
    pair_steps=2,
    reflow_steps=2,
    reflow_batch_size=2,
    reflow_learning_rate=1e-4,
    seeds=2,
    euler_steps=[1, 2],
    num_prompts=4,
    heldout_images=8,
    reference_steps=2,
    straightness_steps=2,
    straightness_prompts=2,
)
STAGE_SETTINGS = ("teacher", "judge", "train_images", "distill_steps", "distilled", "pairs_from", "num_pairs",
                  "pair_steps", "guidance", "reflow_steps", "reflow_batch_size", "reflow_learning_rate", "euler_steps",
                  "num_prompts", "heldout_images", "reference_steps", "straightness_steps", "straightness_prompts",
                  "eval_seed", "quick")  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Reflow on the toy world: teacher, distilled and reflowed student.")
    parser.add_argument("--output_dir", default="reflow-study", help="the experiment folder (restart: same options)")
    parser.add_argument("--quick", action="store_true", help="tiny teacher, a few steps: for tests")
    parser.add_argument("--teacher", default=None, help="'toy', 'tiny' or an SD1.5 pipeline folder (default toy)")
    parser.add_argument("--judge", default=None, help="'toy', 'tiny' or a judge folder (default toy)")
    parser.add_argument("--distilled", default=None, help="a distilled FlowLunePipeline folder (skips stage 1)")
    parser.add_argument("--train_images", type=int, default=None, help="toy training images of the distillation")
    parser.add_argument("--distill_steps", type=int, default=None, help="distillation steps (default 500)")
    parser.add_argument(
        "--pairs_from", choices=("teacher", "distilled"), default="teacher",
        help="whose ODE the pairs' ends come from: the teacher's (bridge; default) or the distilled student's",
    )  # fmt: skip
    parser.add_argument("--num_pairs", type=int, default=None, help="reflow pairs (default 2048)")
    parser.add_argument("--pair_steps", type=int, default=None, help="Euler steps of the pairs' ODE (default 32)")
    parser.add_argument("--guidance", type=float, default=2.0, help="CFG of the pairs, the teacher and the distilled")
    parser.add_argument("--reflow_steps", type=int, default=None, help="reflow training steps (default 1000)")
    parser.add_argument("--reflow_batch_size", type=int, default=None)
    parser.add_argument("--reflow_learning_rate", type=float, default=None)
    parser.add_argument("--seeds", type=int, default=None, help="reflow runs, seeds 0..N-1 (default 3)")
    parser.add_argument("--euler_steps", type=int, nargs="+", default=None, help="step counts (default 1 2 4 8 25)")
    parser.add_argument("--num_prompts", type=int, default=None, help="held-out toy prompts (default 96)")
    parser.add_argument("--heldout_images", type=int, default=None, help="real images of the toy FID (default 480)")
    parser.add_argument("--reference_steps", type=int, default=None, help="the teacher's DDIM reference steps (25)")
    parser.add_argument("--straightness_steps", type=int, default=None, help="steps of the measured paths (32)")
    parser.add_argument("--straightness_prompts", type=int, default=None, help="paths per model (48)")
    parser.add_argument("--eval_seed", type=int, default=0, help="noise seed of the evaluation images")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for name in ("train_images", "distill_steps", "num_pairs", "pair_steps", "reflow_steps", "reflow_batch_size",
                 "seeds", "straightness_steps", "straightness_prompts", "reference_steps"):  # fmt: skip
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if any(s < 1 for s in args.euler_steps):
        parser.error(f"--euler_steps must be >= 1, got {args.euler_steps}")
    if args.guidance <= 1.0:
        parser.error(f"--guidance must be > 1 (the reflowed student learns the guided flow), got {args.guidance}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.distilled is not None:
        args.distilled = str(Path(args.distilled).resolve())
        if not (Path(args.distilled) / "model_index.json").is_file():
            parser.error(f"--distilled {args.distilled}: not a pipeline folder (no model_index.json)")
    return args


def scheduler_shift(pipeline_dir: Path) -> float:
    """The ``shift`` of a FlowLunePipeline folder's scheduler config."""
    config = json.loads((pipeline_dir / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    return float(config["shift"])


def goals(teacher: dict, distilled: dict, reflowed: dict, straight: dict, reference_steps: int) -> list[dict]:
    """Issue 11's goals and issue 9's few-step FID target, each with the numbers it compares (reflowed: the
    mean over its seeds)."""
    out = []

    def acc(table: dict, steps: int) -> float | None:
        row = table.get(str(steps))
        return None if row is None else row["accuracy"]

    r2, d8 = acc(reflowed, 2), acc(distilled, 8)
    if r2 is not None and d8 is not None:
        values = {"reflowed_2": r2, "distilled_8": d8}
        goal = "reflowed at 2 steps >= distilled at 8 steps (accuracy)"
        out.append({"goal": goal, "met": r2 >= d8, "values": values})
    r4, t_ref = acc(reflowed, 4), acc(teacher, reference_steps)
    if r4 is not None and t_ref is not None:
        goal = f"reflowed at 4 steps within 3 points of the teacher's DDIM {reference_steps} (accuracy)"
        values = {"reflowed_4": r4, f"teacher_ddim_{reference_steps}": t_ref}
        out.append({"goal": goal, "met": r4 >= t_ref - 0.03, "values": values})
    r8 = reflowed.get("8", {}).get("toy_fid_real")
    t_fid = teacher.get(str(reference_steps), {}).get("toy_fid_real")
    if r8 is not None and t_fid is not None:  # issue 9's few-step quality target
        goal = f"reflowed at 8 steps: toy FID at most 10% above the teacher's DDIM {reference_steps}"
        values = {"reflowed_8": r8, f"teacher_ddim_{reference_steps}": t_fid}
        out.append({"goal": goal, "met": r8 <= 1.1 * t_fid, "values": values})
    values = {"reflowed": straight["reflowed"], "distilled": straight["distilled"]}
    goal = "straightness lower after reflow than before"
    out.append({"goal": goal, "met": straight["reflowed"] < straight["distilled"], "values": values})
    return out


def main(args: argparse.Namespace) -> dict:
    import torch

    from flow_lune.ablation import mean_interval
    from flow_lune.ablation.checkpoint_eval import (
        EvalSettings,
        evaluate_student,
        load_context,
        load_unet,
        student_pipeline,
    )
    from flow_lune.ablation.study import (
        DONE,
        check_study_file,
        git_state,
        load_script,
        prepare_models,
        read_json,
        run_training,
        write_json,
    )
    from flow_lune.evaluation import make_runner, straightness_summary
    from flow_lune.training.reflow_pairs import read_index

    started = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    root = Path(args.output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    check_study_file(root, {k: getattr(args, k) for k in STAGE_SETTINGS})
    teacher, judge = prepare_models(args.teacher, args.judge, root)
    trainer = load_script(REPO, "train_flow_distill.py")
    seeds = list(range(args.seeds))
    cache = root / "cache"

    # 1. The distilled student: the default job's recipe, or the folder given
    if args.distilled is not None:
        distilled = Path(args.distilled)
    else:
        data = root / "data"
        if not (data / "train" / "metadata.jsonl").is_file():
            from flow_lune.toy import write_imagefolder

            write_imagefolder(data, args.train_images, seed=0)
        distill_argv = [
            "--pretrained_teacher_model", str(teacher), "--train_data_dir", str(data), "--cache_dir", str(cache),
            "--max_train_steps", str(args.distill_steps), "--seed", "0", "--report_to", "none",
            "--eval_prompts", "0", "--no_single_file",
        ]  # fmt: skip
        if args.quick:
            distill_argv += ["--train_batch_size", "2", "--learning_rate", "1e-4"]
        run_training(trainer, distill_argv, root / "distilled", args.distill_steps, log=_log)
        distilled = root / "distilled" / "train" / "pipeline"

    # 2. Pairs from the teacher's or the distilled student's guided ODE (generate_reflow_pairs.py resumes a partial
    #    set itself); the teacher's at the distilled student's sampling shift, so both ODEs use one step grid
    pairs = root / "pairs"
    if not (pairs / "index.json").is_file():
        _log(f"pairs from the {args.pairs_from}: generating")
        start = time.perf_counter()
        generator = load_script(REPO, "generate_reflow_pairs.py")
        source = teacher if args.pairs_from == "teacher" else distilled
        generator.main(generator.parse_args([
            "--model", str(source), "--shift", str(scheduler_shift(distilled)), "--prompts", "toy",
            "--num_pairs", str(args.num_pairs), "--steps", str(args.pair_steps), "--guidance", str(args.guidance),
            "--seed", "0", "--output_dir", str(pairs),
        ]))  # fmt: skip
        write_json(root / "pairs-seconds.json", {"seconds": time.perf_counter() - start})  # this start's share

    # 3. Reflow runs from the distilled student, one per seed
    for seed in seeds:
        run_training(trainer, [
            "--pretrained_teacher_model", str(teacher), "--objective", "reflow", "--reflow_data", str(pairs),
            "--student_model", str(distilled), "--cache_dir", str(cache),
            "--max_train_steps", str(args.reflow_steps), "--train_batch_size", str(args.reflow_batch_size),
            "--learning_rate", str(args.reflow_learning_rate), "--seed", str(seed), "--report_to", "none",
            "--validation_guidance_scale", "1", "--eval_prompts", "0",
        ], root / "reflow" / f"seed{seed}", args.reflow_steps, log=_log)  # fmt: skip

    # 4. Evaluation: one teacher reference, the same prompts and noise for every model
    settings = EvalSettings(
        euler_steps=list(args.euler_steps), guidance=args.guidance, reference_steps=args.reference_steps,
        num_prompts=args.num_prompts, heldout_images=args.heldout_images, seed=args.eval_seed,
        batch_size=min(48, args.num_prompts),
    )  # fmt: skip
    context = load_context(teacher, judge, settings, root / "reference")
    n = min(args.straightness_prompts, args.num_prompts)

    def straightness_of(pipe, guidance: float) -> dict:
        return straightness_summary(
            pipe, context.noise[:n], args.straightness_steps, guidance, context.prompts[:n], settings.batch_size
        )

    def evaluated(name: str, unet_dir: Path, shift: float, guidance: float) -> dict:
        out = root / "eval" / f"{name}.json"
        if not out.is_file():
            _log(f"evaluating {name}")
            start = time.perf_counter()
            unet = load_unet(unet_dir)
            record = evaluate_student(context, unet, shift, guidance=guidance)
            record["straightness"] = straightness_of(student_pipeline(context, unet, shift), guidance)
            write_json(out, {**record, "unet": str(unet_dir), "seconds": time.perf_counter() - start})
        return read_json(out)

    teacher_file = root / "eval" / "teacher.json"
    if not teacher_file.is_file():
        bridge = make_runner("teacher", context.teacher, "bridge", shift=scheduler_shift(distilled)).pipe
        write_json(teacher_file, {**context.teacher_metrics, "straightness": straightness_of(bridge, args.guidance)})
    teacher_eval = read_json(teacher_file)
    distilled_eval = evaluated("distilled", distilled / "unet", scheduler_shift(distilled), args.guidance)
    reflow_evals = {}
    for seed in seeds:
        folder = root / "reflow" / f"seed{seed}" / "train" / "pipeline"
        reflow_evals[seed] = evaluated(f"reflow-seed{seed}", folder / "unet", scheduler_shift(folder), 1.0)

    # 5. Report
    metrics = ("accuracy", "toy_fid_real", "toy_fid_teacher", "same_noise_psnr")
    reflowed = {
        str(s): {
            m: mean_interval([r["by_steps"][str(s)][m] for r in reflow_evals.values()]).as_dict()
            for m in metrics if m in next(iter(reflow_evals.values()))["by_steps"][str(s)]
        }
        for s in args.euler_steps
    }  # fmt: skip
    straight = {
        "teacher": teacher_eval["straightness"]["mean"],
        "distilled": distilled_eval["straightness"]["mean"],
        "reflowed": mean_interval([r["straightness"]["mean"] for r in reflow_evals.values()]).as_dict(),
    }
    reflowed_means = {s: {m: v["mean"] for m, v in row.items()} for s, row in reflowed.items()}
    results = {
        "command": shlex.join(["python", "experiments/reflow.py", *args.argv]),
        "git": git_state(REPO),
        "written_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "config": {k: getattr(args, k) for k in STAGE_SETTINGS} | {"seeds": seeds},
        "pairs": {k: v for k, v in read_index(pairs).items() if k in ("num_rows", "config", "digest")},
        "teacher": teacher_eval,
        "distilled": distilled_eval,
        "reflowed_runs": {str(s): r for s, r in reflow_evals.items()},
        "reflowed": reflowed,
        "straightness": straight,
        "goals": goals(
            teacher_eval["by_steps"], distilled_eval["by_steps"], reflowed_means,
            {"distilled": straight["distilled"], "reflowed": straight["reflowed"]["mean"]}, args.reference_steps,
        ),
        "seconds": {  # wall times (None: not recorded by the start that made it)
            "distilled": None if args.distilled else read_json(root / "distilled" / DONE)["seconds"],
            "pairs": read_json(root / "pairs-seconds.json")["seconds"] if (root / "pairs-seconds.json").is_file()
            else None,
            "reflow": {str(s): read_json(root / "reflow" / f"seed{s}" / DONE)["seconds"] for s in seeds},
            "evaluations": {name: read_json(root / "eval" / f"{name}.json").get("seconds")
                            for name in ("distilled", *(f"reflow-seed{s}" for s in seeds))},
            "this_start": time.perf_counter() - started,
        },
    }  # fmt: skip
    from flow_lune.ablation.reflow_report import plot_quality, report_markdown
    from flow_lune.atomic import atomic_text

    out_dir = root / "report"
    write_json(out_dir / "results.json", results)
    atomic_text(out_dir / "report.md", report_markdown(results))
    plot_quality(results, out_dir / "quality.png")
    _log(f"wrote {out_dir} in {time.perf_counter() - started:.0f} s")
    return results


def _log(message: str) -> None:
    print(f"[reflow] {message}", flush=True)


if __name__ == "__main__":
    arguments = parse_args()
    try:
        main(arguments)
    except ValueError as err:  # a restart with other settings, a refused pair set: no traceback
        print(f"reflow.py: error: {err}", file=sys.stderr)
        sys.exit(2)
