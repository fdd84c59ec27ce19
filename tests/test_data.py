"""Training data on tiny components: each source's values against independent recomputation, caches, bad input."""

import json
import logging
import pickle
from contextlib import contextmanager
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from flow_lune.flow import TeacherSchedule
from flow_lune.tiny import SD15_SCHEDULER_CONFIG, tiny_sd_components
from flow_lune.training.caching import CacheWriter, cache_folder, open_cache
from flow_lune.training.data import DataConfig, collate, prepare_training_data
from flow_lune.training.data_caches import latents_key
from flow_lune.training.models import TeacherComponents
from flow_lune.training.prompts import SyntheticPrompts
from flow_lune.training.seeds import row_noise
from flow_lune.training.sources import resolve_source

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "tiny-tokenizer"
SF = 0.18215  # the tiny VAE's scaling factor, SD1.5's


@pytest.fixture(scope="module")
def parts() -> TeacherComponents:
    c = tiny_sd_components(seed=0, tokenizer_folder=TOKENIZER_DIR)
    return TeacherComponents(c.unet, c.vae, c.text_encoder, c.tokenizer, dict(SD15_SCHEDULER_CONFIG))


@contextmanager
def no_model_calls(parts: TeacherComponents):
    """Any VAE encode, UNet or text-encoder forward inside the block fails the test."""

    def fail(*args, **kwargs):
        raise AssertionError("a model was called")

    parts.vae.encode = parts.unet.forward = parts.text_encoder.forward = fail
    try:
        yield
    finally:  # drop the instance attributes: the class methods are back
        del parts.vae.encode, parts.unet.forward, parts.text_encoder.forward


@contextmanager
def count_calls(module, name):
    calls = []
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(module, name, wrapped)
    try:
        yield calls
    finally:
        delattr(module, name)


def text_embeds(parts, prompts):
    """Independent text encoding: the recipe of StableDiffusionPipeline.encode_prompt."""
    ids = parts.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return parts.text_encoder(ids.input_ids)[0]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """An imagefolder: four 64x64 images and one 96x64 (so the random crop has room), with captions."""
    folder = tmp_path_factory.mktemp("images") / "train"
    folder.mkdir()
    rng = np.random.default_rng(0)
    with open(folder / "metadata.jsonl", "w") as f:
        for i, (w, h) in enumerate([(64, 64)] * 4 + [(96, 64)]):
            yy, xx = np.mgrid[0:h, 0:w]
            # Smooth, asymmetric content: a flip visibly changes the latents.
            img = np.stack([xx * 255 / w, yy * 255 / h, rng.uniform(0, 255) + 0 * xx], -1)
            img = (img + rng.normal(0, 20, img.shape)).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(folder / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"picture number {i}"}) + "\n")
    return folder


