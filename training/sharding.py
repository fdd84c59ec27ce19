"""The student's weights when a process holds only part of them (FSDP), and the full weights the rest needs.

Under FSDP (``configs/accelerate/fsdp.yaml``, FSDP2) ``accelerator.prepare`` shards the student in place: each
parameter becomes a ``DTensor`` of which a process holds one slice, and the blocks gather their weights for each
forward. DDP and DeepSpeed ZeRO-2 leave every process a full copy. What needs the whole student goes through the
functions here, which do nothing special when nothing is sharded:

- the EMA is sharded like the student (:func:`shard_ema`), so ``ema.step`` works slice by slice;
- checkpoints, validation and the export read full weights, gathered by every process together
  (``accelerator.get_state_dict``, ``DTensor.full_tensor``) into an unsharded copy on the main process
  (:func:`gathered_student`, :func:`gathered_ema`, :func:`sampling_weights`).

Calls marked "every process" are collectives under FSDP: every process must make them, in the same order.
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


def gathered_student(accelerator: Any, student: Any) -> Any | None:
    """Every process: the student with full weights on the main process, None on the others.

    Unsharded (one process, DDP, DeepSpeed ZeRO-2): the unwrapped training module itself. Sharded (FSDP): a new
    unsharded model of the same class and config holding the state ``accelerator.get_state_dict`` gathers (a
    collective; the full state lands on the main process), on ``accelerator.device``, in train mode.
    """
    unet = accelerator.unwrap_model(student)
    if not is_sharded(unet):
        return unet if accelerator.is_main_process else None
    state = accelerator.get_state_dict(student)
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

    Unsharded, this is the unwrapped training module with the EMA swapped in and back out (no copy). Sharded, it is
    the gathered copy (:func:`gathered_student`) with the gathered EMA weights copied in.
    """
    unet = accelerator.unwrap_model(student)
    if is_sharded(unet):
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
