"""Loading the teacher and building the student (DESIGN.md sections 2 and 7).

The teacher is an epsilon-prediction SD1.5-layout pipeline: a diffusers folder, a Hub id
(``revision``/``variant``), or a single file that ``flow_lune.convert`` turns into a diffusers folder
first. It is frozen and never passes through ``accelerator.prepare``. The student starts as a strict
copy of the teacher's UNet, or from ``--student_model`` (a diffusers UNet folder, a pipeline folder, or
one of our ``checkpoint-N`` folders), and keeps fp32 trainable weights.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .block_features import block_channels

logger = logging.getLogger(__name__)

SD1_DOWN_TYPES = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD1_UP_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
TINY_TEACHER_NAME = "tiny-sd15-teacher"  # the embedded default teacher's folder under the cache dir


@dataclass
class TeacherComponents:
    """The teacher pipeline's parts, frozen; ``unet`` is the epsilon model, ``scheduler_config`` its DDPM table.

    It has what ``FlowLunePipeline.from_teacher`` reads from a Stable Diffusion pipeline, so the data caches'
    generation and the trainer's validation sample the teacher through it directly.
    """

    unet: Any  # UNet2DConditionModel
    vae: Any  # AutoencoderKL
    text_encoder: Any  # CLIPTextModel
    tokenizer: Any  # CLIPTokenizer
    scheduler_config: dict  # as the teacher's scheduler_config.json holds it (part of the data cache keys)
    scheduler: Any = None  # the teacher's own scheduler; None: built from scheduler_config
    source: str = ""  # what was loaded (path or Hub id), for logs and the model card

    def __post_init__(self) -> None:
        if self.scheduler is None:
            import diffusers

            name = str(self.scheduler_config.get("_class_name"))
            self.scheduler = getattr(diffusers, name, diffusers.DDPMScheduler).from_config(self.scheduler_config)


def check_sd15_unet(unet: Any, what: str = "teacher") -> None:
    """``ValueError`` unless ``unet`` is a UNet2DConditionModel with SD1.5's block layout (4 in/out channels)."""
    from diffusers import UNet2DConditionModel

    if not isinstance(unet, UNet2DConditionModel):
        raise ValueError(f"The {what} UNet is a {type(unet).__name__}; Flow Lune needs a UNet2DConditionModel.")
    unet_config = unet.config
    problems = []
    if tuple(unet_config.down_block_types) != SD1_DOWN_TYPES:
        problems.append(f"down_block_types={list(unet_config.down_block_types)}")
    if tuple(unet_config.up_block_types) != SD1_UP_TYPES:
        problems.append(f"up_block_types={list(unet_config.up_block_types)}")
    if unet_config.in_channels != 4 or unet_config.out_channels != 4:
        problems.append(f"in/out channels {unet_config.in_channels}/{unet_config.out_channels}")
    if unet_config.get("addition_embed_type") is not None or unet_config.get("class_embed_type") is not None:
        problems.append("extra conditioning (addition_embed_type/class_embed_type, e.g. SDXL)")
    if problems:
        raise ValueError(
            f"The {what} is not an SD1.5-layout UNet: {'; '.join(problems)}. Flow Lune distils SD1.5-architecture "
            "epsilon-prediction models (4 down blocks CrossAttn x3 + Down, 4-channel latents)."
        )