def test_image_folder_latents_are_vae_modes_of_the_cropped_flipped_images(parts, image_folder, tmp_path):
    cfg = DataConfig(train_data_dir=str(image_folder), resolution=64, random_flip=True, seed=1, cache_dir=str(tmp_path))
    ds = prepare_training_data(cfg, parts, None)
    assert len(ds) == 5 and ds.latents_cache.meta["source"] == "images"
    assert ds.prompts == [f"picture number {i}" for i in range(5)]
    transforms = ds.latents_cache.read_json("transforms.json")
    flips = [t["flip"] for t in transforms]
    assert any(flips) and not all(flips), flips  # seed 1 gives both cases
    assert transforms[4]["crop_top_left"][0] == 0 and 0 <= transforms[4]["crop_top_left"][1] <= 32
    for i in range(5):
        arr = np.asarray(Image.open(image_folder / f"{i}.png").convert("RGB"), dtype=np.float32)
        top, left = transforms[i]["crop_top_left"]
        arr = arr[top : top + 64, left : left + 64]
        if flips[i]:
            arr = arr[:, ::-1]
        pixels = torch.from_numpy(arr.copy() / 127.5 - 1).permute(2, 0, 1)[None]
        with torch.no_grad():
            expected = parts.vae.encode(pixels).latent_dist.mode()[0] * SF
        row = ds[i]
        assert row["latents"].shape == (4, 8, 8) and row["latents"].dtype == torch.float32
        torch.testing.assert_close(row["latents"], expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(row["prompt_embeds"], text_embeds(parts, [ds.prompts[i]])[0])
    torch.testing.assert_close(ds.empty_prompt_embeds, text_embeds(parts, [""])[0])

    # Reuse: same settings, no model is called, same values.
    with no_model_calls(parts):
        again = prepare_training_data(cfg, parts, None)
    assert again.latents_cache.path == ds.latents_cache.path
    torch.testing.assert_close(again[3]["latents"], ds[3]["latents"])

    # Rebuild: another view (flip off) is another cache; the VAE runs again, the text cache is reused.
    with count_calls(parts.vae, "encode") as calls:
        other = prepare_training_data(DataConfig(**{**cfg.__dict__, "random_flip": False}), parts, None)
    assert calls and other.latents_cache.path != ds.latents_cache.path
    assert other.embeds_cache.path == ds.embeds_cache.path
    for i in range(5):
        same = (
            not flips[i]
            and transforms[i]["crop_top_left"] == other.latents_cache.read_json("transforms.json")[i]["crop_top_left"]
        )
        assert torch.allclose(other[i]["latents"], ds[i]["latents"], atol=1e-5) == same


def test_dataset_name_local_folder_matches_train_data_dir(parts, image_folder, tmp_path):
    common = dict(resolution=64, center_crop=True, cache_dir=str(tmp_path), max_train_samples=3)
    a = prepare_training_data(DataConfig(train_data_dir=str(image_folder), **common), parts, None)
    b = prepare_training_data(DataConfig(dataset_name=str(image_folder), **common), parts, None)
    assert len(a) == len(b) == 3
    for i in range(3):
        torch.testing.assert_close(a[i]["latents"], b[i]["latents"])


def save_latents_dataset(path, n=3, shape=(4, 8, 8), fmt="disk"):
    gen = torch.Generator().manual_seed(5)
    latents = torch.randn(n, *shape, generator=gen)
    data = {"latents": latents.numpy().tolist(), "prompt": [f"prompt {i % 2}" for i in range(n)]}
    if fmt == "disk":
        datasets.Dataset.from_dict(data).save_to_disk(str(path))
    else:
        path.mkdir(parents=True)
        datasets.Dataset.from_dict(data).to_parquet(str(path / "train.parquet"))
    return latents


@pytest.mark.parametrize("fmt", ["disk", "parquet"])
def test_latents_dataset_rows_and_embeds(parts, tmp_path, fmt):
    latents = save_latents_dataset(tmp_path / "lat", fmt=fmt)
    cfg = DataConfig(latents_dataset=str(tmp_path / "lat"), cache_dir=str(tmp_path / "cache"))
    ds = prepare_training_data(cfg, parts, None)
    assert len(ds) == 3 and ds.prompts == ["prompt 0", "prompt 1", "prompt 0"]
    batch = collate([ds[i] for i in range(3)])
    torch.testing.assert_close(batch["latents"], latents, rtol=0, atol=0)
    torch.testing.assert_close(batch["prompt_embeds"], text_embeds(parts, ds.prompts))
    assert batch["index"].tolist() == [0, 1, 2]
    # Two distinct prompts, two cached embeddings.
    assert ds.embeds_cache.num_rows == 2


def ddim_reference(parts, prompts, noise, steps, guidance):
    """diffusers' DDIM (eta 0, final alpha 1) with CFG in eps space over the raw UNet: independent sampler."""
    config = {k: v for k, v in SD15_SCHEDULER_CONFIG.items() if k not in ("skip_prk_steps", "set_alpha_to_one")}
    sched = DDIMScheduler(**config, set_alpha_to_one=True, clip_sample=False)
    # The bridge keeps abar in float64; share the table so only the update formulas are compared.
    sched.alphas_cumprod = TeacherSchedule.from_scheduler_config(config).alphas_cumprod.float()
    sched.final_alpha_cumprod = torch.tensor(1.0)
    sched.set_timesteps(steps)
    cond, uncond = text_embeds(parts, prompts), text_embeds(parts, [""] * len(prompts))
    x = noise.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            eps_u, eps_c = parts.unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample.chunk(2)
            x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x).prev_sample
    return x


