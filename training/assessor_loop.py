"""The loops of ``train_assessor.py`` (docs/math.md, the assessor): k-means data, the training step, the profile.

``teacher_states`` draws x0 and prompt embeddings from the dataset; ``teacher_features_at`` turns them into the
teacher's pooled block features at a flow state. ``pooled_teacher_features`` gathers the features that set the
assessor's statistics and k-means patterns, ``AssessorStep`` is one optimizer step on a batch of two views, and
``profile_assessor`` measures the trained assessor over evenly filled sigma bins. Each draws from its generator
in a fixed order, so a seed gives the same assessor bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from flow_lune.flow import SigmaSampler, flow_state

from .assessor import Assessor
from .assessor_training import AssessorTrainingConfig, TeacherBlockFeatures, assessor_loss, make_views
from .data import collate, drop_prompts
from .profile import AssessorProfile, ProfileAccumulator, stratified_sigmas


def teacher_states(
    dataset: Sequence[dict],
    indices: torch.Tensor,
    sigma: torch.Tensor,
    generator: torch.Generator,
    uncond_prob: float,
    empty_embeds: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x0 and prompt embeddings of ``indices`` with seeded prompt dropout; sigma as given."""
    batch = collate([dataset[int(i)] for i in indices])
    return batch["latents"], drop_prompts(batch["prompt_embeds"], empty_embeds, uncond_prob, generator), sigma


def teacher_features_at(
    features: TeacherBlockFeatures,
    x0: torch.Tensor,
    embeds: torch.Tensor,
    sigma: torch.Tensor,
    generator: torch.Generator,
    device: torch.device | str,
) -> list[torch.Tensor]:
    """Pooled teacher block features at ``x_sigma = (1 - sigma) x0 + sigma eps``, eps drawn from ``generator``."""
    x0 = x0.to(device)
    eps = torch.randn(x0.shape, generator=generator).to(x0)
    x_sigma = flow_state(x0, eps, sigma.to(x0.device))
    return features(x_sigma, sigma.to(x0.device), embeds.to(device))


def teacher_feature_batches(
    features: TeacherBlockFeatures,
    dataset: Sequence[dict],
    indices: torch.Tensor,
    sigmas: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    uncond_prob: float,
    empty_embeds: torch.Tensor,
    device: torch.device | str,
    desc: str,
    show_progress: bool = True,
) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """``(pooled teacher block features, sigma)`` per batch of the seeded states ``(indices, sigmas)``; each batch
    draws its prompt dropout, then its noise, from ``generator``."""
    for start in tqdm(range(0, len(indices), batch_size), desc=desc, disable=not show_progress):
        part = slice(start, start + batch_size)
        x0, embeds, s = teacher_states(dataset, indices[part], sigmas[part], generator, uncond_prob, empty_embeds)
        yield teacher_features_at(features, x0.float(), embeds, s, generator, device), s


def pooled_teacher_features(
    features: TeacherBlockFeatures,
    dataset: Sequence[dict],
    sampler: SigmaSampler,
    num_samples: int,
    batch_size: int,
    generator: torch.Generator,
    uncond_prob: float,
    empty_embeds: torch.Tensor,
    device: torch.device | str,
    show_progress: bool = True,
) -> list[torch.Tensor]:
    """Teacher features (N, C_b) per block at ``num_samples`` seeded states, for ``initialise_from_features``.

    Draws the dataset indices, then the sigmas, then per batch the prompt dropout and the noise, all from
    ``generator``: the same states on every process, so no communication.
    """
    idx = torch.randint(len(dataset), (num_samples,), generator=generator)
    sig = sampler.sample(num_samples, generator)
    batches = teacher_feature_batches(
        features, dataset, idx, sig, batch_size, generator, uncond_prob, empty_embeds, device,
        desc="Clustering teacher features", show_progress=show_progress,
    )  # fmt: skip
    pooled: list[list[torch.Tensor]] = []
    for feats, _ in batches:
        if not pooled:
            pooled = [[] for _ in feats]
        for b, f in enumerate(feats):
            pooled[b].append(f.cpu())
    return [torch.cat(p) for p in pooled]


