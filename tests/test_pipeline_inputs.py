"""FlowLunePipeline's loaders and check_inputs on inputs a new user meets: one clear error, nothing on disk changed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flow_lune.convert import convert_to_single_file
from flow_lune.pipelines import FlowLunePipeline
from flow_lune.pipelines.loading_checks import looks_local
from flow_lune.schedulers import FlowLuneScheduler

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "tiny-tokenizer"
STUDENT_SHIFT = 2.5  # not the trainer's default 3 nor the scheduler's 1, so that the header's shift shows


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: what 'nothing on disk changed' compares."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


@pytest.fixture(scope="module")
def student_folder(tmp_path_factory) -> Path:
    """A tiny FlowLunePipeline folder (FlowLuneScheduler with STUDENT_SHIFT)."""
    from flow_lune.tiny import tiny_sd_components

    parts = tiny_sd_components(seed=1, tokenizer_folder=TOKENIZER_DIR).as_dict()
    parts["scheduler"] = FlowLuneScheduler(shift=STUDENT_SHIFT)
    folder = tmp_path_factory.mktemp("student") / "pipeline"
    FlowLunePipeline(**parts).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def files(student_folder, tiny_pipeline_dir, tmp_path_factory) -> dict[str, Path]:
    """The student as a flow single file, the teacher as an epsilon one, and bad files, in one folder."""
    folder = tmp_path_factory.mktemp("single-files")
    flow, eps = folder / "student.safetensors", folder / "teacher.safetensors"
    convert_to_single_file(student_folder, flow, write_workflow=False, source_hash=False, progress=False)
    convert_to_single_file(
        tiny_pipeline_dir, eps, prediction_type="epsilon", write_workflow=False, source_hash=False, progress=False
    )
    truncated = folder / "truncated.safetensors"
    truncated.write_bytes(flow.read_bytes()[:-1000])
    pickled = folder / "pickled.safetensors"
    torch.save(load_file(flow), pickled)
    sdxl = folder / "sdxl.safetensors"
    save_file(
        {
            "model.diffusion_model.label_emb.0.0.weight": torch.zeros(8, 2816),
            "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 2048),
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 8),
        },
        sdxl,
    )
    sd2 = folder / "sd2.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 1024),
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
            "cond_stage_model.model.token_embedding.weight": torch.zeros(4, 8),
        },
        sd2,
    )
    unet_only = folder / "unet-only.safetensors"
    save_file({k: v for k, v in load_file(flow).items() if k.startswith("model.diffusion_model.")}, unet_only)
    return {
        "flow": flow,
        "epsilon": eps,
        "truncated": truncated,
        "pickle": pickled,
        "sdxl": sdxl,
        "sd2": sd2,
        "unet-only": unet_only,
    }


@pytest.mark.parametrize(
    ("which", "match"),
    [
        ("truncated", r"truncated\.safetensors is not a valid safetensors file \(truncated or corrupt\)"),
        ("pickle", r"pickle \(torch.save\) file.*--allow-pickle"),
        ("sdxl", r"sdxl\.safetensors is an SDXL .*only SD1.5"),
        ("sd2", r"sd2\.safetensors is an SD2 .*only SD1.5"),
        ("unet-only", r"UNet-only file.*--base"),
        ("epsilon", r"not a Flow Lune flow model.*'epsilon'.*from_teacher"),
        ("folder", r"is a folder, not a single file.*from_pretrained"),
        ("missing", r"does not exist"),
    ],
)
def test_from_single_file_refuses_bad_files_with_one_clear_error(files, student_folder, which, match):
    folder = files["flow"].parent
    path = {"folder": student_folder, "missing": folder / "nope.safetensors"}.get(which) or files[which]
    before = snapshot(folder), snapshot(student_folder)
    with pytest.raises(ValueError, match=match) as excinfo:
        FlowLunePipeline.from_single_file(str(path), config=str(student_folder), local_files_only=True)
    one_line_error(excinfo)
    assert (snapshot(folder), snapshot(student_folder)) == before


def test_from_single_file_takes_the_shift_from_the_header(files, tiny_pipeline_dir):
    """A flow file loads with FlowLuneScheduler(header shift), even with the teacher's folder (PNDM) as config."""
    pipe = FlowLunePipeline.from_single_file(str(files["flow"]), config=str(tiny_pipeline_dir), local_files_only=True)
    assert type(pipe.scheduler) is FlowLuneScheduler and pipe.scheduler.config.shift == STUDENT_SHIFT
    # An explicit scheduler wins, and declares an unlabelled file a flow model.
    own = FlowLunePipeline.from_single_file(
        str(files["epsilon"]),
        config=str(tiny_pipeline_dir),
        local_files_only=True,
        scheduler=FlowLuneScheduler(shift=1.5),
    )
    assert own.scheduler.config.shift == 1.5


