"""Toy-world metrics: attribute accuracy from the judge, toy FID on its features, same-noise agreement.

Images are float tensors in [0, 1], (B, 3, H, W).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


FEATURE_BATCH = 256  # images per feature forward: the judge's activations for 38400 images at once need 40 GB


def update_in_batches(metric: Any, images: torch.Tensor, real: bool) -> None:
    """``metric.update`` in batches of ``FEATURE_BATCH`` images (the states are sums, so the result is the same)."""
    for start in range(0, images.shape[0], FEATURE_BATCH):
        metric.update(images[start : start + FEATURE_BATCH], real=real)


def toy_fid(judge: ToyJudge, real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance between the judge's penultimate features of ``real`` and ``fake`` (torchmetrics).

    ``|mu_r - mu_f|^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2))`` over ``JudgeFeatures``.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    for name, x in (("real", real), ("fake", fake)):
        if x.ndim != 4 or x.shape[0] < 2:
            raise ValueError(f"{name} images must be (B >= 2, 3, H, W), got {tuple(x.shape)}.")
    fid = FrechetInceptionDistance(feature=JudgeFeatures(judge), normalize=True)
    update_in_batches(fid, real, real=True)
    update_in_batches(fid, fake, real=False)
    return float(fid.compute())


def jackknife_se(leave_one_out: Sequence[float]) -> float:
    """Delete-a-group jackknife standard error of a statistic from its K leave-one-group-out values ``t_k``.

    ``se = sqrt((K - 1) / K * sum_k (t_k - mean_k t_k)^2)`` (Efron and Tibshirani 1993, chapter 11).
    """
    k = len(leave_one_out)
    if k < 2:
        raise ValueError(f"the jackknife needs at least 2 leave-one-out values, got {k}.")
    t = torch.tensor(leave_one_out, dtype=torch.float64)
    return float(((k - 1) / k * ((t - t.mean()) ** 2).sum()).sqrt())


class GroupedFID:
    """Frechet distances of image sets against one real set, each with its delete-a-group jackknife error.

    The real images and every generated set are cut into ``groups`` contiguous groups (``torch.tensor_split``);
    each group's features are kept as a torchmetrics ``FrechetInceptionDistance`` state (sums of features and of
    their outer products), so a distance over any union of groups is torchmetrics' own, from merged states.
    ``score`` gives the distance over all images and the K distances with group ``k`` left out of both sides,
    which ``jackknife_se`` turns into a standard error. Generated sets sampled from the same noise rows are
    grouped alike, so ``ratio`` (one set's distance over another's, minus 1) leaves the same rows out of both:
    its error is that of the paired comparison. ``feature`` is any module torchmetrics accepts (``JudgeFeatures``
    for the toy FID) and gets the images as they are given. The jackknife assumes the distance is smooth in the
    sample; with left-out sets of not many more images than features it is not (the covariances are near
    singular), and the error overstates the spread: ``evaluate.py`` reports errors only from 4 features' widths on.
    """

    def __init__(self, feature: torch.nn.Module, real: torch.Tensor, groups: int = 10) -> None:
        if groups < 1 or real.shape[0] < 2 * groups:
            raise ValueError(f"{groups} groups need at least 2 real images each, got {real.shape[0]} images.")
        self.feature = feature
        self.groups = groups
        self.real = self.states(real, real=True)

    def _metric(self):
        from torchmetrics.image.fid import FrechetInceptionDistance

        return FrechetInceptionDistance(feature=self.feature, normalize=True)

    def states(self, images: torch.Tensor, real: bool = False) -> list:
        """One torchmetrics state per group of ``images`` (on the real or the generated side)."""
        if images.shape[0] < 2 * self.groups:
            raise ValueError(f"{self.groups} groups need at least 2 images each, got {images.shape[0]} images.")
        out = []
        for chunk in torch.tensor_split(images, self.groups):
            metric = self._metric()
            update_in_batches(metric, chunk, real=real)
            out.append(metric)
        return out

    def _distance(self, fake: list, leave_out: int | None) -> float:
        metric = self._metric()
        for k in range(self.groups):
            if k != leave_out:
                metric.merge_state(self.real[k])
                metric.merge_state(fake[k])
        metric.orig_dtype = fake[0].orig_dtype  # set by update(), which merge_state does not carry over
        return float(metric.compute())

    def score(self, fake: list) -> tuple[float, list[float]]:
        """The distance of generated states ``fake`` (from ``states``) over all groups, and with each group left
        out (none with a single group)."""
        left_out = [self._distance(fake, k) for k in range(self.groups)] if self.groups > 1 else []
        return self._distance(fake, None), left_out

    @staticmethod
    def ratio(scores: tuple[float, list[float]], reference: tuple[float, list[float]]) -> tuple[float, float | None]:
        """``d / d_ref - 1`` from two ``score`` results, and its jackknife standard error (``None`` with one group)."""
        (d, d_k), (r, r_k) = scores, reference
        se = jackknife_se([a / b - 1 for a, b in zip(d_k, r_k)]) if d_k else None
        return d / r - 1, se


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