@dataclass
class AssessorStep:
    """One assessor optimizer step on a batch: prompt dropout, sigma, two views, teacher features, loss, update.

    ``model``, ``optimizer`` and ``lr_scheduler`` are accelerate-prepared; ``assessor`` is the unwrapped model
    (its config and pattern labels). ``generator`` draws, in this order, the dropout mask, sigma and the views'
    noise.
    """

    accelerator: Any
    assessor: Assessor
    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    features: TeacherBlockFeatures
    sampler: SigmaSampler
    training_config: AssessorTrainingConfig
    empty_embeds: torch.Tensor
    uncond_prob: float
    generator: torch.Generator

    def __call__(self, batch: dict) -> dict[str, float] | None:
        """Train on ``batch``; the log dict (losses, timestep accuracy), or None for a batch of one (no negatives)."""
        x0 = batch["latents"].float()
        if len(x0) < 2:
            return None  # a last batch of one has no negatives
        embeds = drop_prompts(batch["prompt_embeds"], self.empty_embeds, self.uncond_prob, self.generator)
        sigma = self.sampler.sample(len(x0), self.generator).to(x0.device)
        views = make_views(x0, sigma, self.training_config, self.generator)
        both = self.features(
            torch.cat([views.x_sigma1, views.x_sigma2]),
            torch.cat([views.sigma1, views.sigma2]),
            torch.cat([embeds, embeds]),
        )
        n = len(x0)
        with self.accelerator.accumulate(self.model):
            loss = assessor_loss(
                self.assessor,
                [f[:n] for f in both],
                [f[n:] for f in both],
                views.sigma1,
                views.sigma2,
                self.training_config,
                model=self.model,
            )
            self.accelerator.backward(loss.total)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        return {
            "loss": loss.total.item(),
            "timestep_ce": loss.timestep.item(),
            "pattern_ce": loss.pattern.item(),
            "contrastive": loss.contrastive.item(),
            "timestep_acc": loss.timestep_accuracy.item(),
        }


def train_assessor_steps(
    step_fn: AssessorStep, dataloader: Any, max_train_steps: int, logging_steps: int, show_progress: bool = True
) -> int:
    """Run ``step_fn`` over epochs of ``dataloader`` until ``max_train_steps`` steps; log every ``logging_steps``.

    Returns the number of steps taken (``max_train_steps``).
    """
    accelerator = step_fn.accelerator
    progress = tqdm(range(max_train_steps), desc="Assessor steps", disable=not show_progress)
    step = 0
    while step < max_train_steps:
        for batch in dataloader:
            logs = step_fn(batch)
            if logs is None:
                continue
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss']:.3f}", acc=f"{logs['timestep_acc']:.2f}")
            if step % logging_steps == 0 or step == max_train_steps:
                accelerator.log({**logs, "lr": step_fn.lr_scheduler.get_last_lr()[0]}, step=step)
            if step >= max_train_steps:
                break
    progress.close()
    return step


def profile_assessor(
    assessor: Assessor,
    features: TeacherBlockFeatures,
    dataset: Sequence[dict],
    num_samples: int,
    batch_size: int,
    generator: torch.Generator,
    uncond_prob: float,
    empty_embeds: torch.Tensor,
    device: torch.device | str,
) -> AssessorProfile:
    """The assessor's profile over ``num_samples`` teacher states spread evenly over its sigma bins.

    Draws the stratified sigmas, then the dataset indices, then per batch the prompt dropout and the noise,
    all from ``generator``.
    """
    sigmas = stratified_sigmas(num_samples, assessor.config.num_bins, generator)
    idx = torch.randint(len(dataset), (num_samples,), generator=generator)
    acc = ProfileAccumulator(assessor)
    batches = teacher_feature_batches(
        features, dataset, idx, sigmas, batch_size, generator, uncond_prob, empty_embeds, device, desc="Profiling"
    )
    for feats, s in batches:
        acc.update(feats, s)
    return acc.result()
