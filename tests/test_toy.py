"""The toy world: generator, datasets, tokenizer, the shipped teacher and judge, and the build command."""

import hashlib
import json

import numpy as np
import pytest
import torch

from flow_lune.toy import (
    ATTRIBUTE_COMBINATIONS,
    ATTRIBUTES,
    caption_for,
    judge_path,
    manifest_path,
    parse_caption,
    render,
    teacher_path,
    toy_arrays,
    toy_dataset,
    toy_dataset_dict,
    write_imagefolder,
)
from flow_lune.toy.tokenizer import CAPTION_WORDS, toy_tokenizer, write_toy_tokenizer_files

BASE_RGB = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 70, 215), "yellow": (235, 205, 40)}
QUADRANT_CENTRE = {"left": (17, 32), "right": (47, 32), "top": (32, 17), "bottom": (32, 47)}


@pytest.fixture(scope="module")
def toy_teacher():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(teacher_path()), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- generator -----------------------------------------------------------------------------------------


def test_render_is_deterministic_and_seeded():
    a, b = render(0, "train", 7), render(0, "train", 7)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.caption == b.caption
    for other in (render(1, "train", 7), render(0, "heldout", 7)):
        assert other.caption == a.caption  # attributes come from the index
        assert not np.array_equal(np.asarray(other.image), np.asarray(a.image))  # jitter from (seed, split, index)


def test_every_combination_once_per_cycle_and_captions_name_the_pixels():
    """Caption, labels and pixels agree: the shape's colour and position are where the caption says."""
    n = len(ATTRIBUTE_COMBINATIONS)
    samples = [render(3, "heldout", i) for i in range(n)]
    assert len({s.caption for s in samples}) == n == 48
    for s in samples:
        assert s.image.size == (64, 64) and s.image.mode == "RGB"
        assert parse_caption(s.caption) == s.labels == {k: ATTRIBUTES[k].index(getattr(s, k)) for k in ATTRIBUTES}
        inside = s.mask > 0.99
        pixels = np.asarray(s.image, dtype=np.float32)[inside]
        nearest = min(BASE_RGB, key=lambda c: np.abs(pixels.mean(0) - BASE_RGB[c]).sum())
        assert nearest == s.colour
        ys, xs = np.nonzero(inside)
        centre = (xs.mean(), ys.mean())
        assert min(QUADRANT_CENTRE, key=lambda p: np.hypot(*np.subtract(centre, QUADRANT_CENTRE[p]))) == s.position


def test_caption_errors():
    assert caption_for("circle", "red", "left") == "a red circle at the left"
    with pytest.raises(ValueError, match="colour 'purple'"):
        caption_for("circle", "purple", "left")
    with pytest.raises(ValueError, match="not a toy caption"):
        parse_caption("a cat")
    with pytest.raises(ValueError, match="split"):
        render(0, "test", 0)


# --- datasets --------------------------------------------------------------------------------------------


def test_dataset_and_imagefolder_load_through_datasets_and_the_trainer(tmp_path):
    import datasets

    from flow_lune.training.data import DataConfig, resolve_source

    ds = toy_dataset("train", 6)
    assert isinstance(ds.features["image"], datasets.Image) and ds[2]["text"] == render(0, "train", 2).caption
    assert np.array_equal(np.asarray(ds[2]["image"]), np.asarray(render(0, "train", 2).image))

    folder = write_imagefolder(tmp_path / "toy", 6)
    loaded = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
    assert loaded["text"] == ds["text"] and loaded[0]["shape"] == ds[0]["shape"]
    assert np.array_equal(np.asarray(loaded[5]["image"].convert("RGB")), np.asarray(ds[5]["image"]))
    for field in ("train_data_dir", "dataset_name"):
        cfg = DataConfig(**{field: str(folder)}, resolution=64, center_crop=True, cache_dir=str(tmp_path / "cache"))
        source = resolve_source(cfg)
        assert source.kind == "images" and source.prompts == ds["text"]

    toy_dataset_dict(6, 3).save_to_disk(str(tmp_path / "saved"))  # the DatasetDict route: --dataset_name
    cfg = DataConfig(dataset_name=str(tmp_path / "saved"), resolution=64, cache_dir=str(tmp_path / "cache"))
    assert resolve_source(cfg).prompts == ds["text"]


def test_toy_arrays_match_render():
    arrays = toy_arrays("heldout", 3, seed=2, start=5)
    s = render(2, "heldout", 6)
    assert arrays.images.dtype == torch.uint8 and arrays.images.shape == (3, 3, 64, 64)
    assert np.array_equal(arrays.images[1].permute(1, 2, 0).numpy(), np.asarray(s.image))
    assert arrays.labels[1].tolist() == list(s.labels.values()) and arrays.captions[1] == s.caption


# --- tokenizer -------------------------------------------------------------------------------------------


def test_tokenizer_gives_one_token_per_word_and_round_trips(tmp_path):
    tok = toy_tokenizer(write_toy_tokenizer_files(tmp_path))
    for word in CAPTION_WORDS:
        assert len(tok(word, add_special_tokens=False).input_ids) == 1, word
    for shape, colour, position in ATTRIBUTE_COMBINATIONS:
        caption = caption_for(shape, colour, position)
        ids = tok(caption).input_ids
        assert len(ids) == 8 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == caption
    assert tok.decode(tok("a zebra").input_ids, skip_special_tokens=True) == "a zebra"  # byte-level fallback


