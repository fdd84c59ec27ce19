"""The distillation objective, one formula per function (DESIGN.md sections 2 to 5).

For real latents x0, noise eps and sigma from the training sampler:

    x_sigma = (1 - sigma) x0 + sigma eps                          (flow state, flow.flow_state)
    v*      = EpsilonToFlowUNet.velocity(x_sigma, sigma, c)       (one teacher forward, flow.bridge)
    v       = student(x_sigma, flow_timestep(sigma), c)           (input unscaled, float timestep)
    L_flow  = mean_i  w(sigma_i) * mean_pixels (v_i - v*_i)^2
    KD_b    = mean_i  (1 - cos(f^S_{b,i}, f^T_{b,i}))             (pooled block features, same forwards)
    L       = L_flow + kd_weight sum_b w_b KD_b + block_penalty_weight sum_b lambda_b KD_b

Reflow (``reflow_loss``, docs/reflow.md) on a pair (z, x0_hat) from a model's ODE: the same L_flow with

    x_sigma = (1 - sigma) x0_hat + sigma z,   target v = z - x0_hat   (flow.reflow_target)

and the block KD against the teacher only when its weights are non-zero (off by default for reflow).

``lambda_b`` comes from a ``BlockPenalty`` and carries no gradient. The target is the teacher's
velocity v*, never DDPM's v-prediction ``a_t eps - s_t x0`` (the earlier work's fault).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flow_lune.flow import EpsilonToFlowUNet, flow_state, flow_timestep, loss_weight, reflow_target
from flow_lune.settings import BLOCK_PENALTY_WEIGHT, KD_WEIGHT

from .block_features import BASE_BLOCK_WEIGHTS, BLOCK_NAMES, BlockFeatureHooks
from .block_penalty import BlockPenalty, BlockWeights


@dataclass
class ObjectiveConfig:
    """Weights of the loss terms (DESIGN.md section 5)."""

    loss_weighting: str = "none"  # per-sample weight w(sigma) of the flow MSE; "none" = plain MSE
    kd_weight: float = KD_WEIGHT  # weight of the base-weighted block KD
    block_penalty_weight: float = BLOCK_PENALTY_WEIGHT  # weight of the lambda-weighted block KD
    base_weights: Sequence[float] = BASE_BLOCK_WEIGHTS  # w_b


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mse_i = mean over all but the batch dim of (pred_i - target_i)^2``, in float32: (B,)."""
    diff = pred.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)


