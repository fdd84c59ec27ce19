"""Reflow pairs: noise ``z`` and the end ``x0_hat`` of a model's many-step ODE from it, stored as safetensors shards.

``generate_reflow_pairs.py`` is the command; ``docs/reflow.md`` the math. Row ``i`` of a pair set holds

- ``z``: (4, h, w) unit Gaussian noise from ``row_seed(seed, i, "reflow_z")`` (independent of batching),
- ``x0``: (4, h, w) the model's ODE solution from ``x = z`` at sigma = 1 to sigma = 0, scaled latents,
- ``prompt_embeds``: (77, D) the text encoder's last hidden state of the row's prompt,
- ``prompt``: the prompt text (in the shard's header, a JSON list),

computed by the ``FlowLunePipeline`` call itself (``latents=z``, ``output_type="latent"``, CFG at ``guidance``):
a distilled student folder directly, an epsilon SD1.5 teacher through ``FlowLunePipeline.from_teacher``.

Folder layout::

    pairs.json                     the config and its digest; written before any shard, checked on every restart
    empty_prompt_embeds.safetensors  the "" embedding (prompt dropout when the student keeps CFG)
    shard-00000.safetensors        tensors z, x0, prompt_embeds; header "flow_lune.reflow": JSON with the
    ...                            config digest, the first row, the row count and the prompts
    index.json                     written last: the shards, their rows and SHA-256; a set is complete with it

Each shard is written atomically by the one process that owns it (shard ``k`` goes to process
``k % num_processes``), so a killed run restarted keeps the finished shards, makes only the missing ones, and
makes them byte-identical to an uninterrupted run's (same rows, same batches, same noise).
``load_pairs_dataset(folder)`` reads a finished set as a ``datasets.Dataset`` (the installed ``datasets`` has no
safetensors builder); the trainer reads it lazily with ``ReflowPairs``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flow_lune.atomic import atomic_file, atomic_text

from .caching import ShardedRows, module_digest
from .seeds import row_seed

logger = logging.getLogger(__name__)

PAIRS_FORMAT = "flow_lune-reflow-pairs"
PAIRS_VERSION = 1  # bump when the meaning of a stored tensor changes
CONFIG_FILE = "pairs.json"
INDEX_FILE = "index.json"
EMPTY_FILE = "empty_prompt_embeds.safetensors"
HEADER_KEY = "flow_lune.reflow"  # the one header entry of a shard (one key: the header bytes are deterministic)
NOISE_PURPOSE = "reflow_z"  # row_seed purpose: other than the data caches' "noise", so z is a fresh draw


@dataclass
class PairsConfig:
    """Everything that changes the content of a pair set (its digest names it)."""

    model: str  # what was sampled: a path, "toy" or "tiny"
    model_kind: str  # "teacher" (epsilon SD1.5 through the bridge) or "student" (FlowLunePipeline)
    model_digest: str  # module_digest of the UNet: a retrained model is another pair set
    num_pairs: int
    steps: int  # Euler steps of the ODE
    guidance: float  # CFG scale of the ODE; > 1: the reflowed student is trained guidance-free (docs/reflow.md)
    shift: float  # the FlowLuneScheduler shift of the step grid
    resolution: int  # image size; latents are resolution / 8
    seed: int
    shard_size: int  # rows per shard (the unit of resumption and of the split across processes)
    batch_size: int  # rows per pipeline call (part of the content: batching can change float rounding)
    prompts_sha256: str

    def digest(self) -> str:
        text = json.dumps({"format": PAIRS_FORMAT, "version": PAIRS_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def check(self) -> None:
        """``ValueError`` for out-of-range settings."""
        for name in ("num_pairs", "steps", "shard_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}.")
        if not self.guidance >= 1:
            raise ValueError(f"--guidance must be >= 1 (1 = no guidance), got {self.guidance}.")
        if not self.shift > 0:
            raise ValueError(f"--shift must be > 0, got {self.shift}.")
        if self.resolution <= 0 or self.resolution % 8:
            raise ValueError(f"--resolution must be a positive multiple of 8, got {self.resolution}.")


def num_shards(num_pairs: int, shard_size: int) -> int:
    """``ceil(num_pairs / shard_size)``."""
    return -(-num_pairs // shard_size)


def shard_rows(shard: int, num_pairs: int, shard_size: int) -> range:
    """The rows of shard ``shard``: ``[shard * shard_size, min((shard + 1) * shard_size, num_pairs))``."""
    return range(shard * shard_size, min((shard + 1) * shard_size, num_pairs))


def shards_for_process(count: int, process_index: int, num_processes: int) -> list[int]:
    """The shards process ``process_index`` of ``num_processes`` writes: ``k`` with ``k % num_processes ==
    process_index``. Disjoint across processes, together all of ``range(count)``, balanced to one shard."""
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} is not in [0, num_processes={num_processes}).")
    return list(range(process_index, count, num_processes))


def pair_noise(rows: Sequence[int], shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """``z`` per row from a CPU generator seeded by ``row_seed(seed, row, "reflow_z")``: batch-independent."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(row_seed(seed, r, NOISE_PURPOSE))) for r in rows]
    )


