"""Toy-world metrics: attribute accuracy from the judge, toy FID on its features, same-noise agreement.

Images are float tensors in [0, 1], (B, 3, H, W).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from flow_lune.toy.judge import JudgeFeatures, ToyJudge
from flow_lune.toy.world import ATTRIBUTES, parse_caption


def prompt_labels(prompts: Sequence[str]) -> torch.Tensor:
    """(B, attributes) labels named by toy prompts; ``ValueError`` for a prompt that is not a toy caption."""
    return torch.tensor([list(parse_caption(p).values()) for p in prompts], dtype=torch.int64)


def attribute_accuracy(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Fraction of images with every attribute right (``all``) and per attribute: ``mean(pred == target)``."""
    if pred.shape != target.shape or pred.ndim != 2 or pred.shape[1] != len(ATTRIBUTES):
        raise ValueError(
            f"pred and target must both be (B, {len(ATTRIBUTES)}), got {tuple(pred.shape)}, {tuple(target.shape)}."
        )
    right = pred == target
    out = {"all": right.all(1).float().mean().item()}
    out.update({name: right[:, k].float().mean().item() for k, name in enumerate(ATTRIBUTES)})
    return out


def judge_accuracy(judge: ToyJudge, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """The judge's reading of ``images`` against the attributes their ``prompts`` ask for."""
    return attribute_accuracy(judge.predict(images), prompt_labels(prompts))


def toy_fid(judge: ToyJudge, real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance between the judge's penultimate features of ``real`` and ``fake`` (torchmetrics).

    ``|mu_r - mu_f|^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2))`` over ``JudgeFeatures``.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    for name, x in (("real", real), ("fake", fake)):
        if x.ndim != 4 or x.shape[0] < 2:
            raise ValueError(f"{name} images must be (B >= 2, 3, H, W), got {tuple(x.shape)}.")
    fid = FrechetInceptionDistance(feature=JudgeFeatures(judge), normalize=True)
    fid.update(real.float().clamp(0, 1), real=True)
    fid.update(fake.float().clamp(0, 1), real=False)
    return float(fid.compute())


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1]: ``10 log10(1 / mean((a - b)^2))``."""
    if a.shape != b.shape:
        raise ValueError(f"images to compare must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return 10.0 * torch.log10(1.0 / mse)


def other_noise_partner(prompts: Sequence[str]) -> list[int]:
    """For each row, another row with the same prompt (the next one, cyclically), else the next row."""
    n = len(prompts)
    if n < 2:
        raise ValueError("same-noise agreement needs at least 2 images.")
    out = []
    for i, p in enumerate(prompts):
        j = next((k % n for k in range(i + 1, i + n) if prompts[k % n] == p), (i + 1) % n)
        out.append(j)
    return out


def same_noise_agreement(images: torch.Tensor, reference: torch.Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """Mean PSNR of ``images[i]`` vs ``reference[i]`` (same noise) and vs ``reference[j]`` (other noise, same prompt).

    The second figure is the floor: what two unrelated samples of the prompt share. A student that
    learned the teacher's ODE lies well above it.
    """
    partner = other_noise_partner(prompts)
    same = psnr(images, reference).mean().item()
    other = psnr(images, reference[partner]).mean().item()
    return {"same_noise_psnr": same, "different_noise_psnr": other, "gap_db": same - other}