def default_teacher_dir(cache_dir: str | os.PathLike) -> Path:
    """Build (once) the embedded tiny SD1.5 teacher under ``cache_dir``, offline; returns its folder."""
    from flow_lune.tiny import save_tiny_sd_pipeline

    folder = Path(cache_dir).expanduser() / TINY_TEACHER_NAME
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    save_tiny_sd_pipeline(tmp, seed=0)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first: keep its folder
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def check_single_file_teacher(path: Path, config_dir: str | None) -> None:
    """``ValueError`` before any conversion unless ``path`` can be an epsilon teacher and ``config_dir`` completes it.

    A single file holds no tokenizer (and an SD1.5 file no scheduler), so ``config_dir`` (``--teacher_config``) must be
    a local diffusers folder with ``tokenizer/``. A header that declares a Flow Lune student
    (``modelspec.prediction_type`` ``flow`` or ``flow_lune.shift``) or another prediction type is refused.
    """
    if config_dir is None:
        raise ValueError(
            f"--pretrained_teacher_model {str(path)!r} is a single file, which holds no tokenizer or scheduler; pass "
            "--teacher_config with a local diffusers SD1.5 folder that has tokenizer/ and the teacher's scheduler/ "
            "(e.g. a downloaded SD1.5 pipeline)."
        )
    folder = Path(config_dir).expanduser()
    if not (folder / "tokenizer").is_dir():
        raise ValueError(
            f"--teacher_config {config_dir!r} has no tokenizer/ folder; give a local diffusers SD1.5 folder with "
            "tokenizer/ (and scheduler/), e.g. a downloaded SD1.5 pipeline."
        )
    if path.suffix != ".safetensors":
        return  # a .ckpt pickle: the converter refuses or reads it; it carries no header to check here
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
    except Exception:  # not a readable safetensors file: the converter says what it is
        return
    prediction = header.get("modelspec.prediction_type")
    if prediction == "flow" or "flow_lune.shift" in header:
        raise ValueError(
            f"--pretrained_teacher_model {str(path)!r} is a Flow Lune flow student (header modelspec.prediction_type "
            f"{prediction!r}, flow_lune.shift {header.get('flow_lune.shift')!r}), not an epsilon teacher; pass the "
            "epsilon SD1.5 teacher (a file written with flow-lune-convert to-single-file --prediction-type epsilon, "
            "or the original SD1.5 file), and the student with --student_model."
        )
    if prediction is not None and prediction != "epsilon":
        raise ValueError(
            f"--pretrained_teacher_model {str(path)!r} declares modelspec.prediction_type {prediction!r}; Flow Lune "
            "distils epsilon-prediction SD1.5 teachers only."
        )


def single_file_to_diffusers(path: Path, cache_dir: str | os.PathLike, config_dir: str | None = None) -> Path:
    """Convert an original-layout single file to a diffusers folder under ``cache_dir``, once.

    The folder's name carries the file's name, size and mtime and the ``config_dir`` it was converted with, so a
    changed file or another config gives a new conversion. ``config_dir``: a local diffusers folder whose configs,
    scheduler and tokenizer the conversion uses (required; see :func:`check_single_file_teacher`).
    """
    from flow_lune.convert import convert_to_diffusers

    check_single_file_teacher(path, config_dir)
    stat = path.stat()
    config_tag = hashlib.sha256(str(Path(config_dir).expanduser().resolve()).encode()).hexdigest()[:8]
    name = f"teacher-{path.stem}-{stat.st_size}-{int(stat.st_mtime)}-{config_tag}"
    folder = Path(cache_dir).expanduser() / name
    if not (folder / "model_index.json").is_file():
        convert_to_diffusers(path, folder, config=config_dir, progress=False)
    return folder


def load_teacher(
    pretrained: str,
    revision: str | None = None,
    variant: str | None = None,
    cache_dir: str = "~/.cache/flow_lune",
    config_dir: str | None = None,
) -> TeacherComponents:
    """Load the teacher's UNet, VAE, text encoder, tokenizer and scheduler config; checks SD1.5 layout and epsilon.

    A path ending in .safetensors/.ckpt goes through ``flow_lune.convert`` first, with ``config_dir``
    (``--teacher_config``: a local diffusers folder with the configs, scheduler and tokenizer), which it needs.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from flow_lune.flow import TeacherSchedule

    source = pretrained
    path = Path(pretrained).expanduser()
    if path.suffix in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise ValueError(f"--pretrained_teacher_model {pretrained!r} looks like a single file but does not exist.")
        path = single_file_to_diffusers(path, cache_dir, config_dir)
        pretrained = str(path)
    kwargs = {"revision": revision}
    scheduler_config = dict(DDPMScheduler.load_config(pretrained, subfolder="scheduler", revision=revision))
    TeacherSchedule.from_scheduler_config(scheduler_config)  # raises for non-epsilon or zero-SNR teachers
    unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet", variant=variant, **kwargs)
    check_sd15_unet(unet)
    vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", variant=variant, **kwargs)
    text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", variant=variant, **kwargs)
    tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer", **kwargs)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval()
    return TeacherComponents(unet, vae, text_encoder, tokenizer, scheduler_config, source=source)


TINY_TEACHER_ID = "flow_lune.tiny(seed=0)"  # the tiny teacher's identity in the data cache keys


def toy_teacher_id() -> str:
    """The shipped toy teacher's identity in the data cache keys: its files' sha256 from the manifest, so a
    rebuilt teacher (new weights under the same path) never reuses the old one's latents."""
    import json

    from flow_lune.toy import manifest_path

    files = json.loads(manifest_path().read_text(encoding="utf-8")).get("files", {})
    digest = hashlib.sha256(
        json.dumps({k: v for k, v in sorted(files.items()) if k.startswith("teacher/")}).encode()
    ).hexdigest()
    return f"flow_lune.toy.teacher@{digest[:16]}"