def row_prompts(prompts: Sequence[str], rows: Sequence[int]) -> list[str]:
    """Row ``i`` takes ``prompts[i % len(prompts)]``: every prompt equally often, in order."""
    return [prompts[r % len(prompts)] for r in rows]


def shard_path(folder: Path, shard: int) -> Path:
    return Path(folder) / f"shard-{shard:05d}.safetensors"


def read_shard_header(path: Path) -> dict | None:
    """The shard's ``flow_lune.reflow`` header, or None when the file is unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta[HEADER_KEY])
    except Exception:  # a foreign or damaged file: the caller regenerates or reports it
        return None


@dataclass
class PairSampler:
    """The ODE that makes pairs: a ``FlowLunePipeline`` (a student, or a teacher through ``from_teacher``)."""

    pipe: Any  # FlowLunePipeline
    config: PairsConfig

    @torch.no_grad()
    def __call__(self, z: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """``x0_hat`` for a batch: the pipeline from ``latents=z`` at sigma = 1 to sigma = 0, float32."""
        device = self.pipe.device
        b, _, h, w = z.shape
        out = self.pipe(
            height=h * self.pipe.vae_scale_factor,
            width=w * self.pipe.vae_scale_factor,
            prompt_embeds=cond.to(device),
            negative_prompt_embeds=uncond.to(device).expand(b, -1, -1),
            num_inference_steps=self.config.steps,
            guidance_scale=self.config.guidance,
            latents=z.to(device, self.pipe.unet.dtype),
            output_type="latent",
        ).images
        return out.float().cpu()


def write_shard(
    folder: Path,
    shard: int,
    config: PairsConfig,
    sample: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    prompts: Sequence[str],
    embeds: dict[str, torch.Tensor],
    empty: torch.Tensor,
    on_rows: Callable[[int], None] | None = None,
) -> Path:
    """Make shard ``shard`` (its rows in batches of ``config.batch_size``) and write it atomically."""
    rows = shard_rows(shard, config.num_pairs, config.shard_size)
    latent = config.resolution // 8
    z = pair_noise(rows, (4, latent, latent), config.seed)
    texts = row_prompts(prompts, rows)
    cond = torch.stack([embeds[p] for p in texts])
    x0 = []
    for i in range(0, len(rows), config.batch_size):
        part = slice(i, i + config.batch_size)
        x0.append(sample(z[part], cond[part], empty[None]))
        if on_rows is not None:
            on_rows(len(x0[-1]))
    tensors = {"z": z.contiguous(), "x0": torch.cat(x0).contiguous(), "prompt_embeds": cond.float().contiguous()}
    header = {"digest": config.digest(), "shard": shard, "first_row": rows.start, "rows": len(rows), "prompts": texts}
    path = shard_path(folder, shard)
    atomic_file(path, lambda tmp: save_file(tensors, str(tmp), metadata={HEADER_KEY: json.dumps(header)}))
    return path


def shard_is_done(folder: Path, shard: int, config: PairsConfig) -> bool:
    """Whether shard ``shard`` exists and was written for this config (a finished shard is never redone)."""
    path = shard_path(folder, shard)
    if not path.is_file():
        return False
    header = read_shard_header(path)
    if header is None or header.get("digest") != config.digest():
        raise ValueError(
            f"{path} was not written for this pair set's settings (digest differs); use another --output_dir, "
            "or delete it."
        )
    return True


def start_pair_set(folder: Path, config: PairsConfig, empty: torch.Tensor, is_main: bool) -> None:
    """On the main process: write ``pairs.json`` and the empty embedding, or check an existing set's config."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    record = {"format": PAIRS_FORMAT, "version": PAIRS_VERSION, "digest": config.digest(), "config": asdict(config)}
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        if old.get("digest") != record["digest"]:
            changed = {k: (old.get("config", {}).get(k), v) for k, v in asdict(config).items()}
            changed = {k: v for k, v in changed.items() if v[0] != v[1]}
            raise ValueError(
                f"{folder} holds a pair set with other settings ({changed}, as (old, new)); resume it with the same "
                "flags, or use a new --output_dir."
            )
        return
    if is_main:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_file(folder / EMPTY_FILE, lambda tmp: save_file({"empty_prompt_embeds": empty.float()}, str(tmp)))
        atomic_text(path, json.dumps(record, indent=2))


