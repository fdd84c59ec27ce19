"""Metrics for real SD1.5 models: torchmetrics' Inception FID and CLIP score.

The Inception network (``feature`` an int) needs the ``torch-fidelity`` package; any ``torch.nn.Module``
returning (B, D) features may stand in for it (tests use a tiny one). CLIP weights come from
``model_name_or_path``: a Hub id (fetched on the user's machine) or a local folder holding a
``CLIPModel`` and its ``CLIPProcessor``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .metrics import FEATURE_BATCH, update_in_batches


def _uint8(images: torch.Tensor) -> torch.Tensor:
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def inception_fid(real: torch.Tensor, fake: torch.Tensor, feature: int | torch.nn.Module = 2048) -> float:
    """FID of images in [0, 1] with torchmetrics' ``FrechetInceptionDistance(feature=feature)``."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if isinstance(feature, int) and not _TORCH_FIDELITY_AVAILABLE:
        raise ValueError(
            "Inception FID needs the torch-fidelity package (`pip install torch-fidelity`), which torchmetrics uses "
            "for its Inception network; install it or pass a feature module."
        )
    fid = FrechetInceptionDistance(feature=feature, normalize=False)
    update_in_batches(fid, _uint8(real), real=True)
    update_in_batches(fid, _uint8(fake), real=False)
    return float(fid.compute())


_CLIP_CACHE: dict[str, tuple] = {}


class _CLIPFeatures(torch.nn.Module):
    """A ``CLIPModel`` whose ``get_image_features``/``get_text_features`` return the projected tensors.

    transformers 5 returns a ``BaseModelOutputWithPooling`` (projected embeddings in ``pooler_output``);
    torchmetrics 1.9's CLIP score expects the tensor that transformers 4 returned.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def clip_model_loader(model_name_or_path: str | os.PathLike):
    """What torchmetrics' ``CLIPScore(model_name_or_path=...)`` accepts for any CLIP checkpoint, local or Hub.

    torchmetrics takes strings only for the model ids it lists; a callable returning
    ``(model, CLIPProcessor)`` works for every other checkpoint, including a local folder.
    """
    from transformers import CLIPModel, CLIPProcessor

    name = str(model_name_or_path)
    if name not in _CLIP_CACHE:  # one load per process: the evaluator scores every setting with it
        _CLIP_CACHE[name] = (_CLIPFeatures(CLIPModel.from_pretrained(name).eval()), CLIPProcessor.from_pretrained(name))
    return lambda: _CLIP_CACHE[name]


def clip_score(images: torch.Tensor, prompts: Sequence[str], model_name_or_path: str | os.PathLike) -> float:
    """torchmetrics' CLIP score ``100 * max(cos(E_image, E_text), 0)``, averaged over the images."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    if images.shape[0] != len(prompts):
        raise ValueError(f"{images.shape[0]} images for {len(prompts)} prompts: give one prompt per image.")
    metric = CLIPScore(model_name_or_path=clip_model_loader(model_name_or_path))
    for start in range(0, len(prompts), FEATURE_BATCH):  # CLIP's activations for every image at once: too large
        end = start + FEATURE_BATCH
        metric.update(list(_uint8(images[start:end])), list(prompts[start:end]))
    return float(metric.compute())