def test_generated_latents_equal_ddim_of_the_teacher_and_are_reused(parts, tmp_path):
    (tmp_path / "prompts.txt").write_text("a red fox\n\n  a blue house  \n")
    cfg = DataConfig(
        prompts_file=str(tmp_path / "prompts.txt"),
        num_generated=3,
        generation_steps=2,
        generation_guidance=3.0,
        resolution=64,
        seed=7,
        cache_dir=str(tmp_path / "cache"),
        data_batch_size=2,
    )
    ds = prepare_training_data(cfg, parts, None)
    assert ds.prompts == ["a red fox", "a blue house", "a red fox"]  # stripped, blank skipped, cycled
    latents = collate([ds[i] for i in range(3)])["latents"]
    expected = ddim_reference(parts, ds.prompts, row_noise(range(3), (4, 8, 8), 7), 2, 3.0)
    rel = ((latents - expected).abs().max() / expected.abs().max()).item()
    # The teacher is queried at DDIM's integer t exactly (float64 timesteps); what is left is float32 roundoff,
    # amplified by the tiny random UNet: 2e-5 to 1.1e-4 by thread count. A wrong formula is off by O(1), e.g.
    # no guidance:
    assert rel < 5e-4, rel
    unguided = ddim_reference(parts, ds.prompts, row_noise(range(3), (4, 8, 8), 7), 2, 1.0)
    assert ((latents - unguided).abs().max() / unguided.abs().max()).item() > 0.05
    assert not torch.allclose(latents[0], latents[2])  # same prompt, own noise

    with no_model_calls(parts):
        again = prepare_training_data(cfg, parts, None)
    torch.testing.assert_close(collate([again[i] for i in range(3)])["latents"], latents, rtol=0, atol=0)


def test_synthetic_default_source(parts, tmp_path):
    cfg = DataConfig(num_generated=2, generation_steps=1, resolution=32, seed=4, cache_dir=str(tmp_path))
    ds = prepare_training_data(cfg, parts, None)
    assert ds.latents_cache.meta["source"] == "synthetic" and ds.prompts == SyntheticPrompts(4).generate(2)
    assert ds[1]["latents"].shape == (4, 4, 4) and torch.isfinite(ds[1]["latents"]).all()
    assert ds[1]["prompt_embeds"].shape == (77, 32)


def test_cache_key_follows_teacher_weights_and_settings(parts, tmp_path):
    cfg = DataConfig(num_generated=2, resolution=32, cache_dir=str(tmp_path))
    source = resolve_source(cfg)
    key = latents_key(source, parts, cfg, {})
    assert key == latents_key(source, parts, cfg, {})
    for change in ({"generation_steps": 3}, {"generation_guidance": 1.0}, {"seed": 1}, {"teacher_id": "x@rev"}):
        other = DataConfig(**{**cfg.__dict__, **change})
        assert cache_folder(tmp_path, "l", latents_key(resolve_source(other), parts, other, {})) != cache_folder(
            tmp_path, "l", key
        ), change
    other_teacher = tiny_sd_components(seed=1, tokenizer_folder=TOKENIZER_DIR)
    other_parts = TeacherComponents(
        other_teacher.unet, parts.vae, parts.text_encoder, parts.tokenizer, parts.scheduler_config
    )
    assert latents_key(source, other_parts, cfg, {}) != key


def test_corrupt_or_partial_cache_is_rebuilt_never_used(parts, tmp_path, caplog):
    latents = save_latents_dataset(tmp_path / "lat")
    cfg = DataConfig(latents_dataset=str(tmp_path / "lat"), cache_dir=str(tmp_path / "cache"))
    ds = prepare_training_data(cfg, parts, None)
    shard = ds.latents_cache.path / "latents-00000.safetensors"
    blob = bytearray(shard.read_bytes())
    blob[-5] ^= 0xFF  # one flipped byte inside the tensor data
    shard.write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING):
        rebuilt = prepare_training_data(cfg, parts, None)
    assert "SHA-256" in caplog.text
    torch.testing.assert_close(collate([rebuilt[i] for i in range(3)])["latents"], latents, rtol=0, atol=0)

    (ds.latents_cache.path / "manifest.json").unlink()  # as if interrupted before the manifest
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rebuilt = prepare_training_data(cfg, parts, None)
    assert "no manifest.json" in caplog.text
    torch.testing.assert_close(rebuilt[2]["latents"], latents[2], rtol=0, atol=0)
    assert not list((tmp_path / "cache").glob(".tmp-*"))


def test_cache_writer_is_atomic(tmp_path):
    path = tmp_path / "c"
    with pytest.raises(RuntimeError, match="boom"), CacheWriter(path, {"k": 1}) as writer:
        writer.add_rows("x", torch.ones(2, 3))
        raise RuntimeError("boom")
    assert not path.exists() and not list(tmp_path.iterdir())
    with CacheWriter(path, {"k": 1}, shard_bytes=24) as writer:  # 2 rows of 3 floats per shard
        writer.add_rows("x", torch.arange(15.0).reshape(5, 3))
        entry = writer.commit(num_rows=5)
    assert [rows for _, rows in entry.shards("x")] == [2, 2, 1]
    assert open_cache(path, {"k": 2}) is None  # another key never reads this folder
    torch.testing.assert_close(open_cache(path, {"k": 1}).load_tensor("x"), torch.arange(15.0).reshape(5, 3))