def write_index(folder: Path, config: PairsConfig) -> Path:
    """``index.json``: the shards in order, their rows and SHA-256 (main process, after every shard exists)."""
    from flow_lune.convert.hashing import file_sha256

    folder = Path(folder)
    shards = []
    for k in range(num_shards(config.num_pairs, config.shard_size)):
        path = shard_path(folder, k)
        if not shard_is_done(folder, k, config):
            raise RuntimeError(f"{path} is missing; every process must finish its shards before the index is written.")
        shards.append({"file": path.name, "rows": len(shard_rows(k, config.num_pairs, config.shard_size)),
                       "sha256": file_sha256(path)})  # fmt: skip
    index = {"format": PAIRS_FORMAT, "version": PAIRS_VERSION, "digest": config.digest(), "config": asdict(config),
             "num_rows": config.num_pairs, "shards": shards}  # fmt: skip
    atomic_text(folder / INDEX_FILE, json.dumps(index, indent=2))
    return folder / INDEX_FILE


def read_index(folder: str | Path) -> dict:
    """The ``index.json`` of a finished pair set; ``ValueError`` naming the fix when the set is not finished."""
    folder = Path(folder)
    path = folder / INDEX_FILE
    if not path.is_file():
        raise ValueError(
            f"{folder} is not a finished reflow pair set (no {INDEX_FILE}): run generate_reflow_pairs.py with "
            "--output_dir pointing there (it resumes) until it completes."
        )
    index = json.loads(path.read_text(encoding="utf-8"))
    if index.get("format") != PAIRS_FORMAT:
        raise ValueError(f"{path} is not a Flow Lune reflow pair index (format {index.get('format')!r}).")
    return index


def pairs_guidance(folder: str | Path) -> float:
    """The CFG scale the pair set was made with (``index.json``)."""
    return float(read_index(folder)["config"]["guidance"])


class ReflowPairs(torch.utils.data.Dataset):
    """A finished pair set, read lazily: row ``i`` is ``{"latents": x0_hat, "noise": z, "prompt_embeds", "index"}``.

    ``latents`` is the ODE's end (the trainer's x0), ``noise`` the pair's z. ``empty_prompt_embeds`` (77, D) is
    the "" embedding; ``config`` the generation settings (``guidance`` among them).
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = read_index(self.folder)
        self.config = index["config"]
        shards = [(self.folder / s["file"], int(s["rows"])) for s in index["shards"]]
        for path, _ in shards:
            if not path.is_file():
                raise ValueError(f"{path} is listed in {INDEX_FILE} but missing; regenerate the pair set.")
        self._x0 = ShardedRows("x0", shards)
        self._z = ShardedRows("z", shards)
        self._embeds = ShardedRows("prompt_embeds", shards)
        with safe_open(str(self.folder / EMPTY_FILE), framework="pt") as f:
            self.empty_prompt_embeds = f.get_tensor("empty_prompt_embeds")

    def __len__(self) -> int:
        return len(self._x0)

    def __getitem__(self, i: int) -> dict:
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} outside a pair set of {len(self)} rows")
        i = i % len(self)
        return {"latents": self._x0[i], "noise": self._z[i], "prompt_embeds": self._embeds[i], "index": i}


def check_pairs_match(pairs: ReflowPairs, text_encoder: Any, resolution: int) -> None:
    """``ValueError`` unless the pairs' embeddings fit ``text_encoder`` and their latents ``resolution``."""
    width = int(pairs.empty_prompt_embeds.shape[-1])
    hidden = int(text_encoder.config.hidden_size)
    if width != hidden:
        raise ValueError(
            f"--reflow_data {str(pairs.folder)!r} holds prompt embeddings of width {width}, but the teacher's text "
            f"encoder gives {hidden}: make the pairs with the teacher (or a student of it) that this run loads."
        )
    if int(pairs.config["resolution"]) != resolution:
        raise ValueError(
            f"--reflow_data {str(pairs.folder)!r} was made at resolution {pairs.config['resolution']}, the run "
            f"uses {resolution}: pass --resolution {pairs.config['resolution']}."
        )


