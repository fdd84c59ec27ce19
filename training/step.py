"""One training step of the distillation, as ``train_flow_distill.py`` and ``bench/bench_train_step.py`` run it.

Per micro-batch (``DistillationStep.__call__``): draw sigma, noise and the prompt-dropout mask from the counter-based
streams of the batch position, compute the objective (``objective.distillation_loss``), and, when the loss is finite
on every process, backpropagate, clip at the accumulation boundary and add the loss terms to the metric sums. A
non-finite loss on any process skips the whole optimizer step on every process. At each optimizer-step boundary
``end_update`` counts skipped steps and stops the run after ``max_nonfinite_steps`` in a row.

``ReflowStep`` is the same step on reflow pairs (``--objective reflow``): only ``loss`` differs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from flow_lune.flow import EpsilonToFlowUNet

from .block_features import BLOCK_NAMES, BlockFeatureHooks
from .block_penalty import BlockPenalty
from .data import drop_prompts
from .objective import DistillationOutput, ObjectiveConfig, distillation_loss, reflow_loss
from .seeds import RandomStreams

logger = logging.getLogger(__name__)


@dataclass
class DistillationStep:
    """What one step needs, and the state it carries between micro-batches and logging intervals.

    ``student``, ``optimizer`` and ``lr_scheduler`` are accelerate-prepared; the hooks sit on the unwrapped student
    and on the teacher's UNet. ``sums`` holds (loss, flow loss, KD_b) summed over the finite micro-batches since
    the last ``take_means``.
    """

    accelerator: Any
    student: torch.nn.Module
    teacher: EpsilonToFlowUNet
    student_hooks: BlockFeatureHooks
    teacher_hooks: BlockFeatureHooks
    block_penalty: BlockPenalty
    objective: ObjectiveConfig
    sigma_sampler: Any  # SigmaSampler or AdaptiveSigmaSampler: anything with sample(batch_size, generator)
    streams: RandomStreams
    optimizer: Any
    lr_scheduler: Any
    empty_prompt_embeds: torch.Tensor  # (77, D) the "" embedding for prompt dropout
    uncond_prob: float  # probability of the empty prompt per row (--uncond_prob)
    max_grad_norm: float  # gradient clipping at accumulation boundaries; 0 disables it (--max_grad_norm)
    max_nonfinite_steps: int  # skipped optimizer steps in a row that stop the run (--max_nonfinite_steps)
    sums: torch.Tensor = field(init=False)
    micro_batches: int = field(init=False, default=0)
    last_out: DistillationOutput | None = field(init=False, default=None)
    skipped_steps: int = field(init=False, default=0)
    nonfinite_in_a_row: int = field(init=False, default=0)
    bad_update: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.sums = torch.zeros(2 + len(BLOCK_NAMES), device=self.accelerator.device)

    def __call__(self, batch: dict, epoch: int, batch_index: int) -> DistillationOutput:
        """One micro-batch at position ``(epoch, batch_index)``: loss, gated backward, optimizer and lr steps."""
        acc = self.accelerator
        with acc.accumulate(self.student):
            out = self.loss(batch, epoch, batch_index)
            finite = torch.isfinite(out.loss.detach()).float().reshape(1)
            if acc.num_processes > 1:
                finite = acc.gather(finite).min().reshape(1)
            if bool(finite.item()):
                acc.backward(out.loss)
                if acc.sync_gradients and self.max_grad_norm > 0:
                    acc.clip_grad_norm_(self.student.parameters(), self.max_grad_norm)
                self.sums += torch.cat([out.loss.detach()[None], out.flow_loss.detach()[None], out.kd.detach()])
                self.micro_batches += 1
                self.last_out = out
            else:
                self.bad_update = True  # every process skips the whole optimizer step
            if acc.sync_gradients and not self.bad_update:
                self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return out

    def inputs(self, batch: dict, epoch: int, batch_index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x0, sigma, prompt_embeds)`` of a batch on the device: sigma from the ``sigma`` stream, prompt dropout
        from the ``dropout`` stream of the batch position."""
        acc = self.accelerator
        x0 = batch["latents"].to(acc.device, torch.float32)
        prompt_embeds = batch["prompt_embeds"].to(acc.device, torch.float32)
        sigma = self.sigma_sampler.sample(x0.shape[0], self.streams.generator("sigma", epoch, batch_index))
        dropout = self.streams.generator("dropout", epoch, batch_index)
        prompt_embeds = drop_prompts(prompt_embeds, self.empty_prompt_embeds, self.uncond_prob, dropout)
        return x0, sigma.to(acc.device), prompt_embeds

    def loss(self, batch: dict, epoch: int, batch_index: int) -> DistillationOutput:
        """The distillation objective of one micro-batch; eps from the ``noise`` stream of the batch position."""
        x0, sigma, prompt_embeds = self.inputs(batch, epoch, batch_index)
        eps = torch.randn(x0.shape, generator=self.streams.generator("noise", epoch, batch_index)).to(x0.device)
        return distillation_loss(
            self.student, self.teacher, self.student_hooks, self.teacher_hooks, x0, eps, sigma, prompt_embeds,
            self.block_penalty, self.objective,
        )  # fmt: skip

    def end_update(self, global_step: int) -> bool:
        """At an optimizer-step boundary: whether the update was taken; counts skipped ones, stops after too many."""
        taken = not self.bad_update
        self.bad_update = False
        if taken:
            self.nonfinite_in_a_row = 0
            return True
        self.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        logger.warning(f"Non-finite loss at step {global_step}: optimizer step skipped ({self.skipped_steps} so far).")
        if self.nonfinite_in_a_row >= self.max_nonfinite_steps:
            raise RuntimeError(
                f"{self.nonfinite_in_a_row} non-finite losses in a row (step {global_step}); stopping. Lower "
                "--learning_rate, use --mixed_precision bf16 instead of fp16, or check the data."
            )
        return False

    def take_means(self) -> torch.Tensor:
        """(loss, flow loss, KD_b...) averaged over the finite micro-batches and the processes; resets the sums."""
        means = self.accelerator.reduce(self.sums / max(self.micro_batches, 1), reduction="mean")
        self.sums.zero_()
        self.micro_batches = 0
        return means


@dataclass
class ReflowStep(DistillationStep):
    """``DistillationStep`` on reflow pairs (``--objective reflow``): the same gating, sums, accumulation and
    streams; the batch brings its own noise ``z`` (``batch["noise"]``) and the target is the straight line
    ``z - x0_hat`` (``objective.reflow_loss``). The teacher runs only when a KD weight is non-zero."""

    def loss(self, batch: dict, epoch: int, batch_index: int) -> DistillationOutput:
        x0_hat, sigma, prompt_embeds = self.inputs(batch, epoch, batch_index)
        z = batch["noise"].to(x0_hat.device, torch.float32)
        return reflow_loss(
            self.student, self.teacher, self.student_hooks, self.teacher_hooks, x0_hat, z, sigma, prompt_embeds,
            self.block_penalty, self.objective,
        )  # fmt: skip