def flow_matching_loss(
    v_pred: torch.Tensor, v_target: torch.Tensor, sigma: torch.Tensor, scheme: str = "none"
) -> torch.Tensor:
    """``L_flow = mean_i w(sigma_i) * mse_i`` with ``w`` from ``flow.loss_weight(scheme, sigma)``."""
    weight = loss_weight(scheme, sigma.float()).reshape(-1)
    return (weight * per_sample_mse(v_pred, v_target)).mean()


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - cos(a_i, b_i)`` per row of two (B, C) tensors, in float32: (B,)."""
    return 1 - F.cosine_similarity(a.float(), b.float(), dim=1)


def block_kd(student_pooled: Sequence[torch.Tensor], teacher_pooled: Sequence[torch.Tensor]) -> torch.Tensor:
    """``KD_b = mean_i (1 - cos(f^S_{b,i}, f^T_{b,i}))`` for each block: (num_blocks,)."""
    if len(student_pooled) != len(teacher_pooled):
        raise ValueError(f"{len(student_pooled)} student blocks but {len(teacher_pooled)} teacher blocks.")
    return torch.stack([cosine_distance(s, t.detach()).mean() for s, t in zip(student_pooled, teacher_pooled)])


def total_loss(
    flow_loss: torch.Tensor,
    kd: torch.Tensor,
    base_weights: torch.Tensor,
    lam: torch.Tensor,
    kd_weight: float,
    block_penalty_weight: float,
) -> torch.Tensor:
    """``L = L_flow + kd_weight * sum_b w_b KD_b + block_penalty_weight * sum_b lambda_b KD_b`` (lambda detached)."""
    base_weights = base_weights.to(kd)
    lam = lam.detach().to(kd)
    return flow_loss + kd_weight * (base_weights * kd).sum() + block_penalty_weight * (lam * kd).sum()


@dataclass
class DistillationOutput:
    """The loss of one batch and its parts, for logging."""

    loss: torch.Tensor  # scalar, differentiable
    flow_loss: torch.Tensor  # scalar, differentiable
    kd: torch.Tensor  # (9,) KD_b, differentiable
    block_weights: BlockWeights  # lambda_b (and e_t, e_p, coh from an assessor)
    v_pred: torch.Tensor  # the student's velocity
    v_target: torch.Tensor  # v*, no grad


def student_velocity(
    student: nn.Module, x_sigma: torch.Tensor, sigma: torch.Tensor, encoder_hidden_states: torch.Tensor
) -> torch.Tensor:
    """``v = student(x_sigma, flow_timestep(sigma), c)``, fed in the dtype of the student's trainable weights.

    That dtype is float32 under accelerate's own mixed precision (DDP, FSDP: float32 weights, autocast or FSDP's
    policy makes the bf16 copies), so nothing is cast; DeepSpeed's bf16/fp16 mode casts the weights themselves
    and not the inputs, which then must be cast here (a float32 input fails in the first layer)."""
    dtype = next((p.dtype for p in student.parameters() if p.requires_grad), x_sigma.dtype)
    cond = encoder_hidden_states.to(dtype) if torch.is_tensor(encoder_hidden_states) else encoder_hidden_states
    return student(x_sigma.to(dtype), flow_timestep(sigma), cond, return_dict=False)[0]


def _block_kd_terms(
    flow: torch.Tensor,
    student_pooled: list[torch.Tensor],
    teacher_pooled: list[torch.Tensor],
    sigma: torch.Tensor,
    block_penalty: BlockPenalty,
    config: ObjectiveConfig,
) -> tuple[torch.Tensor, torch.Tensor, BlockWeights]:
    """``KD_b``, ``lambda_b`` (no grad) and ``L = L_flow + kd_weight sum_b w_b KD_b + block_penalty_weight
    sum_b lambda_b KD_b`` from the pooled block features of one student and one teacher forward."""
    kd = block_kd(student_pooled, teacher_pooled)
    with torch.no_grad():
        weights = block_penalty(
            [s.detach().float() for s in student_pooled], [t.float() for t in teacher_pooled], sigma
        )
    base = torch.as_tensor(list(config.base_weights), dtype=torch.float32)
    loss = total_loss(flow, kd, base, weights.lam, config.kd_weight, config.block_penalty_weight)
    return loss, kd, weights


def distillation_loss(
    student: nn.Module,
    teacher: EpsilonToFlowUNet,
    student_hooks: BlockFeatureHooks,
    teacher_hooks: BlockFeatureHooks,
    x0: torch.Tensor,
    eps: torch.Tensor,
    sigma: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    block_penalty: BlockPenalty,
    config: ObjectiveConfig,
) -> DistillationOutput:
    """One batch of the objective above. ``student`` may be the accelerate-wrapped model; the hooks sit on the
    unwrapped student and on the teacher's UNet and capture the features of these same two forwards. The teacher
    runs in its own dtype (the mixed-precision dtype); ``v*`` is formed in float32."""
    sigma = sigma.float()
    x_sigma = flow_state(x0.float(), eps.float(), sigma.reshape(-1))
    with torch.no_grad():
        v_target = teacher.velocity(x_sigma, sigma, encoder_hidden_states)
    teacher_pooled = teacher_hooks.features
    v_pred = student_velocity(student, x_sigma, sigma, encoder_hidden_states)
    student_pooled = student_hooks.features
    flow = flow_matching_loss(v_pred, v_target, sigma, config.loss_weighting)
    loss, kd, weights = _block_kd_terms(flow, student_pooled, teacher_pooled, sigma, block_penalty, config)
    student_hooks.clear()
    teacher_hooks.clear()
    return DistillationOutput(loss=loss, flow_loss=flow, kd=kd, block_weights=weights, v_pred=v_pred, v_target=v_target)


def uses_kd(config: ObjectiveConfig) -> bool:
    """Whether the block KD enters the loss (a teacher forward is needed for its features)."""
    return config.kd_weight > 0 or config.block_penalty_weight > 0


def reflow_loss(
    student: nn.Module,
    teacher: EpsilonToFlowUNet,
    student_hooks: BlockFeatureHooks,
    teacher_hooks: BlockFeatureHooks,
    x0_hat: torch.Tensor,
    z: torch.Tensor,
    sigma: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    block_penalty: BlockPenalty,
    config: ObjectiveConfig,
) -> DistillationOutput:
    """One batch of reflow: ``x_sigma = (1 - sigma) x0_hat + sigma z``, ``L_flow`` against ``v = z - x0_hat``.

    The block KD (and ``lambda_b``) is computed, from one teacher forward at ``x_sigma``, only when
    ``uses_kd(config)``; otherwise the teacher does not run, ``KD_b = 0`` and ``lambda_b = 0`` are logged."""
    sigma = sigma.float()
    x0_hat, z = x0_hat.float(), z.float()
    x_sigma = flow_state(x0_hat, z, sigma.reshape(-1))
    v_target = reflow_target(x0_hat, z)
    kd_on = uses_kd(config)
    if kd_on:
        with torch.no_grad():
            teacher.velocity(x_sigma, sigma, encoder_hidden_states)  # for the block features the hooks capture
        teacher_pooled = teacher_hooks.features
    v_pred = student_velocity(student, x_sigma, sigma, encoder_hidden_states)
    student_pooled = student_hooks.features
    flow = flow_matching_loss(v_pred, v_target, sigma, config.loss_weighting)
    if kd_on:
        loss, kd, weights = _block_kd_terms(flow, student_pooled, teacher_pooled, sigma, block_penalty, config)
    else:
        kd = torch.zeros(len(BLOCK_NAMES), device=flow.device)
        weights = BlockWeights(lam=torch.zeros(len(BLOCK_NAMES), device=flow.device))
        loss = flow
    student_hooks.clear()
    teacher_hooks.clear()
    return DistillationOutput(loss=loss, flow_loss=flow, kd=kd, block_weights=weights, v_pred=v_pred, v_target=v_target)