def test_shipped_tokenizer_is_the_toy_tokenizer(tmp_path, toy_teacher):
    tok = toy_tokenizer(write_toy_tokenizer_files(tmp_path))
    for caption in ("a blue square at the top", "a yellow triangle at the bottom", ""):
        assert toy_teacher.tokenizer(caption).input_ids == tok(caption).input_ids


# --- shipped assets --------------------------------------------------------------------------------------


def test_manifest_sha256_matches_every_shipped_file():
    manifest = json.loads(manifest_path().read_text(encoding="utf-8"))
    root = manifest_path().parent
    shipped = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert set(manifest["files"]) == shipped
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == digest, rel
    assert manifest["seed"] == 0 and "flow_lune.toy.build" in manifest["command"]
    assert set(manifest["stage_seconds"]) >= {"judge", "vae", "teacher"}
    assert manifest["total_bytes"] < 16e6


def test_shipped_scheduler_is_the_builds_and_the_evaluators_ddim(tmp_path):
    from flow_lune.toy.build import teacher_scheduler

    teacher_scheduler().save_config(tmp_path)
    written = json.loads((tmp_path / "scheduler_config.json").read_text())
    shipped = json.loads((manifest_path().parent / "teacher" / "scheduler" / "scheduler_config.json").read_text())
    written.pop("_diffusers_version"), shipped.pop("_diffusers_version")
    assert written == shipped and shipped["_class_name"] == "DDIMScheduler"
    assert shipped["set_alpha_to_one"] is True and shipped["clip_sample"] is False
    assert (shipped["beta_schedule"], shipped["beta_start"], shipped["beta_end"]) == ("scaled_linear", 0.00085, 0.012)


def test_shipped_teacher_has_sd15_layout(toy_teacher):
    from flow_lune.tiny import SD15_SCHEDULER_CONFIG

    unet = toy_teacher.unet.config
    assert list(unet.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert list(unet.up_block_types) == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert (
        unet.use_linear_projection is False and toy_teacher.unet.down_blocks[0].attentions[0].proj_in.weight.ndim == 4
    )
    sched = toy_teacher.scheduler.config
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type"):
        assert sched[key] == SD15_SCHEDULER_CONFIG[key], key
    assert toy_teacher.vae.config.latent_channels == 4 and len(toy_teacher.vae.config.block_out_channels) == 4
    assert toy_teacher.unet.dtype == torch.float32 and toy_teacher.safety_checker is None


def test_shipped_judge_reads_heldout_images():
    """At least 99% per attribute on held-out images the build never scored (rows 480..719)."""
    from flow_lune.toy.judge import load_judge

    judge = load_judge(judge_path())
    data = toy_arrays("heldout", 240, start=480)
    acc = (judge.predict(data.images.float() / 255.0) == data.labels).float().mean(0)
    assert (acc >= 0.99).all(), acc


@pytest.mark.parametrize("num_steps", [3, 6])
def test_from_teacher_reproduces_ddim_on_the_toy_teacher(toy_teacher, num_steps):
    """FlowLunePipeline.from_teacher on DDIM's sigmas = StableDiffusionPipeline + DDIM, on a model that draws."""
    from diffusers import StableDiffusionPipeline

    from flow_lune import FlowLunePipeline
    from flow_lune.evaluation import ddim_scheduler
    from flow_lune.flow import TeacherSchedule, noise_norm, sigma_from_t

    ddim = ddim_scheduler(toy_teacher.scheduler.config)
    pipe = StableDiffusionPipeline(**{**toy_teacher.components, "scheduler": ddim})
    pipe.set_progress_bar_config(disable=True)
    flow = FlowLunePipeline.from_teacher(pipe)
    flow.set_progress_bar_config(disable=True)
    ddim.set_timesteps(num_steps)
    sigmas = sigma_from_t(ddim.timesteps, TeacherSchedule.from_scheduler_config(ddim.config))
    prompts = ["a red circle at the left", "a blue triangle at the bottom"]
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = pipe(prompts, num_inference_steps=num_steps, guidance_scale=3.0, latents=z, output_type="latent").images
    out = flow(
        prompts, sigmas=sigmas, guidance_scale=3.0, latents=noise_norm(sigmas[0]).float() * z, output_type="latent"
    ).images
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-4


# --- build command -----------------------------------------------------------------------------------------


def test_quick_build_writes_a_loadable_pipeline_judge_and_manifest(tmp_path):
    from diffusers import StableDiffusionPipeline

    from flow_lune.toy.build import BuildConfig, build
    from flow_lune.toy.judge import load_judge

    out = tmp_path / "assets"
    manifest = build(out, BuildConfig().quick(), "test")
    assert set(manifest["stage_seconds"]) == {"data", "judge", "vae", "latents", "teacher", "check", "save"}
    pipe = StableDiffusionPipeline.from_pretrained(str(out / "teacher"), local_files_only=True)
    assert pipe.vae.config.scaling_factor == pytest.approx(manifest_scaling(out), rel=1e-6)
    assert load_judge(out / "judge").config["heads"] == {k: len(v) for k, v in ATTRIBUTES.items()}
    for rel, digest in manifest["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest


def manifest_scaling(out) -> float:
    return json.loads((out / "teacher" / "vae" / "config.json").read_text())["scaling_factor"]


def test_build_rejects_bad_arguments(capsys):
    from flow_lune.toy.build import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(["--output_dir", "x", "--threads", "0"])
    assert exc.value.code == 2 and "error: --threads must be >= 1" in capsys.readouterr().err
