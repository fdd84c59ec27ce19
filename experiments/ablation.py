#!/usr/bin/env python
"""Does the assessor help? Arms x seeds of train_flow_distill.py on the toy world, evaluated and reported.

    python experiments/ablation.py --output_dir ablation-study            # the full study (toy teacher, ~2 h)
    python experiments/ablation.py --output_dir ablation-quick --quick    # tiny teacher, a few steps (tests)

Arms (``flow_lune.ablation.arms``): (a) flow loss only; (b) flow + per-block KD with base weights; (c) (b) with
lambda_b from an assessor trained once on the teacher (``train_assessor.py``); (d) (c) + adaptive timestep
sampling. Everything else (data, steps, sigma and noise streams, evaluation prompts and noise) is identical;
the resolved trainer arguments of every pair of arms are compared and the study refuses to run if anything
but the arm flags differs. A killed study restarted skips what is finished. ``--arms b,c`` runs some arms.
The report folder (``report/``) holds report.md, results.json, quality.png and lambda.png.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the scripts train_flow_distill.py and train_assessor.py live here

# The two presets. Full: sized to fit <= 2 hours on 2 CPU cores (README, "Does the assessor help?").
FULL = dict(
    teacher="toy",  # the shipped toy teacher (flow_lune/toy/assets/teacher)
    judge="toy",  # the shipped judge
    seeds=3,  # the fewest that give a t-interval with some width (t = 4.30 at 2 degrees of freedom)
    train_images=4800,  # the toy world's training split: 100 images per attribute combination
    train_batch_size=32,  # DESIGN's measured toy run: 500 steps of batch 32 matched the teacher
    max_train_steps=400,  # DESIGN: ~500 steps reach the teacher's accuracy; 400 keeps 12 runs within the budget
    learning_rate=2e-4,  # DESIGN's toy run: a 2.17M-parameter UNet, full fine-tuning
    eval_at=[25, 50, 100, 200, 400],  # log-ish grid: differences show early
    euler_steps=[2, 4, 8, 25],  # few steps show differences; 25 is the teacher's reference count
    num_prompts=96,  # each of the 48 attribute combinations twice
    heldout_images=480,  # 10 real images per combination for the toy FID
    reference_steps=25,  # the teacher's DDIM 25: the reference images and the target accuracy
    assessor_steps=1000,  # half train_assessor.py's default 2000: the toy teacher has 2.17M parameters
    assessor_profile_samples=2500,  # train_assessor.py's default: 25 states per sigma bin
    loss_tail=0.2,  # the last 80 of 400 steps: past the fast early fall of the loss
)
QUICK = dict(
    teacher="tiny",  # flow_lune.tiny's random SD1.5-layout teacher: seconds, not minutes
    judge="tiny",  # a judge trained for a few steps: the numbers are plumbing, not quality
    seeds=2,  # the fewest that give an interval
    train_images=16,  # a handful of toy images
    train_batch_size=2,  # tiny batches: the test must run in well under a minute
    max_train_steps=4,
    learning_rate=1e-4,  # tests/test_trainer.py's value for the tiny teacher
    eval_at=[2, 4],  # two evaluation points
    euler_steps=[2, 4],
    num_prompts=4,
    heldout_images=8,
    reference_steps=4,
    assessor_steps=2,
    assessor_profile_samples=100,  # the minimum: one state per sigma bin
    loss_tail=0.5,  # the last 2 of 4 steps: the fewest records a spread needs
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Ablation of the assessor: arms x seeds on the toy world.")
    g = parser.add_argument_group("study")
    g.add_argument("--output_dir", default="ablation-study", help="the study folder (restart with the same options)")
    g.add_argument("--quick", action="store_true", help="tiny teacher, a few steps, 2 seeds: for tests")
    g.add_argument("--arms", default="a,b,c,d", help="comma-separated arms to run (a, b, c, d)")
    g.add_argument("--seeds", type=int, default=None, help="seeds per arm, 0..N-1 (default 3; quick 2)")
    g.add_argument(
        "--teacher", default=None, help="'toy', 'tiny' or an SD1.5 pipeline folder (default toy; quick tiny)"
    )
    g.add_argument("--judge", default=None, help="'toy', 'tiny' or a judge folder (default toy; quick tiny)")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    g.add_argument(
        "--jobs",
        type=int,
        default=1,  # one process; 2 on a 2-core machine: two 1-thread processes beat one 2-thread process here
        help="train and evaluate the arms in N processes of 1 thread each (arms split round-robin); the report "
        "is the same as with 1",
    )
    g.add_argument("--no_report", action="store_true", help=argparse.SUPPRESS)  # a --jobs child: the parent reports
    g = parser.add_argument_group("training (shared by every arm)")
    g.add_argument("--train_images", type=int, default=None, help="toy training images")
    g.add_argument("--train_batch_size", type=int, default=None)
    g.add_argument("--max_train_steps", type=int, default=None)
    g.add_argument("--learning_rate", type=float, default=None)
    g.add_argument("--trainer_args", default="", help="more train_flow_distill.py flags for every arm, one string")
    g.add_argument("--assessor_steps", type=int, default=None, help="train_assessor.py --max_train_steps")
    g.add_argument("--assessor_args", default="", help="more train_assessor.py flags, one string")
    g = parser.add_argument_group("evaluation")
    g.add_argument(
        "--eval_at", type=int, nargs="+", default=None, help="training steps to evaluate (the last is added)"
    )
    g.add_argument("--euler_steps", type=int, nargs="+", default=None, help="student Euler step counts")
    g.add_argument("--guidance", type=float, default=2.0, help="CFG scale (DESIGN: the toy teacher's best at 2)")
    g.add_argument("--num_prompts", type=int, default=None, help="held-out prompts per evaluation")
    g.add_argument("--heldout_images", type=int, default=None, help="real images for the toy FID")
    g.add_argument("--reference_steps", type=int, default=None, help="teacher DDIM steps of the reference")
    g.add_argument("--eval_seed", type=int, default=0, help="noise seed of the evaluation images")
    g.add_argument(
        "--target_euler", type=int, default=None, help="Euler steps of the target (default 8, else the most)"
    )
    g.add_argument("--target_accuracy", type=float, default=None, help="default: the teacher's DDIM reference accuracy")
    g.add_argument("--loss_tail", type=float, default=None, help="end fraction of training for the loss spread (0.2)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)

    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    from flow_lune.ablation.arms import ARMS

    unknown = [a for a in args.arms if a not in ARMS]
    if unknown or not args.arms:
        parser.error(f"--arms {','.join(unknown) or '(none)'}: choose from {','.join(ARMS)}")
    for name in ("seeds", "train_images", "train_batch_size", "max_train_steps", "assessor_steps", "num_prompts"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if any(s < 1 or s > args.max_train_steps for s in args.eval_at):
        parser.error(f"--eval_at steps must be in [1, --max_train_steps={args.max_train_steps}], got {args.eval_at}")
    args.eval_at = sorted(set(args.eval_at) | {args.max_train_steps})
    if any(s < 1 for s in args.euler_steps):
        parser.error(f"--euler_steps must all be >= 1, got {args.euler_steps}")
    if args.target_euler is None:
        args.target_euler = 8 if 8 in args.euler_steps else max(args.euler_steps)
    if args.target_euler not in args.euler_steps:
        parser.error(f"--target_euler {args.target_euler} must be one of --euler_steps {args.euler_steps}")
    if not 0.0 < args.loss_tail <= 1.0:
        parser.error(f"--loss_tail must be in (0, 1], got {args.loss_tail}")
    if args.guidance < 1.0:
        parser.error(f"--guidance must be >= 1, got {args.guidance}")
    if args.num_prompts < 2 or args.heldout_images < 2:
        parser.error("--num_prompts and --heldout_images must be >= 2 (a Frechet distance needs two images)")
    from flow_lune.toy import judge_path, teacher_path

    for name, shipped in (("teacher", teacher_path), ("judge", judge_path)):
        value = getattr(args, name)
        if value not in ("toy", "tiny") and not Path(value).is_dir():
            parser.error(f"--{name} {value!r}: pass 'toy', 'tiny' or an existing folder")
        if value == "toy":
            try:
                shipped()
            except FileNotFoundError as err:
                parser.error(f"--{name} toy: {err}")
    return args


def split_arms(arms: list[str], jobs: int) -> list[list[str]]:
    """The arms of each child process, round-robin (a, c | b, d for 2 jobs: each gets one KD-free-ish arm)."""
    return [arms[k::jobs] for k in range(min(jobs, len(arms)))]


def run_jobs(args: argparse.Namespace, root: Path) -> None:
    """Run this script on each share of the arms in its own process (1 thread each, the same study folder, so the
    shared steps are found done) and wait for all; a failed child stops the study naming its log."""
    from flow_lune.ablation.study import ablation_log

    logs = root / "jobs"
    logs.mkdir(parents=True, exist_ok=True)
    base = _without(args.argv, "--jobs", "--arms", "--threads")  # the rest of the command, as given
    children = []
    for k, arms in enumerate(split_arms(args.arms, args.jobs)):
        log = logs / f"job-{k}.log"
        argv = [sys.executable, str(Path(__file__).resolve()), *base, "--arms", ",".join(arms), "--threads", "1",
                "--no_report"]  # fmt: skip
        ablation_log(f"job {k}: arms {','.join(arms)} (log: {log})")
        with open(log, "ab") as out:
            children.append((k, log, subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)))
    failed = [(k, log) for k, log, child in children if child.wait() != 0]
    if failed:
        raise RuntimeError(f"ablation job(s) failed: {', '.join(f'{k} (see {log})' for k, log in failed)}")


def _without(argv: list[str], *flags: str) -> list[str]:
    """``argv`` without the given flags and their one value (``--flag value`` or ``--flag=value``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        elif not a.startswith(tuple(f"{f}=" for f in flags)):
            out.append(a)
    return out


def shared_trainer_args(args: argparse.Namespace, teacher: Path, data: Path, cache: Path) -> list[str]:
    """The flags every arm shares (the arms add theirs, ``flow_lune.ablation.arms.ARMS``)."""
    from flow_lune.ablation.study import checkpointing_interval
    from flow_lune.toy import heldout_prompts

    return [
        "--pretrained_teacher_model", str(teacher),
        "--train_data_dir", str(data),
        "--cache_dir", str(cache),  # one latent/embedding cache for every run and the assessor
        "--train_batch_size", str(args.train_batch_size),
        "--max_train_steps", str(args.max_train_steps),
        "--learning_rate", str(args.learning_rate),
        "--checkpointing_steps", str(checkpointing_interval(args.eval_at)),  # every evaluated step is saved
        "--validation_steps", str(args.max_train_steps),  # the trainer's own grid only at the end
        "--num_validation_inference_steps", "4",
        "--validation_prompts", *heldout_prompts(2),
        "--report_to", "none",
        "--no_single_file",  # the harness evaluates the pipeline folder
        *shlex.split(args.trainer_args),
    ]  # fmt: skip


def assessor_args(args: argparse.Namespace, teacher: Path, data: Path, cache: Path) -> list[str]:
    """train_assessor.py on the same teacher, data, caches and sigma flags as the trainer (its defaults)."""
    quick = ["--cluster_samples", "16", "--train_batch_size", "4"] if args.quick else []
    return [
        "--pretrained_teacher_model", str(teacher),
        "--train_data_dir", str(data),
        "--cache_dir", str(cache),
        "--max_train_steps", str(args.assessor_steps),
        "--profile_samples", str(args.assessor_profile_samples),
        "--report_to", "none",
        "--seed", "0",  # one assessor per study, whatever the run seeds
        *quick,
        *shlex.split(args.assessor_args),
    ]  # fmt: skip


def main(args: argparse.Namespace) -> dict:
    import torch

    from flow_lune.ablation import report as rep
    from flow_lune.ablation.arms import ARMS, arm_flags, check_arms, uses_assessor
    from flow_lune.ablation.checkpoint_eval import EvalSettings, evaluate_student, load_context, load_unet
    from flow_lune.ablation.study import (
        ablation_log,
        check_study_file,
        git_state,
        load_script,
        parse_script_args,
        prepare_models,
        prune_checkpoints,
        read_json,
        resolved,
        run_name,
        run_training,
        student_folder,
        train_assessor,
        write_json,
    )

    started = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    root = Path(args.output_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    settings = EvalSettings(
        euler_steps=list(args.euler_steps), guidance=args.guidance, reference_steps=args.reference_steps,
        num_prompts=args.num_prompts, heldout_images=args.heldout_images, seed=args.eval_seed,
        batch_size=min(48, args.num_prompts),
    )  # fmt: skip
    settings.check()
    shared = {
        k: getattr(args, k)
        for k in ("quick", "teacher", "judge", "train_images", "train_batch_size", "max_train_steps", "learning_rate",
                  "trainer_args", "assessor_steps", "assessor_args", "assessor_profile_samples", "eval_at")
    }  # fmt: skip
    shared["eval"] = vars(settings)

    # 1. The study folder: a restart must use the same shared settings
    check_study_file(root, shared)

    # 2. Teacher, judge and the toy training images (shared by every run)
    teacher, judge = prepare_models(args.teacher, args.judge, root)
    data = root / "data"
    if not (data / "train" / "metadata.jsonl").is_file():
        from flow_lune.toy import write_imagefolder

        write_imagefolder(data, args.train_images, seed=0)
    cache, assessor_dir = root / "cache", root / "assessor"
    trainer = load_script(REPO, "train_flow_distill.py")
    base = shared_trainer_args(args, teacher, data, cache)

    # 3. The arms' resolved arguments, compared pairwise per seed before anything trains
    #    (before the assessor exists, an existing folder stands in for it: --assessor is an arm flag)
    stand_in = str(assessor_dir if assessor_dir.is_dir() else root)
    planned, before = {}, {}
    for seed in seeds:
        namespaces = {}
        for arm in args.arms:
            argv = [*base, *arm_flags(ARMS[arm], stand_in), "--seed", str(seed), "--output_dir", str(root / "_check")]
            namespaces[arm] = resolved(parse_script_args(trainer.parse_args, argv, f"arm {arm}"))
        before[str(seed)] = check_arms(namespaces)
        for arm in args.arms:
            planned[(arm, seed)] = [*base, *arm_flags(ARMS[arm], str(assessor_dir)), "--seed", str(seed)]

    # 4. The assessor, once, when an arm uses it
    guided = [a for a in args.arms if uses_assessor(ARMS[a])]
    assessor_seconds = None
    if guided:
        train_assessor(load_script(REPO, "train_assessor.py"), assessor_args(args, teacher, data, cache), assessor_dir)
        assessor_seconds = read_json(assessor_dir / "ablation_done.json")["seconds"]

    # 5. The teacher's reference and the untrained student (step 0 of every curve)
    context = load_context(teacher, judge, settings, root / "reference")
    shift = float(trainer.parse_args([*base, "--output_dir", str(root / "_check")]).shift)
    untrained_file = root / "untrained" / "eval.json"
    if not untrained_file.is_file():
        write_json(untrained_file, {**evaluate_student(context, context.teacher.unet, shift), "training_step": 0})
    untrained = read_json(untrained_file)

    # 6. The runs: train (or resume, or skip), evaluate each saved step, prune the other checkpoints;
    #    with --jobs N, first in N child processes (this script on a share of the arms), then skipped here
    if args.jobs > 1:
        run_jobs(args, root)
    for seed in seeds:
        for arm in args.arms:
            run_dir = root / "runs" / run_name(arm, seed)
            run_training(trainer, planned[(arm, seed)], run_dir, args.max_train_steps)
            train_dir = run_dir / "train"
            for step in args.eval_at:
                out = run_dir / "eval" / f"step-{step}.json"
                if out.is_file():
                    continue
                ablation_log(f"{run_dir.name}: evaluating step {step}")
                start = time.perf_counter()
                folder = student_folder(train_dir, step, args.max_train_steps)
                record = evaluate_student(context, load_unet(folder), shift)
                seconds = time.perf_counter() - start  # for sizing later studies
                write_json(
                    out, {**record, "training_step": step, "unet": str(folder.relative_to(root)), "seconds": seconds}
                )
            prune_checkpoints(train_dir, args.eval_at)
    if args.no_report:
        return {}

    # 7. The arms as they ran: each seed's args.json compared pairwise again
    after = {}
    for seed in seeds:
        ran = {arm: read_json(root / "runs" / run_name(arm, seed) / "train" / "args.json") for arm in args.arms}
        after[str(seed)] = check_arms(ran)

    # 8. Report: results.json, report.md, charts
    teacher_ref = context.teacher_metrics["by_steps"][str(settings.reference_steps)]
    target = {
        "accuracy": args.target_accuracy if args.target_accuracy is not None else teacher_ref["accuracy"],
        "source": "--target_accuracy" if args.target_accuracy is not None
        else f"the teacher's DDIM {settings.reference_steps} accuracy",
        "euler_steps": args.target_euler,
    }  # fmt: skip
    gathered, lambdas = rep.build_results(
        root, args.arms, seeds, args.eval_at, target, args.loss_tail, untrained, guided
    )
    results = {
        "command": shlex.join(["python", "experiments/ablation.py", *args.argv]),
        "git": git_state(REPO),
        "written_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "config": {**shared, "seeds": seeds, "loss_tail": args.loss_tail},
        "arms": {a: list(ARMS[a]) for a in args.arms},
        "eval_steps": [0, *args.eval_at],
        "target": target,
        "teacher": context.teacher_metrics,
        "untrained": untrained,
        "arm_check": {"resolved_before": before, "args_json": after},
        **gathered,
        "seconds": {  # wall times, for sizing the next study
            "assessor": assessor_seconds,
            "train": {name: run["train_seconds"] for name, run in gathered["runs"].items()},
            "evaluations": {
                name: {step: e.get("seconds") for step, e in run["evals"].items() if step != "0"}
                for name, run in gathered["runs"].items()
            },
            "this_start": time.perf_counter() - started,
        },
    }
    out_dir = root / "report"
    write_json(out_dir / "results.json", results)
    from flow_lune.atomic import atomic_text

    atomic_text(out_dir / "report.md", rep.report_markdown(results))
    rep.plot_quality(results, out_dir / "quality.png")
    rep.plot_lambda_arms(lambdas, out_dir / "lambda.png")
    ablation_log(f"wrote {out_dir} in {time.perf_counter() - started:.0f} s")
    return results


if __name__ == "__main__":
    arguments = parse_args()
    try:
        main(arguments)
    except ValueError as err:  # a refused study (arms that differ, a restart with other settings): no traceback
        print(f"ablation.py: error: {err}", file=sys.stderr)
        sys.exit(2)