class FakeAccelerator:
    """The three members prepare_training_data uses, for a process that is not the main one."""

    is_main_process = False
    is_local_main_process = False

    @contextmanager
    def main_process_first(self):
        yield


def test_distributed_main_builds_others_load(parts, tmp_path):
    from accelerate import Accelerator

    save_latents_dataset(tmp_path / "lat")
    cfg = DataConfig(latents_dataset=str(tmp_path / "lat"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match="shared by all"):
        prepare_training_data(cfg, parts, FakeAccelerator())  # a non-main process never builds
    main = prepare_training_data(cfg, parts, Accelerator(cpu=True))
    with no_model_calls(parts):
        other = prepare_training_data(cfg, parts, FakeAccelerator())
    assert other.latents_cache.path == main.latents_cache.path
    loader = torch.utils.data.DataLoader(other, batch_size=2, collate_fn=collate, num_workers=1)
    batches = list(loader)
    assert [b["latents"].shape[0] for b in batches] == [2, 1]
    # Picklable with open shard handles (spawned workers): the copy reopens its files.
    copy = pickle.loads(pickle.dumps(other))
    torch.testing.assert_close(copy[2]["latents"], other[2]["latents"], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one clear error, before any model work and before any cache is written
# ---------------------------------------------------------------------------------------------------------------


def bad_inputs(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    Image.new("RGB", (64, 64)).save(img / "0.png")
    (img / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "caption": "x"}) + "\n")
    datasets.Dataset.from_dict({"lat": [[[[0.0]]]], "prompt": ["a"]}).save_to_disk(str(tmp_path / "nolat"))
    datasets.Dataset.from_dict({"latents": [], "prompt": []}).save_to_disk(str(tmp_path / "empty"))
    save_latents_dataset(tmp_path / "badshape", n=2, shape=(3, 8, 8))
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "noimages").mkdir()
    (tmp_path / "paths").mkdir()
    datasets.Dataset.from_dict({"image": ["0.png"], "text": ["x"]}).to_parquet(str(tmp_path / "paths" / "a.parquet"))
    return {
        "no such folder": (dict(train_data_dir=str(tmp_path / "nope")), ValueError, "no such folder"),
        "no such dataset folder": (dict(dataset_name=str(tmp_path / "nope")), ValueError, "no such folder"),
        "no such latents folder": (dict(latents_dataset="./nope/x"), ValueError, "no such folder"),
        "image column": (
            dict(train_data_dir=str(img), image_column="img"),
            ValueError,
            r"'img'.*\['image', 'caption'\]",
        ),
        "image feature": (dict(dataset_name=str(tmp_path / "paths")), TypeError, r"'image'.*not images"),
        "caption column": (dict(train_data_dir=str(img)), ValueError, r"no column 'text'.*\['image', 'caption'\]"),
        "latents column": (
            dict(latents_dataset=str(tmp_path / "nolat")),
            ValueError,
            r"'latents'.*\['lat', 'prompt'\]",
        ),
        "prompt column": (
            dict(latents_dataset=str(tmp_path / "nolat"), latents_column="lat", prompt_column="text"),
            ValueError,
            r"'text'.*\['lat', 'prompt'\]",
        ),
        "empty dataset": (dict(latents_dataset=str(tmp_path / "empty")), ValueError, "is empty"),
        "empty image folder": (dict(train_data_dir=str(tmp_path / "noimages")), ValueError, "noimages' is empty"),
        "latent shape": (dict(latents_dataset=str(tmp_path / "badshape")), ValueError, r"\(3, 8, 8\).*\(4, h, w\)"),
        "two sources": (dict(train_data_dir=str(img), prompts_file="p.txt"), ValueError, "one data source, got 2"),
        "resolution": (dict(resolution=60), ValueError, "multiple of 8"),
        "empty prompts file": (dict(prompts_file=str(tmp_path / "blank.txt")), ValueError, "no prompts"),
        "missing prompts file": (dict(prompts_file=str(tmp_path / "none.txt")), ValueError, "no such file"),
        "num_generated": (dict(num_generated=0), ValueError, "num_generated"),
    }


def test_every_bad_input_fails_early(parts, tmp_path):
    cache = tmp_path / "cache"
    cases = bad_inputs(tmp_path)
    for name, (overrides, error, pattern) in cases.items():
        cfg = DataConfig(cache_dir=str(cache), **overrides)
        with no_model_calls(parts), pytest.raises(error, match=pattern):
            prepare_training_data(cfg, parts, None)
        assert not cache.exists() or not [p for p in cache.iterdir() if p.name != "datasets"], name
