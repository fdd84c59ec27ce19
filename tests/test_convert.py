"""flow_lune.convert on tiny SD1.5 components: round trips, diffusers' own loader as reference, and refusals."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flow_lune.convert import (
    ConversionError,
    comfyui_workflow,
    convert_to_diffusers,
    convert_to_single_file,
    inspect_path,
    unet_key_pairs,
    vae_key_pairs,
)
from flow_lune.convert.__main__ import main
from flow_lune.convert.architecture import expected_shapes
from flow_lune.convert.configs import builtin_config
from flow_lune.tiny import tiny_sd_components, tiny_unet

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "tiny-tokenizer"
STUDENT_SHIFT = 3.0  # the trainer's default shift; the metadata and workflow tests check it comes through
COMPONENTS = ("unet", "vae", "text_encoder")
WEIGHTS = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}


def to_single(src, dst, **kw):
    return convert_to_single_file(src, dst, progress=False, **kw)


def to_diffusers(src, dst, **kw):
    return convert_to_diffusers(src, dst, progress=False, **kw)


def folder_entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def save_flow_lune_folder(folder: Path, shift: float, seed: int = 0) -> Path:
    """A tiny FlowLunePipeline folder (the tiny SD1.5 weights of ``seed``, FlowLuneScheduler(shift)), as training
    exports a student."""
    from flow_lune.pipelines import FlowLunePipeline
    from flow_lune.schedulers import FlowLuneScheduler

    parts = tiny_sd_components(seed, tokenizer_folder=TOKENIZER_DIR).as_dict()
    parts["scheduler"] = FlowLuneScheduler(shift=shift)
    FlowLunePipeline(**parts).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    """A tiny Flow Lune student pipeline folder (shift 3), written once for the module: what to-single-file takes."""
    return save_flow_lune_folder(tmp_path_factory.mktemp("tiny-student") / "pipe", STUDENT_SHIFT)


@pytest.fixture(scope="module")
def tiny_file(student_dir, tmp_path_factory) -> Path:
    """The tiny student pipeline as one original-layout file (fp32), written once for the module."""
    dst = tmp_path_factory.mktemp("tiny-single") / "tiny.safetensors"
    to_single(student_dir, dst)
    return dst


def strip_text_model(key: str) -> str:
    return key.removeprefix("text_model.")


# ---------------------------------------------------------------- key tables


def test_key_tables_cover_sd15_and_tiny_exactly():
    """Every key of the meta model maps, one to one; spot checks against the LDM numbering."""
    unet_cfg, vae_cfg = builtin_config("unet"), builtin_config("vae")
    unet = {p.diffusers: p.ldm for p in unet_key_pairs(unet_cfg, expected_shapes("unet", unet_cfg))}
    vae = {p.diffusers: p.ldm for p in vae_key_pairs(vae_cfg, expected_shapes("vae", vae_cfg))}
    assert len(unet) == len(set(unet.values())) == 686
    assert len(vae) == len(set(vae.values())) == 248
    assert unet["down_blocks.0.downsamplers.0.conv.weight"] == "input_blocks.3.0.op.weight"
    assert unet["down_blocks.2.attentions.1.proj_in.weight"] == "input_blocks.8.1.proj_in.weight"
    assert unet["down_blocks.3.resnets.1.conv2.weight"] == "input_blocks.11.0.out_layers.3.weight"
    assert unet["up_blocks.0.upsamplers.0.conv.weight"] == "output_blocks.2.1.conv.weight"
    assert unet["up_blocks.1.upsamplers.0.conv.weight"] == "output_blocks.5.2.conv.weight"
    assert unet["up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight"] == (
        "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight"
    )
    assert unet["mid_block.resnets.1.time_emb_proj.bias"] == "middle_block.2.emb_layers.1.bias"
    assert unet["time_embedding.linear_2.weight"] == "time_embed.2.weight"
    assert vae["decoder.up_blocks.0.resnets.2.conv2.weight"] == "decoder.up.3.block.2.conv2.weight"
    assert vae["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"] == "decoder.up.0.block.0.nin_shortcut.weight"
    assert vae["encoder.mid_block.attentions.0.to_out.0.weight"] == "encoder.mid.attn_1.proj_out.weight"
    vae_pairs = vae_key_pairs(vae_cfg, expected_shapes("vae", vae_cfg))
    assert {p.ldm_shape for p in vae_pairs if p.ldm.endswith("attn_1.q.weight")} == {(512, 512, 1, 1)}
    # The tiny factory's UNet (layers_per_block 1) gets its own numbering from its config.
    tiny_cfg = dict(tiny_unet().config)
    tiny = {p.diffusers: p.ldm for p in unet_key_pairs(tiny_cfg, expected_shapes("unet", tiny_cfg))}
    assert tiny["down_blocks.0.downsamplers.0.conv.weight"] == "input_blocks.2.0.op.weight"
    assert tiny["up_blocks.1.upsamplers.0.conv.weight"] == "output_blocks.3.2.conv.weight"


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [None, "fp16"])
def test_round_trip_is_bit_identical(student_dir, tmp_path, dtype):
    """diffusers -> single file -> diffusers gives back every tensor bit for bit (in the chosen dtype)."""
    single = tmp_path / "m.safetensors"
    result = to_single(student_dir, single, dtype=dtype)
    assert result.num_tensors == sum(len(load_file(student_dir / w)) for w in WEIGHTS.values()) + 1
    back = tmp_path / "back"
    to_diffusers(single, back, config=student_dir, dtype=dtype)
    cast = torch.float16 if dtype == "fp16" else torch.float32
    for name, rel in WEIGHTS.items():
        original, restored = load_file(student_dir / rel), load_file(back / rel)
        original = {strip_text_model(k): v for k, v in original.items()}
        restored = {strip_text_model(k): v for k, v in restored.items()}
        assert original.keys() == restored.keys(), name
        for key in original:
            assert restored[key].dtype == cast
            assert torch.equal(restored[key], original[key].to(cast)), key
    from flow_lune.pipelines import FlowLunePipeline

    pipe = FlowLunePipeline.from_pretrained(back)  # loadable offline as it stands (a flow file: a FlowLunePipeline)
    assert list(pipe.unet.config.block_out_channels) == [32, 32, 64, 64]


def test_diffusers_from_single_file_reads_the_same_tensors(tiny_pipeline_dir, student_dir, tiny_file):
    """diffusers' own loader (an independent key map) gives identical tensors and logs no unused keys."""
    from diffusers import StableDiffusionPipeline

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        pipe = StableDiffusionPipeline.from_single_file(
            str(tiny_file), config=str(tiny_pipeline_dir), local_files_only=True, safety_checker=None
        )
    finally:
        logger.removeHandler(handler)
    log = stream.getvalue().lower()
    assert "unexpected" not in log and "not used" not in log and "were not" not in log, log
    for name, rel in WEIGHTS.items():
        expected = {strip_text_model(k): v for k, v in load_file(student_dir / rel).items()}
        got = {strip_text_model(k): v for k, v in getattr(pipe, name).state_dict().items()}
        assert expected.keys() == got.keys(), name
        assert all(torch.equal(got[k], expected[k]) for k in expected), name


