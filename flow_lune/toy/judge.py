"""The judge: a small CNN on 64x64 pixels with one classification head per toy attribute.

Its penultimate layer (``JudgeFeatures``) is the feature extractor of the toy Frechet distance. Saved
as ``config.json`` + ``model.safetensors`` (no pickles).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from flow_lune.atomic import atomic_file, atomic_text

from .world import ATTRIBUTES, IMAGE_SIZE

JUDGE_CONFIG = {
    "channels": [32, 32, 64, 64, 64],  # one conv per entry; all but the first halve the size: 64 -> 4
    "feature_dim": 128,  # penultimate width: the toy Frechet distance's feature space
    "heads": {name: len(values) for name, values in ATTRIBUTES.items()},
    "image_size": IMAGE_SIZE,
}


class ToyJudge(nn.Module):
    """Images in [0, 1], (B, 3, H, W) (resized to 64x64 when H, W differ) -> logits per attribute."""

    def __init__(self, config: dict | None = None):
        super().__init__()
        self.config = dict(JUDGE_CONFIG if config is None else config)
        chans = self.config["channels"]
        layers: list[nn.Module] = []
        prev = 3
        for k, c in enumerate(chans):
            layers += [nn.Conv2d(prev, c, 3, stride=1 if k == 0 else 2, padding=1), nn.GroupNorm(8, c), nn.SiLU()]
            prev = c
        self.body = nn.Sequential(*layers)
        side = self.config["image_size"] // 2 ** (len(chans) - 1)
        # flatten, not pool: position is one of the attributes
        self.fc = nn.Linear(prev * side * side, self.config["feature_dim"])
        self.heads = nn.ModuleDict(
            {name: nn.Linear(self.config["feature_dim"], n) for name, n in self.config["heads"].items()}
        )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The penultimate features (B, feature_dim) of images in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}.")
        x = images.float()
        size = self.config["image_size"]
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return F.silu(self.fc(self.body(x * 2.0 - 1.0).flatten(1)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(images)
        return {name: head(feats) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Predicted labels (B, number of attributes), columns in ``ATTRIBUTES`` order."""
        out = []
        for i in range(0, images.shape[0], batch_size):
            logits = self(images[i : i + batch_size])
            out.append(torch.stack([logits[name].argmax(-1) for name in self.config["heads"]], dim=1))
        return torch.cat(out)


class JudgeFeatures(nn.Module):
    """The judge's penultimate features, as torchmetrics' ``FrechetInceptionDistance(feature=...)`` expects.

    Takes uint8 images, or float images in [0, 1] (values outside are clamped; use the metric with
    ``normalize=True``); ``num_features`` tells torchmetrics the width without a dummy forward.
    """

    def __init__(self, judge: ToyJudge):
        super().__init__()
        self.judge = judge.eval()
        self.num_features = judge.config["feature_dim"]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
        with torch.no_grad():
            return self.judge.features(images).double()


def save_judge(judge: ToyJudge, folder: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in judge.state_dict().items()}
    atomic_file(folder / "model.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    atomic_text(folder / "config.json", json.dumps(judge.config, indent=2) + "\n")
    return folder


def load_judge(folder: str | os.PathLike) -> ToyJudge:
    """The judge saved in ``folder`` by ``save_judge``, in eval mode, strictly loaded."""
    folder = Path(folder)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise ValueError(
                f"{folder} has no {name}: pass a folder written by save_judge (e.g. flow_lune.toy.judge_path())."
            )
    judge = ToyJudge(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    judge.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    return judge.eval()


def _augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light blur and noise, so that slightly soft or grainy generated images are still read correctly."""
    b = images.shape[0]
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(b, 1, 1, 1, generator=gen) * 0.8
    x = images * (1 - mix) + blurred * mix
    x = x + torch.randn(x.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * 0.06
    return x.clamp(0, 1)


def train_judge(
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int = 600,  # measured: >= 99.9% on held-out images well before this on the toy world
    batch_size: int = 64,
    lr: float = 2e-3,  # AdamW on a 0.2M-parameter CNN: fast and stable here
    seed: int = 0,
    log_every: int = 100,
) -> ToyJudge:
    """Train a ``ToyJudge`` on uint8 ``images`` (N, 3, 64, 64) and ``labels`` (N, attributes): summed cross-entropy."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise TypeError(f"images must be a uint8 (N, 3, H, W) tensor, got {images.dtype} {tuple(images.shape)}.")
    torch.manual_seed(seed)
    judge = ToyJudge()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    names = list(judge.config["heads"])
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        x = _augment(images[idx].float() / 255.0, gen)
        logits = judge(x)
        loss = sum(F.cross_entropy(logits[n], labels[idx, k]) for k, n in enumerate(names))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(
                f"  judge step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    return judge.eval()
