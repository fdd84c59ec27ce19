"""Build the shipped toy world models: ``python -m flow_lune.toy.build --output_dir DIR --seed 0``.

Stages, each printing its wall time: data (rendered in memory), judge, VAE, latents (encoded once),
teacher (text encoder + UNet trained jointly, epsilon prediction on SD1.5's DDPM schedule), a DDIM
check of the teacher with the judge, and saving. The output folder holds ``teacher/`` (a
``StableDiffusionPipeline`` in safetensors), ``judge/`` and ``manifest.json`` (sha256 of every file, the
command, seed, stage times, versions). ``--quick`` runs every stage for a few steps, for smoke tests.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import shutil
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from flow_lune.atomic import atomic_folder, atomic_text
from flow_lune.convert.hashing import file_sha256

from .build_config import TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG, BuildConfig
from .data import ToyArrays, toy_arrays
from .judge import save_judge, train_judge
from .tokenizer import toy_tokenizer, write_toy_tokenizer_files
from .world import ATTRIBUTE_COMBINATIONS, heldout_prompts, parse_caption


def _stage(name: str, times: dict[str, float]):
    class _Timer:
        def __enter__(self):
            print(f"[build] stage {name} ...", flush=True)
            self.start = time.perf_counter()
            return self

        def __exit__(self, *exc):
            times[name] = round(time.perf_counter() - self.start, 1)
            if exc[0] is None:
                print(f"[build] stage {name} done in {times[name]:.1f} s", flush=True)

    return _Timer()


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10%: ``0.1 + 0.9 * (1 + cos(pi p)) / 2``."""
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * p))