def test_single_file_layout_and_metadata(student_dir, tiny_file):
    with safe_open(str(tiny_file), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        assert f.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape() == [64, 64, 1, 1]
        assert f.get_slice("model.diffusion_model.input_blocks.1.1.proj_in.weight").get_shape() == [32, 32, 1, 1]
        pos = f.get_tensor("cond_stage_model.transformer.text_model.embeddings.position_ids")
    assert torch.equal(pos, torch.arange(77)[None])
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in keys)
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.prediction_type"] == "flow"
    assert meta["modelspec.resolution"] == "64x64"
    assert float(meta["flow_lune.shift"]) == 3.0 and float(meta["flow_lune.cfg"]) == 4.5
    per_file = {rel: hashlib.sha256((student_dir / rel).read_bytes()).hexdigest() for rel in WEIGHTS.values()}
    assert json.loads(meta["flow_lune.source_files"]) == per_file
    manifest = "".join(f"{h}  {rel}\n" for rel, h in sorted(per_file.items()))
    assert meta["flow_lune.source_sha256"] == hashlib.sha256(manifest.encode()).hexdigest()


def test_workflow_applies_the_shift(tiny_file):
    graph = json.loads(tiny_file.with_suffix(".workflow.json").read_text())
    by_type = {node["class_type"]: (nid, node["inputs"]) for nid, node in graph.items()}
    assert set(by_type) >= {
        "CheckpointLoaderSimple",
        "ModelSamplingSD3",
        "KSampler",
        "CLIPTextEncode",
        "EmptyLatentImage",
        "VAEDecode",
        "SaveImage",
    }
    loader_id, loader = by_type["CheckpointLoaderSimple"]
    assert loader["ckpt_name"] == tiny_file.name
    ms_id, ms = by_type["ModelSamplingSD3"]
    assert ms == {"model": [loader_id, 0], "shift": 3.0}
    _, ks = by_type["KSampler"]
    assert ks["model"] == [ms_id, 0]  # the sampler sees the flow-patched model, not the loader's epsilon one
    assert ks["sampler_name"] == "euler" and ks["scheduler"] in ("simple", "normal") and ks["cfg"] == 4.5
    texts = [n["inputs"] for n in graph.values() if n["class_type"] == "CLIPTextEncode"]
    assert {tuple(t["clip"]) for t in texts} == {(loader_id, 1)} and len(texts) == 2
    assert {tuple(ks["positive"]), tuple(ks["negative"])} == {
        (nid, 0) for nid, n in graph.items() if n["class_type"] == "CLIPTextEncode"
    }
    unet_only = comfyui_workflow("u.safetensors", shift=2.0, cfg=3.0, steps=8, unet_only=True)
    assert {n["class_type"] for n in unet_only.values()} >= {"UNETLoader", "ModelSamplingSD3"}


