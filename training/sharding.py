"""The student's weights when a process holds only part of them (FSDP) or half-precision copies of them (DeepSpeed
bf16/fp16), and the full float32 weights the rest needs.

Under FSDP (``configs/accelerate/fsdp.yaml``, FSDP2) ``accelerator.prepare`` shards the student in place: each
parameter becomes a ``DTensor`` of which a process holds one slice, and the blocks gather their weights for each
forward. DDP and DeepSpeed ZeRO-2 leave every process a full copy, but DeepSpeed's bf16 mode casts it to bf16 and
keeps the float32 weights in its optimizer. What needs the whole student goes through the functions here, which do
nothing special when the module holds the float32 weights:

- the EMA is sharded like the student (:func:`shard_ema`), so ``ema.step`` works slice by slice (under DeepSpeed
  bf16 it averages the bf16 copies, in float32);
- checkpoints, validation and the export read full float32 weights, gathered by every process together
  (``accelerator.get_state_dict``, ``DTensor.full_tensor``, DeepSpeed's ``safe_get_full_fp32_param``) into a copy
  on the main process (:func:`gathered_student`, :func:`gathered_ema`, :func:`sampling_weights`).

Calls marked "every process" are collectives there: every process must make them, in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a slice of a tensor spread over processes)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether any parameter of ``module`` is a ``DTensor`` (FSDP2 after ``accelerator.prepare``)."""
    return any(is_dtensor(p) for p in module.parameters())


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This process's slice of a ``DTensor``; any other tensor as it is. No communication."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a ``DTensor``'s slices gathered (every process), any other tensor as it is."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def shard_like(tensors: Iterable[torch.Tensor], like: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Each full tensor of ``tensors`` cut the way its counterpart in ``like`` is (same mesh and placements), on
    that counterpart's device; unchanged where the counterpart is not a ``DTensor``. Every process holds the full
    tensors, so each keeps its own slice and nothing is sent (``src_data_rank=None``)."""
    from torch.distributed.tensor import distribute_tensor

    tensors, like = list(tensors), list(like)
    if len(tensors) != len(like):
        raise ValueError(f"{len(tensors)} tensors cannot be sharded like {len(like)}: the EMA is of another model.")
    out = []
    for tensor, ref in zip(tensors, like):
        if is_dtensor(ref):
            if tuple(tensor.shape) != tuple(ref.shape):
                raise ValueError(f"A tensor of shape {tuple(tensor.shape)} cannot be sharded like {tuple(ref.shape)}.")
            tensor = distribute_tensor(tensor.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)
        out.append(tensor)
    return out


def shard_ema(ema: Any, parameters: Iterable[torch.nn.Parameter]) -> None:
    """Shard the EMA's shadow weights like the student's ``parameters`` (after ``accelerator.prepare``), so that
    ``ema.step(student.parameters())`` averages slice by slice; nothing changes when the student is not sharded."""
    ema.shadow_params = shard_like(ema.shadow_params, parameters)


def _unsharded_class(module: torch.nn.Module) -> type:
    """The model class FSDP2 derived its ``FSDP<Name>`` class from (``UNet2DConditionModel``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def half_precision_copies(accelerator: Any, module: torch.nn.Module) -> bool:
    """Whether ``module`` trains on half-precision copies whose float32 weights live in DeepSpeed's optimizer
    (DeepSpeed's bf16/fp16 mode casts the module; accelerate's own mixed precision keeps float32 weights). A LoRA
    adapter (peft) is left as it is: its copy cannot be rebuilt from the config."""
    return (
        accelerator.distributed_type == "DEEPSPEED"
        and getattr(module, "peft_config", None) is None
        and any(p.requires_grad and p.dtype != torch.float32 for p in module.parameters())
    )


def full_weights_elsewhere(accelerator: Any, module: torch.nn.Module) -> bool:
    """Whether the full float32 weights of ``module`` must be gathered: sharded (FSDP) or half-precision copies."""
    return is_sharded(module) or half_precision_copies(accelerator, module)


def _deepspeed_float32_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state with DeepSpeed's float32 weights (``safe_get_full_fp32_param``, a collective under ZeRO)
    in place of its half-precision trainable parameters."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {name: t.detach().float() for name, t in module.state_dict().items()}
    for name, param in module.named_parameters():
        if param.requires_grad:
            state[name] = safe_get_full_fp32_param(param).detach()
    return state


def gathered_student(accelerator: Any, student: Any) -> Any | None:
    """Every process: the student with full float32 weights on the main process, None on the others.

    Usually (one process, DDP, DeepSpeed in float32) the unwrapped training module itself. Sharded (FSDP): a new
    unsharded model of the same class and config holding the state ``accelerator.get_state_dict`` gathers (a
    collective; the full state lands on the main process). DeepSpeed bf16/fp16: the same, holding DeepSpeed's
    float32 weights instead of the module's half-precision copies. The copy is on ``accelerator.device``, in the
    module's train/eval mode.
    """
    unet = accelerator.unwrap_model(student)
    if is_sharded(unet):
        state = accelerator.get_state_dict(student)
    elif half_precision_copies(accelerator, unet):
        state = _deepspeed_float32_state(unet)
    else:
        return unet if accelerator.is_main_process else None
    if not accelerator.is_main_process:
        return None
    with torch.device("meta"):  # no weights are initialised: the gathered ones are assigned below
        copy = _unsharded_class(unet).from_config(unet.config)
    copy.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in (*copy.named_parameters(), *copy.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"The gathered student has no values for {left[:3]}: they are not in its state dict.")
    return copy.to(accelerator.device).train(unet.training)


def gathered_ema(accelerator: Any, ema: Any) -> Any | None:
    """Every process: on the main process an EMA whose shadow weights are full tensors (``ema`` itself when they
    are not sharded; else a copy, gathered with ``DTensor.full_tensor``), None on the others."""
    if not any(is_dtensor(s) for s in ema.shadow_params):
        return ema if accelerator.is_main_process else None
    shadows = [full_tensor(s) for s in ema.shadow_params]
    if not accelerator.is_main_process:
        return None
    full = type(ema)(shadows, model_cls=ema.model_cls, model_config=ema.model_config, foreach=ema.foreach)
    full.load_state_dict({k: v for k, v in ema.state_dict().items() if k != "shadow_params"})
    return full


@contextmanager
def sampling_weights(accelerator: Any, student: Any, ema: Any | None = None) -> Iterator[Any | None]:
    """Every process: the student to sample or export, in eval mode with its EMA weights when ``ema`` is given, on
    the main process (None on the others); afterwards the training weights and mode are as they were.

    Usually this is the unwrapped training module with the EMA swapped in and back out (no copy). Sharded, or as
    DeepSpeed's half-precision copies, it is the gathered float32 copy (:func:`gathered_student`) with the
    gathered EMA weights copied in.
    """
    unet = accelerator.unwrap_model(student)
    if full_weights_elsewhere(accelerator, unet):
        copy = gathered_student(accelerator, student)
        full_ema = gathered_ema(accelerator, ema) if ema is not None else None
        if copy is not None and full_ema is not None:
            full_ema.copy_to(copy.parameters())
        yield None if copy is None else copy.eval()
        return
    if not accelerator.is_main_process:
        yield None
        return
    was_training = unet.training
    unet.eval()
    if ema is not None:
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
    try:
        yield unet
    finally:
        if ema is not None:
            ema.restore(unet.parameters())
        unet.train(was_training)
