#!/usr/bin/env python
"""Distribution matching on top of reflow: does a DMD term close the Euler-8 gap that MSE reflow leaves?

    python experiments/dmd.py --student r-L0/pipeline --pairs pairs-8k --real_init flow-lune-output/pipeline \\
        --output_dir dmd-seed0 --seed 0

Plain reflow fits the teacher's ODE ends by mean squared error, which shrinks its samples toward the mean
(docs/reflow.md, item 3). This experiment fine-tunes a reflowed student with the reflow loss plus a DMD term
(``flow_lune.training.dmd``) that compares its own samples with the pairs' distribution:

1. **real**: a conditional flow model of the pairs' clean ends ``x0_hat`` (the teacher's guided ODE samples),
   trained by flow matching with fresh noise from ``--real_init``'s UNet (``OUT/real``). It is the real score;
   an unguided model of the guided samples, so real and fake are models of the same kind. With
   ``--real_teacher`` this stage is skipped: the real score is the teacher itself, through the bridge at the
   pairs' guidance (DMD's own choice), and the fake model starts from ``--real_init``'s UNet.
2. **dmd**: the fake model starts as a copy of the real one and first follows the generator alone for
   ``--warmup_steps``; then each step takes, from the same ``--seed``-ed generator, a reflow batch (MSE to
   the straight line) and a generator batch (backward simulation on the student's ``--sample_steps`` Euler
   grid, re-noised at t ~ U[t_min, t_max]), updates the student on ``reflow + dmd_weight * L_dmd`` and the fake
   model on its flow-matching loss on the new samples. The student is written as a FlowLunePipeline folder
   (``OUT/pipeline``: the student's folder with the new UNet), with ``log.jsonl`` and ``run.json``
   (the command, the commit, the settings, the seconds).

Each stage is skipped when its output exists. Both stages draw from one generator seeded by ``--seed``; its state
after the first stage is saved with the real model, so a run restarted after it draws what an unbroken run does.
``--ema_decay`` also writes an exponential moving average of the student (``OUT/pipeline-ema``), and
``--snapshot_every N`` the student every N steps (``OUT/snapshots/N``, with ``N-ema``). The student swings along
the run (docs/reflow.md, item 7): ``--select_every N`` (toy world only) scores it every N steps, and at the start and
the end, by toy FID at Euler ``--sample_steps`` on data the evaluation does not use (the toy train split and noise
seed ``--select_seed``), keeps the best as ``OUT/pipeline-best`` and records the scores in ``run.json``. Evaluate the
result like any student: ``evaluate.py --student OUT/pipeline --guidance 1 --teacher_guidance 2``
(docs/reflow.md, items 6 and 7, give the measured numbers).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GENERATOR_STATE = "generator_state.safetensors"  # in OUT/real: the generator after the first stage


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Reflow + distribution matching (DMD) fine-tune of a reflowed student.")
    p.add_argument("--student", required=True, help="the reflowed student (FlowLunePipeline folder)")
    p.add_argument("--pairs", required=True, help="its reflow pair set (generate_reflow_pairs.py)")
    p.add_argument(
        "--real_init", required=True, help="FlowLunePipeline folder whose UNet starts the real and the fake model"
    )
    p.add_argument(
        "--real_teacher",
        default=None,
        help="an epsilon SD1.5 folder ('toy': the shipped toy teacher): the real score is this teacher through the "
        "bridge at the pairs' guidance, and the first stage is skipped",
    )
    p.add_argument("--output_dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real_steps", type=int, default=1500, help="flow-matching steps of the real model")
    p.add_argument("--real_learning_rate", type=float, default=1e-4, help="cosine-decayed to 0")
    p.add_argument("--steps", type=int, default=1000, help="student updates")
    p.add_argument("--warmup_steps", type=int, default=300, help="fake-only updates before the student's")
    p.add_argument("--learning_rate", type=float, default=2e-5, help="the student's")
    p.add_argument("--fake_learning_rate", type=float, default=1e-4)
    p.add_argument("--dmd_weight", type=float, default=1.0, help="0: reflow only (the control)")
    p.add_argument("--batch_size", type=int, default=32, help="reflow and real-model rows per step")
    p.add_argument("--dmd_batch_size", type=int, default=16, help="generated rows per step")
    p.add_argument("--sample_steps", type=int, default=8, help="the Euler grid of backward simulation")
    p.add_argument("--t_min", type=float, default=0.02)
    p.add_argument("--t_max", type=float, default=0.98)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--log_every", type=int, default=50)
    p.add_argument("--ema_decay", type=float, default=0.0, help="> 0: also write OUT/pipeline-ema (diffusers EMAModel)")
    p.add_argument("--snapshot_every", type=int, default=0, help="> 0: also write OUT/snapshots/STEP every this many")
    p.add_argument(
        "--select_every",
        type=int,
        default=0,
        help="> 0: every this many steps (and at 0 and the end) score the student by toy FID on held-apart data "
        "(the toy train split, its own noise) and keep the best as OUT/pipeline-best",
    )
    p.add_argument("--select_prompts", type=int, default=960, help="toy prompts of the selection's draw")
    p.add_argument("--select_seed", type=int, default=1000, help="the selection's noise seed (evaluations use 0..)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    for name in ("student", "real_init"):
        if not (Path(getattr(args, name)) / "model_index.json").is_file():
            p.error(f"--{name} {getattr(args, name)!r} is not a pipeline folder (no model_index.json).")
    if args.real_teacher == "toy":
        from flow_lune.toy import teacher_path

        args.real_teacher = str(teacher_path())
    if args.real_teacher is not None and not (Path(args.real_teacher) / "model_index.json").is_file():
        p.error(f"--real_teacher {args.real_teacher!r} is not a pipeline folder (no model_index.json); or 'toy'.")
    if not (Path(args.pairs) / "index.json").is_file():
        p.error(f"--pairs {args.pairs!r} is not a finished pair set (no index.json); run generate_reflow_pairs.py.")
    if not 0 <= args.t_min < args.t_max <= 1:
        p.error(f"--t_min {args.t_min} and --t_max {args.t_max} must satisfy 0 <= t_min < t_max <= 1.")
    for name in ("real_steps", "steps", "batch_size", "dmd_batch_size", "sample_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}.")
    if args.warmup_steps < 0 or args.dmd_weight < 0 or args.snapshot_every < 0 or args.select_every < 0:
        p.error("--warmup_steps, --dmd_weight, --snapshot_every and --select_every must be >= 0.")
    if args.select_prompts < 2:
        p.error(f"--select_prompts must be >= 2 (a Frechet distance needs two images), got {args.select_prompts}.")
    if not 0 <= args.ema_decay < 1:
        p.error(f"--ema_decay must be in [0, 1), got {args.ema_decay}.")
    return args


def _log(message: str) -> None:
    print(f"[dmd] {message}", file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> Path:
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel
    from safetensors.torch import load_file, save_file

    from flow_lune import FlowLunePipeline
    from flow_lune.ablation.study import git_state
    from flow_lune.atomic import atomic_folder, atomic_text
    from flow_lune.flow import SigmaSampler
    from flow_lune.flow.convention import flow_state, x0_from_velocity
    from flow_lune.flow.reflow import reflow_target
    from flow_lune.training.dmd import backward_simulation, denoising_loss, dmd_direction, dmd_loss
    from flow_lune.training.objective import flow_matching_loss, student_velocity
    from flow_lune.training.optimization import build_lr_scheduler
    from flow_lune.training.reflow_pairs import ReflowPairs

    started = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    pairs = ReflowPairs(args.pairs)
    rows = [pairs[i] for i in range(len(pairs))]
    x0_all = torch.stack([r["latents"] for r in rows]).float()
    z_all = torch.stack([r["noise"] for r in rows]).float()
    c_all = torch.stack([r["prompt_embeds"] for r in rows]).float()
    sampler = SigmaSampler()  # the trainer's default training sigmas (uniform, shift 3)

    def velocity_of(unet, c: torch.Tensor):
        """``v(x, sigma)`` of ``unet`` under the prompt embeddings ``c``."""
        return lambda x, sigma: student_velocity(unet, x, sigma, c)

    def step(model, optimizer, loss) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()

    def batch(n: int) -> torch.Tensor:
        return torch.randint(len(rows), (n,), generator=gen)

    # 1. The real model: flow matching on the pairs' clean ends (or the teacher through the bridge)
    real_dir = root / "real"
    if args.real_teacher is not None:
        from diffusers import DDPMScheduler

        from flow_lune.flow import EpsilonToFlowUNet, guided_velocity

        unet = UNet2DConditionModel.from_pretrained(args.real_teacher, subfolder="unet")  # the UNet only, no VAE
        schedule = DDPMScheduler.load_config(args.real_teacher, subfolder="scheduler")
        teacher = EpsilonToFlowUNet(unet.eval().requires_grad_(False), schedule)
        empty = pairs.empty_prompt_embeds.float()[None]
        guidance = float(pairs.config["guidance"])

        def real_velocity(c: torch.Tensor):
            def v(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
                v_cond = teacher.velocity(x, sigma, c)
                return guided_velocity(teacher.velocity(x, sigma, empty.expand(len(c), -1, -1)), v_cond, guidance)

            return v

        fake_init = Path(args.real_init) / "unet"
    elif not (real_dir / "config.json").is_file():
        _log(f"real model: {args.real_steps} steps from {args.real_init}")
        real = UNet2DConditionModel.from_pretrained(Path(args.real_init) / "unet").train()
        opt = torch.optim.AdamW(real.parameters(), lr=args.real_learning_rate, weight_decay=0.0)
        sched = build_lr_scheduler("cosine", opt, 0, args.real_steps, 1)  # diffusers': 0.5 (1 + cos(pi i / n))
        for i in range(args.real_steps):
            idx = batch(args.batch_size)
            x0, c = x0_all[idx], c_all[idx]
            noise, sigma = torch.randn(x0.shape, generator=gen), sampler.sample(len(idx), gen)
            loss = denoising_loss(velocity_of(real, c), x0, noise, sigma)
            step(real, opt, loss)
            sched.step()
            if i % args.log_every == 0:
                _log(f"real {i}: loss {loss.item():.4f}")

        def fill_real(tmp: Path) -> None:
            real.save_pretrained(tmp)
            save_file({"state": gen.get_state()}, tmp / GENERATOR_STATE)  # a restart draws as an unbroken run

        atomic_folder(real_dir, fill_real)
    elif (real_dir / GENERATOR_STATE).is_file():
        gen.set_state(load_file(real_dir / GENERATOR_STATE)["state"])
    else:
        _log(f"{real_dir} has no {GENERATOR_STATE}: the second stage draws other numbers than an unbroken run")
    if args.real_teacher is None:
        real = UNet2DConditionModel.from_pretrained(real_dir).eval().requires_grad_(False)
        fake_init = real_dir

        def real_velocity(c: torch.Tensor):
            return velocity_of(real, c)

    # 2. DMD fine-tune of the student, the fake model starting from the real one
    out = root / "pipeline"
    if (out / "model_index.json").is_file():
        _log(f"{out} exists: nothing to do")
        return out
    pipe = FlowLunePipeline.from_pretrained(args.student)
    student = pipe.unet.train()
    fake = UNet2DConditionModel.from_pretrained(fake_init).train()
    pipe.scheduler.set_timesteps(args.sample_steps)
    grid = pipe.scheduler.sigmas.float().clone()  # the selection's sampling sets the scheduler's timesteps again
    opt_s = torch.optim.AdamW(student.parameters(), lr=args.learning_rate, weight_decay=0.0)
    opt_f = torch.optim.AdamW(fake.parameters(), lr=args.fake_learning_rate, weight_decay=0.0)
    ema = EMAModel(student.parameters(), decay=args.ema_decay) if args.ema_decay > 0 else None
    records = []

    def write_student(folder: Path, averaged: bool = False) -> None:
        """``--student``'s folder with the student's UNet (its EMA with ``averaged``), atomically."""

        def fill(tmp: Path) -> None:
            shutil.copytree(args.student, tmp, dirs_exist_ok=True)
            shutil.rmtree(tmp / "unet")
            if averaged:
                ema.store(student.parameters())
                ema.copy_to(student.parameters())
            student.save_pretrained(tmp / "unet")
            if averaged:
                ema.restore(student.parameters())

        atomic_folder(folder, fill)

    selection: dict[int, float] = {}
    if args.select_every:
        from flow_lune.evaluation import GroupedFID, fixed_noise, make_runner, sample_all
        from flow_lune.toy import heldout_prompts, judge_path, toy_arrays
        from flow_lune.toy.judge import JudgeFeatures, load_judge

        select_prompts = heldout_prompts(args.select_prompts)
        select_noise = fixed_noise(len(select_prompts), tuple(x0_all.shape[1:]), args.select_seed)
        train_images = toy_arrays("train", 2 * len(select_prompts), seed=0).images.float() / 255.0
        select_fid = GroupedFID(JudgeFeatures(load_judge(judge_path())), train_images, 1)
        select_runner = make_runner("student", pipe, "euler")  # samples `pipe`, whose UNet is the student

    def select(n: int) -> None:
        """Toy FID of the student after ``n`` updates at Euler ``--sample_steps``, cfg 1, on the held-apart draw
        (train-split images, noise seed ``--select_seed``); the best so far is written to ``OUT/pipeline-best``."""
        student.eval()
        images, _ = sample_all(select_runner, select_prompts, select_noise, args.sample_steps, 1.0, 96)
        student.train()
        selection[n] = select_fid.score(select_fid.states(images))[0]
        _log(f"selection {n}: toy FID {selection[n]:.4f}")
        if selection[n] == min(selection.values()):
            write_student(root / "pipeline-best")

    def generated(c: torch.Tensor) -> torch.Tensor:
        k = int(torch.randint(len(grid) - 1, (1,), generator=gen))
        z = torch.randn((len(c), *x0_all.shape[1:]), generator=gen)
        return backward_simulation(velocity_of(student, c), z, grid, k)

    def fake_update(x0g: torch.Tensor, c: torch.Tensor) -> float:
        noise, sigma = torch.randn(x0g.shape, generator=gen), sampler.sample(len(c), gen)
        loss = denoising_loss(velocity_of(fake, c), x0g.detach(), noise, sigma)
        step(fake, opt_f, loss)
        return loss.item()

    warmup = args.warmup_steps if args.dmd_weight > 0 else 0
    if args.select_every:
        select(0)  # the start competes too
    _log(f"dmd: {warmup} fake-only steps, then {args.steps} student steps (dmd_weight {args.dmd_weight})")
    for i in range(warmup + args.steps):
        idx = batch(args.batch_size)
        c = c_all[idx]
        cg = c[: args.dmd_batch_size]
        if i < warmup:
            with torch.no_grad():
                x0g = generated(cg)
            fake_loss = fake_update(x0g, cg)
            if i % args.log_every == 0:
                _log(f"warmup {i}: fake {fake_loss:.4f}")
            continue
        x0, z = x0_all[idx], z_all[idx]
        sigma = sampler.sample(len(idx), gen)
        v = velocity_of(student, c)(flow_state(x0, z, sigma), sigma)
        reflow = flow_matching_loss(v, reflow_target(x0, z), sigma)
        record = {"step": i - warmup + 1, "reflow": reflow.item()}
        loss = reflow
        if args.dmd_weight > 0:
            x0g = generated(cg)
            t = args.t_min + (args.t_max - args.t_min) * torch.rand(len(cg), generator=gen)
            x_t = flow_state(x0g.detach(), torch.randn(x0g.shape, generator=gen), t)
            with torch.no_grad():
                x0_real = x0_from_velocity(x_t, real_velocity(cg)(x_t, t), t)
                x0_fake = x0_from_velocity(x_t, velocity_of(fake, cg)(x_t, t), t)
            direction = dmd_direction(x0g, x0_real, x0_fake)
            dmd = dmd_loss(x0g, direction)
            loss = reflow + args.dmd_weight * dmd
            record.update(dmd=dmd.item(), direction=direction.abs().mean().item())
        step(student, opt_s, loss)
        if ema is not None:
            ema.step(student.parameters())
        if args.dmd_weight > 0:
            record["fake"] = fake_update(x0g, cg)
        records.append(record)
        if (i - warmup) % args.log_every == 0:
            _log(json.dumps(record))
        n = record["step"]
        if args.snapshot_every and n % args.snapshot_every == 0 and n < args.steps:
            (root / "snapshots").mkdir(exist_ok=True)
            write_student(root / "snapshots" / str(n))
            if ema is not None:
                write_student(root / "snapshots" / f"{n}-ema", averaged=True)
        if args.select_every and (n % args.select_every == 0 or n == args.steps):
            select(n)

    atomic_text(root / "log.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    run = {
        "command": shlex.join(["python", "experiments/dmd.py", *args.argv]),
        "git": git_state(REPO),
        "settings": {k: v for k, v in vars(args).items() if k != "argv"},
        "seconds": time.perf_counter() - started,
    }
    if selection:
        run["selection"] = {"toy_fid": selection, "best_step": min(selection, key=selection.get)}
    atomic_text(root / "run.json", json.dumps(run, indent=2))
    if ema is not None:
        write_student(root / "pipeline-ema", averaged=True)
    write_student(out)
    _log(f"wrote {out} in {run['seconds']:.0f} s")
    return out


if __name__ == "__main__":
    main(parse_args())
