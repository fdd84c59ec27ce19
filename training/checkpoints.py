"""Training checkpoints: atomic ``checkpoint-N`` folders, diffusers-layout save/load hooks, the epoch sampler.

A checkpoint is written by ``accelerator.save_state`` into ``checkpoint-N.tmp`` and renamed to
``checkpoint-N`` only once every process has finished writing, so ``latest`` never names a partial one;
old checkpoints beyond ``--checkpoints_total_limit`` are deleted only after that rename.

The save hook writes the student in diffusers layout (``unet/``, loadable by
``UNet2DConditionModel.from_pretrained``; ``unet_lora/`` for LoRA) and the EMA weights (``unet_ema/``), always in
float32 (``sharding``): under FSDP gathered from the processes' slices, under DeepSpeed's bf16 mode read from its
optimizer. accelerate then also writes its own copy, from which it resumes (FSDP: ``pytorch_model_fsdp.bin`` and
``optimizer.bin``; DeepSpeed: ``pytorch_model/``).

The epoch sampler's order is a function of ``(seed, epoch)`` (``seeds.stream_seed``), so with the trainer's
counter-based random streams (``seeds.RandomStreams``) a resumed run continues at the exact batch.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .run_state import CHECKPOINT_PREFIX, checkpoint_step, list_checkpoints  # noqa: F401  (torch-free)
from .seeds import stream_seed

logger = logging.getLogger(__name__)

TMP_SUFFIX = ".tmp"


# ---------------------------------------------------------------- folders


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: ``latest`` -> the newest complete one (None when there is none), or a path."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint).expanduser()
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / path
    if not path.is_dir() or checkpoint_step(path) is None:
        raise ValueError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a complete checkpoint-N folder; "
            f"pass 'latest' or one of {[p.name for p in list_checkpoints(output_dir)]}."
        )
    return path


def check_finite_parameters(model: torch.nn.Module, what: str = "student") -> None:
    """``RuntimeError`` naming the first non-finite parameter: such weights are never saved. Under FSDP each
    process checks its own slice (no communication)."""
    from .sharding import local_part

    for name, param in model.named_parameters():
        if not torch.isfinite(local_part(param.detach())).all():
            raise RuntimeError(f"The {what}'s parameter {name!r} holds NaN/inf; refusing to save non-finite weights.")


def prune_checkpoints(output_dir: str | os.PathLike, total_limit: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints so that at most ``total_limit`` remain; returns the deleted ones."""
    if total_limit is None:
        return []
    found = list_checkpoints(output_dir)
    doomed = found[: max(0, len(found) - total_limit)]
    for path in doomed:
        logger.info("Removing old checkpoint %s (--checkpoints_total_limit %d).", path, total_limit)
        shutil.rmtree(path)
    return doomed


def save_checkpoint(accelerator: Any, output_dir: str | os.PathLike, step: int, total_limit: int | None) -> Path:
    """``accelerator.save_state`` into ``checkpoint-N.tmp``, rename to ``checkpoint-N``, then prune. All processes."""
    final = Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"
    tmp = final.with_name(final.name + TMP_SUFFIX)
    if accelerator.is_main_process:
        if final.exists():
            raise FileExistsError(f"{final} exists already; refusing to overwrite a checkpoint.")
        if tmp.exists():  # left by a run killed while saving: never complete, safe to drop
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(tmp, final)
        prune_checkpoints(output_dir, total_limit)
        logger.info("Saved state to %s", final)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------- accelerate hooks


