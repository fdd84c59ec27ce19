"""The two data caches of a training run: their keys (everything that changes their content) and their builds.

``embeds-<hash>``: the text embeddings of each distinct prompt plus the empty prompt's; ``latents-<source>-<hash>``:
one latent x0 per training row. Folders, manifests and checks are ``caching.py``'s; the model work is
``encoding.py``'s.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .caching import CacheEntry, CacheWriter, ShardedRows, module_digest, tokenizer_digest
from .encoding import encode_images, encode_prompts, generate_latents, preprocess_image
from .seeds import row_noise
from .sources import ResolvedSource, check_latent_shape, sha256_json

if TYPE_CHECKING:
    from .data_config import DataConfig
    from .models import TeacherComponents

DATA_VERSION = 1  # in every cache key: bump when preprocessing or generation changes meaning


def embeds_key(prompts: Sequence[str], teacher: TeacherComponents, config: DataConfig) -> dict:
    return {
        "what": "prompt_embeds",
        "version": DATA_VERSION,
        "prompts_sha256": sha256_json(list(prompts)),
        "teacher_id": config.teacher_id,
        "text_encoder": module_digest(teacher.text_encoder),
        "text_encoder_dtype": str(teacher.text_encoder.dtype),
        "tokenizer": tokenizer_digest(teacher.tokenizer),
    }


def latents_key(source: ResolvedSource, teacher: TeacherComponents, config: DataConfig, embeds_cache_key: dict) -> dict:
    key = {"what": "latents", "version": DATA_VERSION, "source": source.kind, "identity": source.identity}
    key["max_train_samples"] = config.max_train_samples
    if source.kind == "images":
        key.update(
            image_column=config.image_column,
            caption_column=config.caption_column,
            prompts_sha256=sha256_json(source.prompts),
            resolution=config.resolution,
            center_crop=config.center_crop,
            random_flip=config.random_flip,
            seed=config.seed if source.seeded else None,
            teacher_id=config.teacher_id,
            vae=module_digest(teacher.vae),
            scaling_factor=float(teacher.vae.config.scaling_factor),
            encode="latent_dist.mode() float32",
        )
    elif source.kind == "latents":
        key.update(latents_column=config.latents_column, prompt_column=config.prompt_column)
    else:
        key.update(
            resolution=config.resolution,
            seed=config.seed,
            generation_steps=config.generation_steps,
            generation_guidance=float(config.generation_guidance),
            teacher_id=config.teacher_id,
            unet=module_digest(teacher.unet),
            unet_dtype=str(teacher.unet.dtype),
            scheduler_config=json.loads(json.dumps(dict(teacher.scheduler_config), default=str)),
            prompt_embeds=embeds_cache_key,
            sampler="bridge Euler on DDIM sigmas, CFG in v, ends at sigma 0",
        )
    return key


def build_embeds(path: Path, key: dict, unique: list[str], teacher: TeacherComponents, config: DataConfig, show: bool):
    with CacheWriter(path, key) as writer:
        writer.write_json("prompts.json", unique)
        writer.add_rows("empty_prompt_embeds", encode_prompts([""], teacher.text_encoder, teacher.tokenizer))
        bar = tqdm(total=len(unique), desc="Encoding prompts", unit="prompt", disable=not show)
        for i in range(0, len(unique), config.data_batch_size):
            chunk = unique[i : i + config.data_batch_size]
            writer.add_rows("prompt_embeds", encode_prompts(chunk, teacher.text_encoder, teacher.tokenizer))
            bar.update(len(chunk))
        bar.close()
        return writer.commit(num_rows=len(unique))


def build_latents(
    path: Path,
    key: dict,
    source: ResolvedSource,
    teacher: TeacherComponents,
    embeds: CacheEntry,
    config: DataConfig,
    show: bool,
) -> CacheEntry:
    n, bs = len(source.prompts), config.data_batch_size
    desc = {"images": "Encoding images", "latents": "Copying latents"}.get(source.kind, "Generating latents")
    bar = tqdm(total=n, desc=desc, unit="sample", disable=not show)
    with CacheWriter(path, key) as writer:
        writer.write_json("prompts.json", source.prompts)
        if source.kind == "images":
            vae = teacher.vae
            if vae.dtype != torch.float32:  # encode in float32 without touching the caller's model
                vae = copy.deepcopy(vae).to(torch.float32)
            transforms = []
            feature = source.dataset.features[config.image_column]
            raw = source.dataset.cast_column(config.image_column, type(feature)(decode=False))  # paths and bytes
            for i in range(0, n, bs):
                images = [read_image(v, feature, i + k) for k, v in enumerate(raw[i : i + bs][config.image_column])]
                done = [preprocess_image(img, config, i + k) for k, img in enumerate(images)]
                transforms += [record for _, record in done]
                writer.add_rows("latents", encode_images(torch.stack([p for p, _ in done]), vae))
                bar.update(len(images))
            writer.write_json("transforms.json", transforms)
        elif source.kind == "latents":
            table = source.dataset.with_format("numpy", columns=[config.latents_column])
            for i in range(0, n, bs):
                for k, value in enumerate(table[i : i + bs][config.latents_column]):
                    x = torch.as_tensor(np.asarray(value, dtype=np.float32))
                    check_latent_shape(x, i + k, source.latent_shape[0], source.latent_shape, config)
                    writer.add_rows("latents", x[None])
                bar.update(min(bs, n - i))
        else:
            unique = embeds.read_json("prompts.json")
            position = {p: k for k, p in enumerate(unique)}
            rows = ShardedRows("prompt_embeds", embeds.shards("prompt_embeds"))
            uncond = embeds.load_tensor("empty_prompt_embeds")
            h = w = config.resolution // 8
            shape = (teacher.unet.config.in_channels, h, w)
            for i in range(0, n, bs):
                chunk = range(i, min(n, i + bs))
                cond = torch.stack([rows[position[source.prompts[r]]] for r in chunk])
                x0 = generate_latents(
                    teacher,
                    cond,
                    uncond,
                    row_noise(chunk, shape, config.seed),
                    config.generation_steps,
                    config.generation_guidance,
                )
                if not torch.isfinite(x0).all():
                    raise ValueError(
                        f"The teacher generated non-finite latents for rows {chunk.start}..{chunk.stop - 1}; "
                        "check the teacher's weights and dtype (float16 overflow?)."
                    )
                writer.add_rows("latents", x0)
                bar.update(len(chunk))
        bar.close()
        return writer.commit(num_rows=n, meta={"source": source.kind})


def read_image(value: Any, feature: Any, row: int) -> Any:
    """Row ``row``'s image, decoded by the dataset's own ``Image`` feature (same pixels as ``dataset[row]``), fully
    loaded; ValueError naming the file when it cannot be read (a corrupt or truncated image)."""
    try:
        image = feature.decode_example(value)
        image.load()
        return image
    except Exception as err:  # PIL raises OSError, UnidentifiedImageError, SyntaxError, ... for bad files
        where = value.get("path") if isinstance(value, dict) else None
        raise ValueError(
            f"Cannot read the image {where or '(embedded bytes)'} (row {row} of the dataset): "
            f"{type(err).__name__}: {err}. Replace or remove that file and run again."
        ) from err