def collate_pairs(batch: list[dict]) -> dict:
    """``collate`` of ``training/data.py`` plus ``noise`` (B, 4, h, w)."""
    from .data import _stack, collate

    out = collate(batch)
    out["noise"] = _stack([row["noise"] for row in batch])
    return out


def load_pairs_dataset(folder: str | Path) -> Any:
    """A finished pair set as an in-memory ``datasets.Dataset``: columns z, x0, prompt_embeds (float32) and prompt.

    ``datasets`` 5 has no safetensors builder, so each shard that ``index.json`` lists becomes a
    ``Dataset.from_dict`` and the shards are concatenated in order; ``.with_format("torch")`` gives tensors back.
    """
    import datasets

    folder = Path(folder)
    parts = []
    for shard in read_index(folder)["shards"]:
        path = folder / shard["file"]
        header = read_shard_header(path)
        if header is None:
            raise ValueError(f"{path} is not a readable reflow shard; regenerate the pair set.")
        with safe_open(str(path), framework="np") as f:
            columns = {name: list(f.get_tensor(name)) for name in ("z", "x0", "prompt_embeds")}
        z_shape, e_shape = columns["z"][0].shape, columns["prompt_embeds"][0].shape
        features = datasets.Features(
            {
                "z": datasets.Array3D(z_shape, "float32"),
                "x0": datasets.Array3D(z_shape, "float32"),
                "prompt_embeds": datasets.Array2D(e_shape, "float32"),
                "prompt": datasets.Value("string"),
            }
        )
        parts.append(datasets.Dataset.from_dict({**columns, "prompt": header["prompts"]}, features=features))
    return datasets.concatenate_datasets(parts)


def unet_digest(unet: Any) -> str:
    """``module_digest`` of the UNet a pair set is sampled with (the bridge's wrapped teacher UNet included)."""
    return module_digest(getattr(unet, "unet", unet))


def make_pair_set(
    folder: str | Path,
    config: PairsConfig,
    sample: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    prompts: Sequence[str],
    encode: Callable[[list[str]], torch.Tensor],
    process_index: int = 0,
    num_processes: int = 1,
    wait: Callable[[], None] = lambda: None,
    show_progress: bool = True,
) -> Path | None:
    """Write the shards this process owns that are missing, then (main process) ``index.json``.

    ``sample(z, cond, uncond) -> x0_hat`` integrates the ODE (``PairSampler``); ``encode(texts) -> (N, 77, D)``
    embeds prompts. ``wait`` is a barrier across processes (``accelerator.wait_for_everyone``). Returns the index
    path on the main process, None elsewhere.
    """
    from tqdm.auto import tqdm

    config.check()
    if not prompts:
        raise ValueError("No prompts: give --prompts_file with at least one line, or --prompts toy/synthetic.")
    folder = Path(folder)
    is_main = process_index == 0
    unique = list(dict.fromkeys(prompts))
    encoded = encode(["", *unique]).float().cpu()
    empty, embeds = encoded[0], dict(zip(unique, encoded[1:]))
    start_pair_set(folder, config, empty, is_main)
    wait()
    start_pair_set(folder, config, empty, is_main=False)  # every process checks the config it will extend
    count = num_shards(config.num_pairs, config.shard_size)
    mine = shards_for_process(count, process_index, num_processes)
    todo = [k for k in mine if not shard_is_done(folder, k, config)]
    total = sum(len(shard_rows(k, config.num_pairs, config.shard_size)) for k in todo)
    kept = len(mine) - len(todo)
    if kept:
        logger.info(f"Process {process_index}: {kept} finished shard(s) kept, {len(todo)} to make.")
    with tqdm(total=total, unit="pair", desc=f"pairs (process {process_index})", disable=not show_progress) as bar:
        for k in todo:
            write_shard(folder, k, config, sample, prompts, embeds, empty, on_rows=bar.update)
    wait()
    return write_index(folder, config) if is_main else None