def register_checkpoint_hooks(accelerator: Any, ema: Any | None = None, lora: bool = False) -> None:
    """Save/load hooks: the student in diffusers layout (``unet/`` or ``unet_lora/``) and EMA (``unet_ema/``).

    For full fine-tuning the hook saves ``unet/`` instead of accelerate's ``model.safetensors`` (one copy of the
    weights) and the load hook reads it back. For LoRA, accelerate keeps its own copy and ``unet_lora/`` holds the
    adapter in diffusers' LoRA format. Under FSDP accelerate saves and loads the sharded student itself (the hook
    gets no model to load), the hook writes ``unet/`` from the gathered weights, and the EMA is gathered to be
    saved and sharded again when loaded. Both hooks run on every process (``save_state``/``load_state`` do).
    """
    from diffusers import UNet2DConditionModel

    from .sharding import gathered_ema, gathered_student, shard_like

    def save_model_hook(models: list, weights: list, output_dir: str) -> None:
        for model in models:
            check_finite_parameters(accelerator.unwrap_model(model))
            if lora:
                if accelerator.is_main_process:
                    save_lora_weights(accelerator.unwrap_model(model), Path(output_dir) / "unet_lora")
            else:
                unet = gathered_student(accelerator, model)  # every process; the full weights on the main one
                if unet is not None:
                    unet.save_pretrained(Path(output_dir) / "unet", safe_serialization=True)
                if weights:
                    weights.pop()
        if ema is not None:
            full_ema = gathered_ema(accelerator, ema)  # every process
            if full_ema is not None:
                full_ema.save_pretrained(str(Path(output_dir) / "unet_ema"))

    def load_model_hook(models: list, input_dir: str) -> None:
        if ema is not None:
            loaded = type(ema).from_pretrained(str(Path(input_dir) / "unet_ema"), model_cls=UNet2DConditionModel)
            sharded_like = ema.shadow_params  # FSDP: DTensor slices, cut the loaded full weights the same way
            ema.load_state_dict(loaded.state_dict())
            ema.shadow_params = shard_like(ema.shadow_params, sharded_like)
            ema.to(accelerator.device)
            del loaded
        if lora:
            return
        while models:
            model = accelerator.unwrap_model(models.pop())
            loaded = UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet")
            model.register_to_config(**loaded.config)
            model.load_state_dict(loaded.state_dict(), strict=True)
            del loaded

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)