def test_shift_comes_from_the_scheduler_config(student_dir, tmp_path):
    pipe = tmp_path / "pipe"
    shutil.copytree(student_dir, pipe)
    sched = json.loads((pipe / "scheduler" / "scheduler_config.json").read_text())
    sched["shift"] = 2.5
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    result = to_single(pipe, tmp_path / "m.safetensors", source_hash=False, cfg=6.0)
    assert result.metadata["flow_lune.shift"] == "2.5" and result.metadata["flow_lune.cfg"] == "6.0"
    graph = json.loads((tmp_path / "m.workflow.json").read_text())
    assert [n["inputs"]["shift"] for n in graph.values() if n["class_type"] == "ModelSamplingSD3"] == [2.5]
    explicit = to_single(pipe, tmp_path / "n.safetensors", shift=4.0, source_hash=False)
    assert explicit.metadata["flow_lune.shift"] == "4.0"


# ---------------------------------------------------------------- Flow Lune student vs. epsilon teacher


def flow_latents(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images


def test_flow_file_to_diffusers_gives_a_flow_lune_pipeline(tmp_path):
    """FlowLunePipeline folder -> single file -> to-diffusers: a FlowLunePipeline folder that samples the same."""
    from flow_lune.pipelines import FlowLunePipeline
    from flow_lune.schedulers import FlowLuneScheduler

    student = save_flow_lune_folder(tmp_path / "student", shift=2.0, seed=4)
    single = tmp_path / "student.safetensors"
    to_single(student, single, write_workflow=False)
    with safe_open(str(single), "pt") as f:
        assert f.metadata()["flow_lune.shift"] == "2.0"
    back = tmp_path / "back"
    result = main(["to-diffusers", str(single), str(back), "--config", str(student), "--no-progress"])
    assert result == 0
    index, saved = (json.loads((d / "model_index.json").read_text()) for d in (back, student))
    saved.pop("_diffusers_version")
    assert index == saved  # the same model index FlowLunePipeline.save_pretrained writes
    assert index["scheduler"] == ["flow_lune.schedulers.scheduling_flow_lune", "FlowLuneScheduler"]
    sched = json.loads((back / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowLuneScheduler"
    assert sched["num_train_timesteps"] == 1000 and sched["shift"] == 2.0
    assert (back / "tokenizer").is_dir()

    loaded = FlowLunePipeline.from_pretrained(back)
    assert type(loaded.scheduler) is FlowLuneScheduler and loaded.scheduler.config.shift == 2.0
    reference = flow_latents(FlowLunePipeline.from_pretrained(student))
    torch.testing.assert_close(flow_latents(loaded), reference, atol=0, rtol=0)


def test_plain_sd_file_stays_a_stable_diffusion_pipeline(tiny_pipeline_dir, student_dir, tiny_file, tmp_path):
    """Without the Flow Lune header a file gives today's StableDiffusionPipeline + PNDM; --shift opts in to flow."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from flow_lune.pipelines import FlowLunePipeline

    plain = tmp_path / "plain.safetensors"
    save_file(load_file(tiny_file), plain, metadata={"format": "pt"})  # an epsilon SD1.5 file has no flow header
    back = tmp_path / "sd"
    to_diffusers(plain, back, config=tiny_pipeline_dir)
    index = json.loads((back / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["scheduler"] == ["diffusers", "PNDMScheduler"]
    assert json.loads((back / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"
    assert type(StableDiffusionPipeline.from_pretrained(back).scheduler) is PNDMScheduler

    # --shift says the file is a flow student after all.
    flow = to_diffusers(plain, tmp_path / "flow", config=tiny_pipeline_dir, shift=2.5)
    assert FlowLunePipeline.from_pretrained(tmp_path / "flow").scheduler.config.shift == 2.5
    assert any("--shift 2.5" in n for n in flow.notes)
    # A header-less file with a Flow Lune --config: which pipeline is meant is unclear, so say how to choose.
    dst = tmp_path / "d"
    assert_refused(lambda: to_diffusers(plain, dst, config=student_dir), dst, "FlowLuneScheduler.*--shift")
    # Broken or contradictory flow headers are refused, naming --shift.
    for meta, match in [
        ({"modelspec.prediction_type": "flow"}, "no flow_lune.shift.*--shift"),
        ({"modelspec.prediction_type": "epsilon", "flow_lune.shift": "3.0"}, "'epsilon'.*flow_lune.shift.*--shift"),
        ({"flow_lune.shift": "-1"}, "not a positive number.*--shift"),
    ]:
        bad = tmp_path / "bad.safetensors"
        save_file(load_file(tiny_file), bad, metadata={"format": "pt", **meta})
        assert_refused(lambda b=bad: to_diffusers(b, dst, config=tiny_pipeline_dir), dst, match)
    # UNet-only output is unchanged; --shift there has nothing to go to.
    unet_only = tmp_path / "u.safetensors"
    to_single(student_dir / "unet", unet_only, write_workflow=False)
    assert_refused(
        lambda: to_diffusers(unet_only, dst, config=student_dir, shift=2.0), dst, "--shift is for a full file"
    )


def test_teacher_pipeline_is_not_labelled_flow(tiny_pipeline_dir, tmp_path, capsys):
    """An epsilon/v-prediction SD1.5 pipeline (DDPM-family scheduler) is refused unless --shift says it is a student."""
    dst = tmp_path / "out" / "x.safetensors"
    dst.parent.mkdir()
    assert_refused(
        lambda: to_single(tiny_pipeline_dir, dst),
        dst,
        r"PNDMScheduler \(prediction_type 'epsilon'\).*not a Flow Lune student.*FlowLuneScheduler.*--shift S",
    )
    assert main(["to-single-file", str(tiny_pipeline_dir), str(dst), "--no-progress"]) == 2
    assert "not a Flow Lune student" in capsys.readouterr().err and not dst.exists()
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_pipeline_dir, teacher)
    sched_path = teacher / "scheduler" / "scheduler_config.json"
    for cfg, match in [
        ({"_class_name": "DDIMScheduler", "prediction_type": "v_prediction"}, r"DDIMScheduler \(prediction_type 'v_"),
        ({"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear"}, "'epsilon' by diffusers' def"),
    ]:
        sched_path.write_text(json.dumps(cfg))
        assert_refused(lambda: to_single(teacher, dst), dst, match)
    # The escape hatch: an explicit --shift declares the UNet a flow student.
    result = to_single(tiny_pipeline_dir, dst, shift=3.0)
    assert result.metadata["modelspec.prediction_type"] == "flow" and result.metadata["flow_lune.shift"] == "3.0"
    assert any("PNDMScheduler" in n and "--shift 3" in n for n in result.notes)
    # A FlowMatchEulerDiscreteScheduler folder is a flow model: accepted, its shift taken.
    sched_path.write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 2.0}))
    flow = to_single(teacher, tmp_path / "fm.safetensors", write_workflow=False, source_hash=False)
    assert flow.metadata["flow_lune.shift"] == "2.0"


PROVENANCE_KEYS = {  # the flow_lune.* keys an epsilon file keeps: where it came from, nothing about sampling
    "flow_lune.version",
    "flow_lune.components",
    "flow_lune.source_kind",
    "flow_lune.ema",
    "flow_lune.source_sha256",
    "flow_lune.source_files",
}


def test_teacher_pipeline_as_epsilon_file(tiny_pipeline_dir, tmp_path, capsys):
    """--prediction-type epsilon: an honest SD1.5 teacher file that comes back as the same StableDiffusionPipeline."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from flow_lune.convert.metadata import flow_shift

    single = tmp_path / "teacher.safetensors"
    argv = ["to-single-file", str(tiny_pipeline_dir), str(single), "--prediction-type", "epsilon", "--no-progress"]
    assert main(argv) == 0
    assert "PNDMScheduler (prediction_type 'epsilon'): written as an epsilon" in capsys.readouterr().out
    with safe_open(str(single), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert {k for k in meta if k.startswith("flow_lune.")} == PROVENANCE_KEYS  # no shift, cfg, steps, convention
    assert "ModelSamplingSD3" in meta["modelspec.description"]  # says *not* to use it
    assert flow_shift(meta, str(single)) is None
    # The workflow is a plain SD1.5 graph: the sampler takes the loader's model, at SD1.5's usual guidance.
    graph = json.loads(single.with_suffix(".workflow.json").read_text())
    types = {n["class_type"] for n in graph.values()}
    assert "ModelSamplingSD3" not in types and {"CheckpointLoaderSimple", "KSampler", "VAEDecode"} <= types
    loader_id = next(nid for nid, n in graph.items() if n["class_type"] == "CheckpointLoaderSimple")
    ks = next(n["inputs"] for n in graph.values() if n["class_type"] == "KSampler")
    assert ks["model"] == [loader_id, 0] and ks["cfg"] == 7.5 and ks["scheduler"] == "normal"

    # to-diffusers with the teacher's folder as --config: a StableDiffusionPipeline with the teacher's scheduler.
    back = tmp_path / "back"
    assert main(["to-diffusers", str(single), str(back), "--config", str(tiny_pipeline_dir), "--no-progress"]) == 0
    assert "epsilon SD1.5 model: StableDiffusionPipeline with PNDMScheduler" in capsys.readouterr().out
    index = json.loads((back / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["scheduler"] == ["diffusers", "PNDMScheduler"]
    sched_file = "scheduler/scheduler_config.json"
    assert json.loads((back / sched_file).read_text()) == json.loads((tiny_pipeline_dir / sched_file).read_text())
    for name, rel in WEIGHTS.items():
        expected, got = load_file(tiny_pipeline_dir / rel), load_file(back / rel)
        assert expected.keys() == got.keys(), name
        assert all(torch.equal(got[k], expected[k]) for k in expected), name
    pipe = StableDiffusionPipeline.from_pretrained(back)
    assert type(pipe.scheduler) is PNDMScheduler and pipe.scheduler.config.prediction_type == "epsilon"

    # A UNet folder has no scheduler to contradict the explicit choice.
    unet_file = tmp_path / "unet.safetensors"
    result = to_single(tiny_pipeline_dir / "unet", unet_file, prediction_type="epsilon", source_hash=False)
    assert result.metadata["modelspec.prediction_type"] == "epsilon" and "flow_lune.shift" not in result.metadata
    assert any("no scheduler" in n for n in result.notes)
    unet_graph = json.loads(unet_file.with_suffix(".workflow.json").read_text())
    assert {n["class_type"] for n in unet_graph.values()} >= {"UNETLoader"} and "ModelSamplingSD3" not in {
        n["class_type"] for n in unet_graph.values()
    }


def test_epsilon_label_is_refused_where_it_would_lie(tiny_pipeline_dir, student_dir, tmp_path):
    """No epsilon label on a flow student, a v-prediction teacher or a training checkpoint; none with --shift."""
    dst = tmp_path / "out" / "x.safetensors"
    dst.parent.mkdir()
    eps = {"prediction_type": "epsilon"}
    assert_refused(lambda: to_single(tiny_pipeline_dir, dst, shift=3.0, **eps), dst, "--shift 3.0 with --predic")
    assert_refused(lambda: to_single(student_dir, dst, **eps), dst, "FlowLuneScheduler, a flow scheduler")
    assert_refused(lambda: to_single(tiny_pipeline_dir, dst, prediction_type="v"), dst, "expected one of flow, eps")
    vpred = tmp_path / "vpred"
    shutil.copytree(tiny_pipeline_dir, vpred)
    sched_path = vpred / "scheduler" / "scheduler_config.json"
    sched_path.write_text(json.dumps({**json.loads(sched_path.read_text()), "prediction_type": "v_prediction"}))
    assert_refused(lambda: to_single(vpred, dst, **eps), dst, "prediction_type 'v_prediction'.*not epsilon")
    # Without a flag, the teacher's refusal names --prediction-type epsilon; the v-prediction one does not.
    with pytest.raises(ConversionError, match="pass --prediction-type epsilon"):
        to_single(tiny_pipeline_dir, dst)
    with pytest.raises(ConversionError) as err:
        to_single(vpred, dst)
    assert "--prediction-type" not in str(err.value)
    checkpoint = tmp_path / "checkpoint-3"
    shutil.copytree(tiny_pipeline_dir / "unet", checkpoint / "unet")
    assert_refused(lambda: to_single(checkpoint, dst, **eps), dst, "training checkpoint.*flow student")
    # to-diffusers: an epsilon file is not made a flow pipeline, nor given a v-prediction scheduler.
    single = tmp_path / "teacher.safetensors"
    to_single(tiny_pipeline_dir, single, write_workflow=False, source_hash=False, **eps)
    back = tmp_path / "back"
    assert_refused(lambda: to_diffusers(single, back, config=tiny_pipeline_dir, shift=2.0), back, "'epsilon'.*--shift")
    assert_refused(lambda: to_diffusers(single, back, config=vpred), back, "prediction_type 'v_prediction'")
    assert_refused(lambda: to_diffusers(single, back, config=student_dir), back, "FlowLuneScheduler")


def test_unet_only_files(tiny_pipeline_dir, tmp_path):
    """A UNet folder gives a UNet-only file that diffusers reads back identically, and that converts back."""
    from diffusers import UNet2DConditionModel

    single = tmp_path / "unet.safetensors"
    to_single(tiny_pipeline_dir / "unet", single)
    with safe_open(str(single), "pt") as f:
        assert all(k.startswith("model.diffusion_model.") for k in f.keys())
    graph = json.loads(single.with_suffix(".workflow.json").read_text())
    assert "UNETLoader" in {n["class_type"] for n in graph.values()}
    expected = load_file(tiny_pipeline_dir / WEIGHTS["unet"])
    loaded = UNet2DConditionModel.from_single_file(
        str(single), config=str(tiny_pipeline_dir), subfolder="unet", local_files_only=True
    )
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())
    back = tmp_path / "unet-back"
    to_diffusers(single, back, config=tiny_pipeline_dir)
    assert folder_entries(back) == {"config.json", "diffusion_pytorch_model.safetensors"}
    restored = load_file(back / "diffusion_pytorch_model.safetensors")
    assert restored.keys() == expected.keys() and all(torch.equal(restored[k], expected[k]) for k in expected)
    UNet2DConditionModel.from_pretrained(back)
    # With --base the UNet-only source becomes a full file.
    full = tmp_path / "full.safetensors"
    result = to_single(tiny_pipeline_dir / "unet", full, base=tiny_pipeline_dir)
    assert set(result.components) == set(COMPONENTS)


def test_linear_projection_written_as_conv(tiny_pipeline_dir, tmp_path):
    """A UNet with linear proj_in/proj_out is written with 1x1 convs (SD1.5 detection) and comes back linear."""
    unet = tiny_unet(seed=3, use_linear_projection=True)
    folder = tmp_path / "linear-unet"
    unet.save_pretrained(folder)
    single = tmp_path / "linear.safetensors"
    to_single(folder, single)
    with safe_open(str(single), "pt") as f:
        assert f.get_slice("model.diffusion_model.input_blocks.1.1.proj_out.weight").get_shape() == [32, 32, 1, 1]
    back = tmp_path / "back"
    to_diffusers(single, back, config=folder)
    original, restored = unet.state_dict(), load_file(back / "diffusion_pytorch_model.safetensors")
    assert restored["down_blocks.0.attentions.0.proj_in.weight"].shape == (32, 32)
    assert all(torch.equal(restored[k], original[k]) for k in original)


# ---------------------------------------------------------------- checkpoints


def perturbed_student() -> dict[str, torch.Tensor]:
    """The tiny teacher's UNet with every weight moved: what a trained student looks like to the converter."""
    return {k: v + 0.01 for k, v in tiny_unet(seed=0).state_dict().items()}


def test_earlier_trainer_checkpoint_with_module_prefix(tiny_pipeline_dir, tmp_path):
    student = perturbed_student()
    ckpt = tmp_path / "earlier.pt"
    cfg = {"lr": 1e-5, "shift": 3.0, "blocks": ["down", "mid"]}
    torch.save(
        {"cfg": cfg, "student": {"module." + k: v for k, v in student.items()}, "opt": {}, "sched": {}, "gstep": 1200},
        ckpt,
    )
    dst = tmp_path / "student.safetensors"
    to_single(ckpt, dst, config=tiny_pipeline_dir, base=tiny_pipeline_dir)
    back = tmp_path / "back"
    to_diffusers(dst, back, config=tiny_pipeline_dir)
    restored = load_file(back / WEIGHTS["unet"])
    assert restored.keys() == student.keys() and all(torch.equal(restored[k], student[k]) for k in student)

    report = inspect_path(ckpt, reference=tiny_pipeline_dir)
    assert report.kind.startswith("earlier-trainer checkpoint")
    assert not report.comparison.same and report.comparison.different == len(student)
    assert "DIFFERS" in report.format()
    converted = inspect_path(dst, reference=tiny_pipeline_dir)
    assert "LDM single file, full" in converted.kind and not converted.comparison.same
    teacher_copy = inspect_path(tiny_pipeline_dir / "unet", reference=tiny_pipeline_dir)
    assert teacher_copy.comparison.same and "IDENTICAL" in teacher_copy.format()


def test_earlier_trainer_checkpoint_with_pickled_objects_is_refused_clearly(tiny_pipeline_dir, tmp_path):
    import argparse

    ckpt = tmp_path / "earlier.pt"
    torch.save(
        {"cfg": argparse.Namespace(lr=1), "student": tiny_unet().state_dict(), "opt": {}, "sched": {}, "gstep": 1}, ckpt
    )
    with pytest.raises(ConversionError, match="weights_only=True"):
        to_single(ckpt, tmp_path / "x.safetensors", config=tiny_pipeline_dir)
    assert not (tmp_path / "x.safetensors").exists()


def test_mixed_prefixes_are_an_error(tiny_pipeline_dir, tmp_path):
    student = tiny_unet().state_dict()
    mixed = {("module." + k if i % 2 else k): v for i, (k, v) in enumerate(student.items())}
    ckpt = tmp_path / "earlier.pt"
    torch.save({"cfg": {}, "student": mixed, "opt": {}, "sched": {}, "gstep": 0}, ckpt)
    with pytest.raises(ConversionError, match="carry the prefix 'module.'"):
        to_single(ckpt, tmp_path / "x.safetensors", config=tiny_pipeline_dir)


def test_training_checkpoint_folder(tiny_pipeline_dir, tmp_path):
    ckpt = tmp_path / "checkpoint-500"
    tiny_unet(seed=0).save_pretrained(ckpt / "unet")
    tiny_unet(seed=5).save_pretrained(ckpt / "unet_ema")
    live = to_single(ckpt, tmp_path / "live.safetensors")
    assert live.source_kind == "training checkpoint folder (unet/)"
    ema = to_single(ckpt, tmp_path / "ema.safetensors", ema="use")
    assert ema.source_kind == "training checkpoint folder (unet_ema/)"
    with safe_open(str(tmp_path / "ema.safetensors"), "pt") as f:
        got = f.get_tensor("model.diffusion_model.input_blocks.0.0.weight")
    assert torch.equal(got, tiny_unet(seed=5).state_dict()["conv_in.weight"])
    # accelerate's model.safetensors with prefixed keys, as a fallback
    acc = tmp_path / "checkpoint-600"
    acc.mkdir()
    save_file(
        {"_orig_mod." + k: v.contiguous() for k, v in tiny_unet(seed=2).state_dict().items()}, acc / "model.safetensors"
    )
    result = to_single(acc, tmp_path / "acc.safetensors", config=tiny_pipeline_dir)
    assert "accelerate" in result.source_kind


# ---------------------------------------------------------------- refusals: a clear error and no DST


def modified_ldm(tiny_file: Path, tmp_path: Path, change) -> Path:
    state = load_file(tiny_file)
    change(state)
    path = tmp_path / "modified.safetensors"
    save_file(state, path)
    return path


def assert_refused(fn, dst: Path, match: str) -> None:
    before = set(dst.parent.iterdir()) if dst.parent.exists() else set()
    with pytest.raises(ConversionError, match=match):
        fn()
    assert not dst.exists()
    after = set(dst.parent.iterdir()) if dst.parent.exists() else set()
    assert after == before, f"left behind: {after - before}"


def test_dropped_unet_key(tiny_pipeline_dir, student_dir, tmp_path):
    state = load_file(tiny_pipeline_dir / WEIGHTS["unet"])
    del state["mid_block.attentions.0.proj_out.bias"]
    folder = tmp_path / "unet"
    folder.mkdir()
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    shutil.copy(tiny_pipeline_dir / "unet" / "config.json", folder)
    dst = tmp_path / "out" / "x.safetensors"
    dst.parent.mkdir()
    assert_refused(lambda: to_single(folder, dst), dst, r"missing 1 key: mid_block\.attentions\.0\.proj_out\.bias")
    ldm = modified_ldm(
        _tiny_single(student_dir, tmp_path), tmp_path, lambda s: s.pop("model.diffusion_model.out.2.bias")
    )
    assert_refused(
        lambda: to_diffusers(ldm, tmp_path / "out" / "d", config=tiny_pipeline_dir),
        tmp_path / "out" / "d",
        r"missing 1 key: out\.2\.bias",
    )


def _tiny_single(student_dir: Path, tmp_path: Path) -> Path:
    path = tmp_path / "tiny-ok.safetensors"
    if not path.exists():
        to_single(student_dir, path, write_workflow=False, source_hash=False)
    return path


def test_renamed_vae_attention_key(student_dir, tmp_path):
    pipe = tmp_path / "pipe"
    shutil.copytree(student_dir, pipe)
    vae_file = pipe / WEIGHTS["vae"]
    state = load_file(vae_file)
    state["encoder.mid_block.attentions.0.query.weight"] = state.pop("encoder.mid_block.attentions.0.to_q.weight")
    save_file(state, vae_file)
    dst = tmp_path / "x.safetensors"
    assert_refused(
        lambda: to_single(pipe, dst),
        dst,
        r"missing 1 key: encoder\.mid_block\.attentions\.0\.to_q\.weight"
        r".*unexpected 1 key: encoder\.mid_block\.attentions\.0\.query\.weight",
    )


def test_extra_unknown_key(tiny_pipeline_dir, student_dir, tmp_path):
    single = _tiny_single(student_dir, tmp_path)
    ldm = modified_ldm(single, tmp_path, lambda s: s.__setitem__("lora_unet_foo.alpha", torch.ones(1)))
    dst = tmp_path / "d"
    assert_refused(lambda: to_diffusers(ldm, dst, config=tiny_pipeline_dir), dst, "lora_unet_foo.alpha")
    ldm2 = modified_ldm(single, tmp_path, lambda s: s.__setitem__("model.diffusion_model.extra.weight", torch.ones(1)))
    assert_refused(lambda: to_diffusers(ldm2, dst, config=tiny_pipeline_dir), dst, r"unexpected 1 key: extra\.weight")


def test_model_ema_needs_a_decision(tiny_pipeline_dir, student_dir, tmp_path):
    single = _tiny_single(student_dir, tmp_path)

    def add_ema(state):
        for key in [k for k in state if k.startswith("model.diffusion_model.")]:
            state["model_ema." + key[len("model.") :].replace(".", "")] = state[key] + 1
        state["model_ema.decay"] = torch.tensor(0.9999)
        state["model_ema.num_updates"] = torch.tensor(10, dtype=torch.int32)

    ldm = modified_ldm(single, tmp_path, add_ema)
    dst = tmp_path / "d"
    assert_refused(lambda: to_diffusers(ldm, dst, config=tiny_pipeline_dir), dst, "--ema use.*--ema drop")
    to_diffusers(ldm, tmp_path / "dropped", config=tiny_pipeline_dir, ema="drop")
    to_diffusers(ldm, tmp_path / "used", config=tiny_pipeline_dir, ema="use")
    live = load_file(student_dir / WEIGHTS["unet"])
    dropped, used = load_file(tmp_path / "dropped" / WEIGHTS["unet"]), load_file(tmp_path / "used" / WEIGHTS["unet"])
    assert all(torch.equal(dropped[k], live[k]) for k in live)
    assert all(torch.equal(used[k], live[k] + 1) for k in live)


def test_v_pred_marker_is_refused(tiny_pipeline_dir, student_dir, tmp_path):
    ldm = modified_ldm(
        _tiny_single(student_dir, tmp_path), tmp_path, lambda s: s.__setitem__("v_pred", torch.tensor([]))
    )
    dst = tmp_path / "d"
    assert_refused(lambda: to_diffusers(ldm, dst, config=tiny_pipeline_dir), dst, "v_pred")
    assert "v_pred" in inspect_path(ldm).format()


def test_pickle_named_safetensors(tiny_pipeline_dir, student_dir, tmp_path):
    fake = tmp_path / "fake.safetensors"
    torch.save(load_file(_tiny_single(student_dir, tmp_path)), fake)
    dst = tmp_path / "d"
    assert_refused(lambda: to_diffusers(fake, dst, config=tiny_pipeline_dir), dst, "pickle.*--allow-pickle")
    with pytest.raises(ConversionError, match="PICKLE.*--allow-pickle"):
        inspect_path(fake)
    assert "pickle" in inspect_path(fake, allow_pickle=True).kind
    to_diffusers(fake, dst, config=tiny_pipeline_dir, allow_pickle=True)
    assert (dst / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    # Writing a pickle needs the flag too, and the .ckpt name.
    ckpt = tmp_path / "m.ckpt"
    assert_refused(lambda: to_single(student_dir, ckpt), ckpt, "--allow-pickle")
    to_single(student_dir, ckpt, allow_pickle=True, write_workflow=False)
    assert "model.diffusion_model.conv_in.weight" not in torch.load(ckpt, weights_only=True)["state_dict"]
    assert "model.diffusion_model.input_blocks.0.0.weight" in torch.load(ckpt, weights_only=True)["state_dict"]


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_truncated_or_corrupt_safetensors(tiny_pipeline_dir, student_dir, tmp_path, damage):
    raw = _tiny_single(student_dir, tmp_path).read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(raw[: len(raw) - 1000] if damage == "truncate" else raw[:8] + b"[" + raw[9:])
    dst = tmp_path / "d"
    assert_refused(lambda: to_diffusers(bad, dst, config=tiny_pipeline_dir), dst, "not a valid safetensors file")
    with pytest.raises(ConversionError, match="truncated or corrupt"):
        inspect_path(bad)


def test_sdxl_and_sd2_are_refused(tmp_path):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    sdxl = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
        use_linear_projection=True,
    )
    sdxl.save_pretrained(tmp_path / "sdxl")
    dst = tmp_path / "x.safetensors"
    assert_refused(lambda: to_single(tmp_path / "sdxl", dst), dst, "SDXL")
    # An original-layout SDXL-shaped file: label_emb and 2048-wide cross attention.
    fake = tmp_path / "sdxl-ldm.safetensors"
    save_file(
        {
            "model.diffusion_model.label_emb.0.0.weight": torch.zeros(8, 2816),
            "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 2048),
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
        },
        fake,
    )
    assert_refused(lambda: to_diffusers(fake, tmp_path / "d"), tmp_path / "d", "SDXL")
    assert "SDXL" in inspect_path(fake).kind
    sd2 = tmp_path / "sd2-ldm.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 1024),
            "cond_stage_model.model.token_embedding.weight": torch.zeros(4, 8),
        },
        sd2,
    )
    assert_refused(lambda: to_diffusers(sd2, tmp_path / "d"), tmp_path / "d", "SD2")


def test_existing_destination_is_kept_unless_overwrite(tiny_pipeline_dir, student_dir, tmp_path):
    dst = tmp_path / "m.safetensors"
    dst.write_bytes(b"precious")
    with pytest.raises(ConversionError, match="already exists.*--overwrite"):
        to_single(student_dir, dst)
    assert dst.read_bytes() == b"precious" and not dst.with_suffix(".workflow.json").exists()
    to_single(student_dir, dst, overwrite=True)
    assert dst.stat().st_size > 1000
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="already exists"):
        to_diffusers(dst, folder, config=tiny_pipeline_dir)
    assert (folder / "keep.txt").read_text() == "x"
    to_diffusers(dst, folder, config=tiny_pipeline_dir, overwrite=True)
    assert not (folder / "keep.txt").exists() and (folder / "unet").is_dir()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_wrong_size_without_config_names_the_fix(student_dir, tmp_path):
    """A tiny file against the built-in SD1.5 config: shapes differ, and the message says to pass --config."""
    single, dst = _tiny_single(student_dir, tmp_path), tmp_path / "d"
    assert_refused(lambda: to_diffusers(single, dst), dst, "--config")


# ---------------------------------------------------------------- CLI and inspect


def test_cli_errors_exit_2_without_traceback(student_dir, tmp_path, capsys):
    dst = tmp_path / "m.safetensors"
    assert main(["to-single-file", str(student_dir), str(dst), "--no-progress"]) == 0
    assert main(["to-single-file", str(student_dir), str(dst), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "Traceback" not in err
    assert main(["inspect", str(dst), "--reference", str(student_dir), "--config", str(student_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "LDM single file, full (SD1.5)" and report["reference"]["same"] is True
    assert report["params"]["unet"] == sum(v.numel() for v in load_file(student_dir / WEIGHTS["unet"]).values())
    assert main(["to-diffusers", str(tmp_path / "missing.safetensors"), str(tmp_path / "d")]) == 2


def test_inspect_kinds(tiny_pipeline_dir, tmp_path):
    assert inspect_path(tiny_pipeline_dir).kind == "diffusers pipeline folder"
    unet_only = tmp_path / "u.safetensors"
    to_single(tiny_pipeline_dir / "unet", unet_only, write_workflow=False)
    report = inspect_path(unet_only)
    assert report.kind == "LDM single file, UNet-only (SD1.5)" and report.dtypes == {"float32": 440}
    assert inspect_path(tiny_pipeline_dir / WEIGHTS["unet"]).kind == "diffusers UNet file"