def test_from_pretrained_on_a_missing_local_path_says_so(student_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "flow-lune-output").mkdir()
    (tmp_path / "flow-lune-output" / "checkpoint-5").mkdir()
    before = snapshot(tmp_path)
    # The README's relative path, in a folder where the run has not finished: the folder and what is there.
    with pytest.raises(ValueError, match=r"'flow-lune-output/pipeline' does not exist") as excinfo:
        FlowLunePipeline.from_pretrained("flow-lune-output/pipeline")
    message = one_line_error(excinfo)
    assert str(tmp_path / "flow-lune-output" / "pipeline") in message and "checkpoint-5/" in message
    assert "OUTPUT_DIR/pipeline" in message and "neither a valid local path" not in message
    for name in (str(tmp_path / "gone" / "pipeline"), "./gone", "../gone/x", "~/surely-not-here-flow-lune", Path("x")):
        with pytest.raises(ValueError, match="does not exist") as excinfo:
            FlowLunePipeline.from_pretrained(name)
        one_line_error(excinfo)
    # A name that could be a Hub repo id is tried there (offline: fails), and the message says both.
    with pytest.raises(OSError, match=r"'someone/some-model' does not exist.*As a Hub repo id it failed too"):
        FlowLunePipeline.from_pretrained("someone/some-model")
    # A file, and a folder that is not a pipeline.
    with pytest.raises(ValueError, match="is a file, not a pipeline folder.*from_single_file"):
        FlowLunePipeline.from_pretrained(student_folder / "model_index.json")
    with pytest.raises(ValueError, match="without model_index.json.*config.json.*UNet2DConditionModel"):
        FlowLunePipeline.from_pretrained(student_folder / "unet")
    # The output folder itself: the message points at its pipeline/.
    with pytest.raises(ValueError, match=rf"the pipeline is in {student_folder}: load that folder"):
        FlowLunePipeline.from_pretrained(student_folder.parent)
    assert snapshot(tmp_path) == before
    # The good folder still loads.
    assert FlowLunePipeline.from_pretrained(student_folder).scheduler.config.shift == STUDENT_SHIFT


def test_looks_local():
    assert looks_local("/abs/path") and looks_local("./x") and looks_local("a/b/c") and looks_local(Path("x"))
    assert looks_local("a b/c")  # a space: no repo id has one
    assert not looks_local("owner/model") and not looks_local("gpt2")


@pytest.mark.parametrize("which", ["prompt_embeds", "negative_prompt_embeds"])
def test_prompt_embeds_of_another_width_are_caught_before_any_model_runs(student_folder, which):
    pipe = FlowLunePipeline.from_pretrained(student_folder)
    pipe.set_progress_bar_config(disable=True)
    calls = []
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        module.register_forward_pre_hook(lambda *a: calls.append(1))
    width = pipe.text_encoder.config.hidden_size
    good = torch.zeros(1, 77, width)
    wrong = torch.zeros(1, 77, 768)  # SD1.5's width; the tiny models have 32
    kwargs = {"prompt_embeds": good, "negative_prompt_embeds": good, which: wrong}
    if which == "negative_prompt_embeds":
        kwargs["prompt_embeds"] = None
        kwargs["prompt"] = "a cat"
    with pytest.raises(ValueError, match=rf"{which} has width 768.*cross-attention width {width}") as excinfo:
        pipe(num_inference_steps=2, output_type="latent", **kwargs)
    one_line_error(excinfo)
    assert calls == []
    # The right width samples.
    out = pipe(prompt_embeds=good, negative_prompt_embeds=good, num_inference_steps=2, output_type="latent")
    assert out.images.shape[1] == pipe.unet.config.in_channels