def _pixels(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def train_vae(data: ToyArrays, cfg: BuildConfig):
    """AutoencoderKL with foreground-weighted MSE: ``mean((1 + (w - 1) m) (x - x_rec)^2) + beta KL``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed + 1)
    vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0, fused=True)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    start = time.perf_counter()
    for step in range(cfg.vae_steps):
        for group in opt.param_groups:
            group["lr"] = cfg.vae_lr * _cosine_lr(step, cfg.vae_steps, min(50, cfg.vae_steps))
        idx = torch.randint(0, data.images.shape[0], (cfg.vae_batch,), generator=gen)
        x = _pixels(data.images[idx])
        weight = 1.0 + (cfg.vae_foreground_weight - 1.0) * data.masks[idx][:, None]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        loss = (weight * (rec - x) ** 2).mean() + cfg.vae_kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            print(
                f"  vae step {step + 1}/{cfg.vae_steps} loss {loss.item():.5f} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    return vae.eval()


@torch.no_grad()
def encode_all(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std for every image, unscaled."""
    means, stds = [], []
    for i in range(0, images.shape[0], batch):
        post = vae.encode(_pixels(images[i : i + batch])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def vae_check(vae, judge, heldout: ToyArrays) -> dict[str, float]:
    """PSNR of held-out reconstructions and the judge's per-attribute accuracy on them."""
    mean, _ = encode_all(vae, heldout.images)
    rec = (vae.decode(mean).sample.clamp(-1, 1) + 1) / 2
    x = heldout.images.float() / 255.0
    psnr = (10 * torch.log10(1.0 / ((rec - x) ** 2).mean(dim=(1, 2, 3)))).mean().item()
    acc = (judge.predict(rec) == heldout.labels).float().mean(0)
    return {
        "psnr_db": round(psnr, 2),
        **{f"judge_{k}": round(a.item(), 4) for k, a in zip(("shape", "colour", "position"), acc)},
    }


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * model`` for every parameter."""
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1.0 - decay)


def min_snr_weight(snr: torch.Tensor, gamma: float) -> torch.Tensor:
    """min-SNR-gamma weight of the epsilon loss: ``min(SNR, gamma) / SNR`` (Hang et al. 2023, eq. 7)."""
    return torch.clamp(snr, max=gamma) / snr


def train_teacher(latent_mean, latent_std, scaling_factor: float, captions, tokenizer, cfg: BuildConfig):
    """Text encoder + UNet, epsilon prediction on SD1.5's DDPM schedule; returns the EMA copies.

    ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with ``x0`` a posterior sample times ``scaling_factor``;
    loss ``min-SNR weight * |eps_hat - eps|^2``.
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from flow_lune.tiny import SD15_SCHEDULER_CONFIG

    ddpm = DDPMScheduler.from_config(SD15_SCHEDULER_CONFIG)  # SD1.5's betas, read from its config
    abar = ddpm.alphas_cumprod.float()
    torch.manual_seed(cfg.seed + 2)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **TEXT_CONFIG))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    for m in (ema_unet, ema_text):
        m.requires_grad_(False)
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2, fused=True)
    ids = tokenizer(
        list(captions), padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    empty = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    # The whole 77-token context, as the pipeline encodes prompts: the UNet's cross-attention sees the padding
    # tokens' states at sampling time, so it must see them in training too (a prefix-only run drew the
    # prompted attributes 31-39% of the time at DDIM 25 through the pipeline, 96% with prefix-only embeddings).
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    start = time.perf_counter()
    for step in range(cfg.unet_steps):
        for group in opt.param_groups:
            group["lr"] = cfg.unet_lr * _cosine_lr(step, cfg.unet_steps, cfg.unet_warmup)
        idx = torch.randint(0, latent_mean.shape[0], (cfg.unet_batch,), generator=gen)
        x0 = (latent_mean[idx] + latent_std[idx] * torch.randn(latent_mean[idx].shape, generator=gen)) * scaling_factor
        tok = ids[idx].clone()
        drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.caption_dropout
        tok[drop] = empty[0]
        t = torch.randint(0, ddpm.config.num_train_timesteps, (cfg.unet_batch,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        context = text_encoder(tok)[0]
        pred = unet(x_t, t, encoder_hidden_states=context).sample
        w = min_snr_weight(abar[t] / (1 - abar[t]), cfg.min_snr_gamma)
        loss = (w * ((pred - eps) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        _ema_update(ema_unet, unet, min(cfg.ema_decay, (1 + step) / (10 + step)))
        _ema_update(ema_text, text_encoder, min(cfg.ema_decay, (1 + step) / (10 + step)))
        if (step + 1) % 100 == 0:
            print(
                f"  teacher step {step + 1}/{cfg.unet_steps} loss {loss.item():.4f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    return ema_unet, ema_text


def teacher_scheduler():
    """The shipped scheduler: DDIM over SD1.5's betas; final alpha 1 and no clipping, as the flow bridge."""
    from flow_lune.evaluation.sampling import ddim_scheduler
    from flow_lune.tiny import SD15_SCHEDULER_CONFIG

    return ddim_scheduler({k: v for k, v in SD15_SCHEDULER_CONFIG.items() if k != "skip_prk_steps"})


@torch.no_grad()
def teacher_check(pipe, judge, count: int, guidances, seed: int) -> dict[str, float]:
    """The judge's accuracy (all three attributes right) on DDIM 25 samples of held-out prompts."""
    prompts = heldout_prompts(count)
    labels = torch.tensor([list(parse_caption(p).values()) for p in prompts])
    out = {}
    for g in guidances:
        gen = torch.Generator().manual_seed(seed)
        images = []
        for i in range(0, count, 48):
            images.append(
                pipe(
                    prompts[i : i + 48], num_inference_steps=25, guidance_scale=g, generator=gen, output_type="pt"
                ).images
            )
        pred = judge.predict(torch.cat(images))
        overall = round((pred == labels).all(1).float().mean().item(), 4)
        per_attribute = [round(a, 4) for a in (pred == labels).float().mean(0).tolist()]
        out[f"ddim25_g{g:g}_all"], out[f"ddim25_g{g:g}_per_attribute"] = overall, per_attribute
        print(f"  teacher DDIM 25, guidance {g:g}: {overall:.4f} (per attribute {per_attribute})", flush=True)
    return out


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    import flow_lune

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "flow_lune": flow_lune.__version__,
    }


def build(output_dir: str | Path, cfg: BuildConfig, command: str) -> dict:
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(cfg.threads)
    times: dict[str, float] = {}
    checks: dict[str, dict] = {}
    with _stage("data", times):
        train = toy_arrays("train", cfg.train_images, cfg.seed)
        heldout = toy_arrays("heldout", cfg.heldout_images, cfg.seed)
    if cfg.reuse is not None:
        from diffusers import AutoencoderKL

        from .judge import load_judge

        previous = json.loads((Path(cfg.reuse) / "manifest.json").read_text(encoding="utf-8"))
        judge = load_judge(Path(cfg.reuse) / "judge")
        vae = AutoencoderKL.from_pretrained(str(Path(cfg.reuse) / "teacher" / "vae")).eval()
        for name in ("judge", "vae"):
            times[name] = previous["stage_seconds"][name]
        checks.update({k: previous["checks"][k] for k in ("judge_heldout_accuracy", "vae_heldout")})
        checks["reused_judge_and_vae_from"] = {
            "command": previous["command"],
            "files": {k: v for k, v in previous["files"].items() if k.startswith(("judge/", "teacher/vae/"))},
        }
        print(f"[build] judge and VAE reused from {cfg.reuse} (built by: {previous['command']})", flush=True)
    else:
        with _stage("judge", times):
            judge = train_judge(train.images, train.labels, steps=cfg.judge_steps, seed=cfg.seed)
            acc = (judge.predict(heldout.images.float() / 255.0) == heldout.labels).float().mean(0)
            checks["judge_heldout_accuracy"] = [round(a, 4) for a in acc.tolist()]
            print(f"  judge held-out accuracy per attribute: {checks['judge_heldout_accuracy']}", flush=True)
        with _stage("vae", times):
            vae = train_vae(train, cfg)
            checks["vae_heldout"] = vae_check(vae, judge, heldout)
            print(f"  vae held-out reconstructions: {checks['vae_heldout']}", flush=True)
    with _stage("latents", times):
        mean, std = encode_all(vae, train.images)
        samples = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(cfg.seed))
        scaling = 1.0 / samples.std().item()
        vae.register_to_config(scaling_factor=scaling)
        print(f"  latent std {samples.std().item():.4f} -> scaling_factor {scaling:.5f}", flush=True)
    with _stage("teacher", times):
        tok_dir = Path(output_dir).with_name(Path(output_dir).name + ".tokenizer-tmp")
        write_toy_tokenizer_files(tok_dir)
        tokenizer = toy_tokenizer(tok_dir)
        shutil.rmtree(tok_dir)
        unet, text_encoder = train_teacher(mean, std, scaling, train.captions, tokenizer, cfg)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=teacher_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    with _stage("check", times):
        checks["teacher"] = teacher_check(pipe, judge, cfg.check_prompts, cfg.check_guidance, cfg.seed)

    manifest = {
        "command": command,
        "seed": cfg.seed,
        "config": asdict(cfg),
        "stage_seconds": times,
        "checks": checks,
        "versions": _versions(),
        "combinations": len(ATTRIBUTE_COMBINATIONS),
    }

    def fill(tmp: Path) -> None:
        pipe.save_pretrained(tmp / "teacher", safe_serialization=True)
        save_judge(judge, tmp / "judge")
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest["files"] = {p.relative_to(tmp).as_posix(): file_sha256(p) for p in files}
        manifest["total_bytes"] = sum(p.stat().st_size for p in files)
        atomic_text(tmp / "manifest.json", json.dumps(manifest, indent=2) + "\n")

    with _stage("save", times):
        atomic_folder(output_dir, fill)
    print(f"[build] wrote {output_dir} ({manifest['total_bytes'] / 1e6:.1f} MB); stage seconds {times}", flush=True)
    return manifest


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", required=True, help="folder to write teacher/, judge/ and manifest.json into")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data, every initialisation and every batch")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage: smoke test only")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 1: faster under contention)")
    parser.add_argument("--unet_steps", type=int, default=None, help="override the teacher's training steps")
    parser.add_argument(
        "--reuse", default=None, help="a previous build's folder: reuse its judge and VAE (same seed), retrain the rest"
    )
    args = parser.parse_args(argv)
    for name in ("threads", "unet_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = BuildConfig(seed=args.seed)
    if args.quick:
        cfg = cfg.quick()
    if args.threads is not None:
        cfg = replace(cfg, threads=args.threads)
    if args.unet_steps is not None:
        cfg = replace(cfg, unet_steps=args.unet_steps)
    if args.reuse is not None:
        if not (Path(args.reuse) / "manifest.json").is_file():
            raise SystemExit(f"build.py: error: --reuse {args.reuse!r} has no manifest.json (not a build output)")
        cfg = replace(cfg, reuse=str(Path(args.reuse).resolve()))
    command = " ".join(["python -m flow_lune.toy.build", *(sys.argv[1:] if argv is None else argv)])
    build(args.output_dir, cfg, command)


if __name__ == "__main__":
    main()