def load_teacher_from_args(args: Any, accelerator: Any) -> tuple[TeacherComponents, str]:
    """The teacher the shared flags name (``training/cli.py``) and its identity for the data cache keys.

    ``toy`` (``train_flow_distill.py``'s default) is the shipped toy teacher (``flow_lune.toy.teacher_path()``);
    ``tiny`` is the tiny random-weight teacher, built under ``--cache_dir``, for fast tests (also what
    ``train_assessor.py`` uses without ``--pretrained_teacher_model``). The main process loads (and, for a single
    file, converts) first. Both trainers use this, so they share data caches.
    """
    from flow_lune.settings import TINY_TEACHER, is_toy_teacher

    name = args.pretrained_teacher_model
    if name in (None, TINY_TEACHER):
        with accelerator.main_process_first():
            teacher_path = str(default_teacher_dir(args.cache_dir))
        logger.info(f"Teacher: the tiny random-weight SD1.5 teacher at {teacher_path} (for tests; it draws noise).")
        teacher_id = TINY_TEACHER_ID
    elif is_toy_teacher(name):
        from flow_lune.toy import teacher_path as toy_teacher_path

        teacher_path = str(toy_teacher_path())
        logger.info(f"Teacher: the shipped toy teacher at {teacher_path}.")
        teacher_id = toy_teacher_id()
    else:
        teacher_path = name
        teacher_id = f"{teacher_path}@{args.revision}/{args.variant}"
    with accelerator.main_process_first():
        teacher = load_teacher(teacher_path, args.revision, args.variant, args.cache_dir, args.teacher_config)
    return teacher, teacher_id


def teacher_resolution(teacher: TeacherComponents) -> int:
    """The teacher's native image size: ``sample_size * 2^(VAE blocks - 1)`` (512 for SD1.5)."""
    return int(teacher.unet.config.sample_size) * 2 ** (len(teacher.vae.config.block_out_channels) - 1)


def _student_unet_folder(path: Path) -> tuple[Path, str | None]:
    """Where a UNet lives in ``path``: a UNet folder, a pipeline folder (``unet/``) or a checkpoint (``unet/``)."""
    if (path / "config.json").is_file():
        return path, None
    if (path / "unet" / "config.json").is_file():
        return path, "unet"
    raise ValueError(
        f"--student_model {str(path)!r} holds no UNet: expected a diffusers UNet folder (config.json), "
        "a pipeline folder or a checkpoint-N folder (unet/config.json)."
    )


def build_student(teacher_unet: torch.nn.Module, student_model: str | None = None) -> torch.nn.Module:
    """The student UNet in fp32, trainable: a strict copy of the teacher's UNet, or loaded from ``student_model``."""
    if student_model is None:
        student = copy.deepcopy(teacher_unet)
    else:
        from diffusers import UNet2DConditionModel

        folder, subfolder = _student_unet_folder(Path(student_model).expanduser())
        student = UNet2DConditionModel.from_pretrained(folder, subfolder=subfolder)
        check_sd15_unet(student, what="student")
        if block_channels(student) != block_channels(teacher_unet) or (
            student.config.cross_attention_dim != teacher_unet.config.cross_attention_dim
        ):
            raise ValueError(
                f"--student_model {student_model!r} does not match the teacher's architecture "
                f"(block channels {block_channels(student)} vs {block_channels(teacher_unet)}, cross_attention_dim "
                f"{student.config.cross_attention_dim} vs {teacher_unet.config.cross_attention_dim})."
            )
    return student.to(torch.float32).requires_grad_(True).train()


LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")  # diffusers'


def prepare_student(
    student: torch.nn.Module,
    device: torch.device | str,
    weight_dtype: torch.dtype = torch.float32,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    gradient_checkpointing: bool = False,
) -> torch.nn.Module:
    """The student ready to train on ``device``: full fine-tuning in fp32, or a peft LoRA of ``lora_rank``
    (alpha defaults to the rank; Gaussian init; fp32 adapter over a ``weight_dtype`` frozen base)."""
    if lora_rank is not None:
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        student.requires_grad_(False).to(dtype=weight_dtype)
        student.add_adapter(
            LoraConfig(
                r=lora_rank,
                lora_alpha=lora_alpha or lora_rank,
                init_lora_weights="gaussian",
                target_modules=list(LORA_TARGETS),
            )
        )
        cast_training_params(student, dtype=torch.float32)
    if gradient_checkpointing:
        student.enable_gradient_checkpointing()
    return student.to(device).train()