def save_lora_weights(unet: torch.nn.Module, folder: Path) -> None:
    """The student's LoRA adapter as ``pytorch_lora_weights.safetensors`` (diffusers' LoRA format)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)


class EpochShuffleSampler(torch.utils.data.Sampler[int]):
    """A random order of ``range(num_samples)`` that is a function of ``(seed, epoch)`` only.

    ``set_epoch`` picks the permutation, so a resumed run sees the same order and, with
    ``accelerator.skip_first_batches``, continues at the exact batch. Every process draws the same
    permutation (accelerate shards the batches).
    """

    def __init__(self, num_samples: int, seed: int):
        if num_samples < 1:
            raise ValueError(f"The training dataset is empty ({num_samples} rows); check the data source.")
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        generator = torch.Generator().manual_seed(stream_seed(self.seed, "data_order", 0, self.epoch, 0))
        yield from torch.randperm(self.num_samples, generator=generator).tolist()


def resume_position(
    accelerator: Any,
    resume_from_checkpoint: str | None,
    output_dir: str | os.PathLike,
    num_update_steps_per_epoch: int,
    gradient_accumulation_steps: int,
    student: Any | None = None,
) -> tuple[int, int, int]:
    """Load the checkpoint ``--resume_from_checkpoint`` names (if any) and return ``(global_step, first_epoch,
    batches to skip in that epoch)``; ``(0, 0, 0)`` for a new run. Refuses to resume below a later checkpoint,
    and from a checkpoint with a truncated file or another UNet's weights (``student`` given), naming the
    previous complete checkpoint."""
    resume_path = resolve_resume(resume_from_checkpoint, output_dir)
    if resume_from_checkpoint and resume_path is None:
        logger.info("No checkpoint in %s to resume from; starting a new run.", output_dir)
    if resume_path is None:
        return 0, 0, 0
    later = [p.name for p in list_checkpoints(output_dir) if checkpoint_step(p) > checkpoint_step(resume_path)]
    if later:
        raise ValueError(
            f"Resuming from {resume_path.name} would overwrite the later checkpoints {later}; move them away "
            "or resume from 'latest'."
        )
    check_checkpoint_files(resume_path, output_dir, None if student is None else accelerator.unwrap_model(student))
    logger.info("Resuming from %s", resume_path)
    try:
        accelerator.load_state(str(resume_path))
    except Exception as err:  # anything torch or accelerate raises on a bad file: name the checkpoint
        raise ValueError(
            f"Could not resume from {resume_path}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            f" {_instead(resume_path, output_dir)}"
        ) from err
    global_step = checkpoint_step(resume_path)
    first_epoch = global_step // num_update_steps_per_epoch
    resume_batches = (global_step % num_update_steps_per_epoch) * gradient_accumulation_steps
    return global_step, first_epoch, resume_batches


# ---------------------------------------------------------------- checking a checkpoint before loading it


def checkpoint_file_problem(path: Path, shapes: dict[str, tuple[int, ...]] | None = None) -> str | None:
    """Why ``path`` (a file of a checkpoint) cannot be loaded, or None.

    safetensors files: the header must parse and the data must be as long as the header says (truncation);
    with ``shapes``, their keys and shapes must be the student's (a checkpoint of another UNet configuration).
    accelerate's torch files (``optimizer.bin``, ``scheduler.bin``, ``random_states_*.pkl``, ...): torch.save
    writes a zip archive whose central directory is at the end, so a truncated file has none.
    """
    import json
    import zipfile

    size = path.stat().st_size
    if path.suffix == ".safetensors":
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "is truncated (no safetensors header)"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return "is truncated (its header runs past the end of the file)"
            try:
                header = json.loads(f.read(n))
            except ValueError:
                return "has an unreadable safetensors header"
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            return f"is truncated ({size} bytes, its header needs {8 + n + end})"
        if shapes is not None:
            found = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
            wrong = sorted(k for k in shapes.keys() & found.keys() if shapes[k] != found[k])
            missing, extra = sorted(shapes.keys() - found.keys()), sorted(found.keys() - shapes.keys())
            if wrong or missing or extra:
                parts = []
                if wrong:
                    k = wrong[0]
                    parts.append(f"{len(wrong)} tensors of other shapes (e.g. {k}: {found[k]} in the file, "
                                 f"{shapes[k]} in the student)")  # fmt: skip
                if missing:
                    parts.append(f"{len(missing)} of the student's tensors missing (e.g. {missing[0]})")
                if extra:
                    parts.append(f"{len(extra)} tensors the student does not have (e.g. {extra[0]})")
                return "is from another UNet configuration: " + "; ".join(parts)
        return None
    if path.suffix in (".bin", ".pkl", ".pt", ".pth"):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
        except (zipfile.BadZipFile, OSError) as err:
            return f"is truncated or not a torch file ({err})"
    return None


def checkpoint_problem(checkpoint: Path, student: Any | None = None) -> str | None:
    """The first broken or foreign file of ``checkpoint`` as ``"FILE is/has ..."``, or None."""
    shapes = None
    if student is not None:
        shapes = {k: tuple(v.shape) for k, v in student.state_dict().items()}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        relative = path.relative_to(checkpoint)
        student_file = relative.parts[0] in ("unet", "unet_ema") and path.suffix == ".safetensors"
        problem = checkpoint_file_problem(path, shapes if student_file else None)
        if problem is not None:
            return f"{relative} {problem}"
    return None


def _instead(checkpoint: Path, output_dir: str | os.PathLike) -> str:
    """Advice naming the newest earlier checkpoint whose files are readable."""
    step = checkpoint_step(checkpoint)
    earlier = [p for p in list_checkpoints(output_dir) if step is not None and checkpoint_step(p) < step]
    for candidate in reversed(earlier):
        if checkpoint_problem(candidate) is None:
            return (
                f"Resume from the previous complete checkpoint instead: --resume_from_checkpoint {candidate} "
                f"(move {checkpoint.name} away first)."
            )
    return "No earlier complete checkpoint exists; start a new run in a new --output_dir."


def check_checkpoint_files(checkpoint: Path, output_dir: str | os.PathLike, student: Any | None = None) -> None:
    """ValueError naming the checkpoint, its broken or foreign file, and the checkpoint to resume from instead."""
    problem = checkpoint_problem(checkpoint, student)
    if problem is not None:
        raise ValueError(f"Cannot resume from {checkpoint}: {problem}. {_instead(checkpoint, output_dir)}")
