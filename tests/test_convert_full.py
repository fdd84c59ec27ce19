"""flow_lune.convert on full-size SD1.5 (random weights from the SD1.5 configs, every tensor distinct).

The default suite runs one case (fp16 pipeline, 2.1 GB); fp32 (4.3 GB) and UNet-only run with
FLOW_LUNE_SLOW=1.
"""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from flow_lune.convert import convert_to_diffusers, convert_to_single_file
from flow_lune.convert.random_weights import write_random_pipeline

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "tiny-tokenizer"
WEIGHTS = {
    "unet": "unet/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}
CASES = [
    pytest.param(torch.float16, ("unet", "vae", "text_encoder"), id="fp16-full"),
    pytest.param(torch.float32, ("unet", "vae", "text_encoder"), id="fp32-full", marks=pytest.mark.slow),
    pytest.param(torch.float32, ("unet",), id="fp32-unet-only", marks=pytest.mark.slow),
]


def same_tensors(a_path: Path, b_path: Path, cast: torch.dtype | None = None) -> int:
    """Compare two safetensors files key by key (``text_model.`` ignored), one tensor at a time."""
    with safe_open(str(a_path), "pt") as a, safe_open(str(b_path), "pt") as b:
        a_keys = {k.removeprefix("text_model."): k for k in a.keys()}
        b_keys = {k.removeprefix("text_model."): k for k in b.keys()}
        assert a_keys.keys() == b_keys.keys()
        for key in a_keys:
            x, y = a.get_tensor(a_keys[key]), b.get_tensor(b_keys[key])
            assert torch.equal(x if cast is None else x.to(cast), y), key
    return len(a_keys)


@pytest.fixture
def big_tmp(tmp_path):
    """``tmp_path``, emptied after the test: the files here are gigabytes and pytest keeps old tmp folders."""
    yield tmp_path
    for child in tmp_path.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


@pytest.mark.parametrize("dtype, components", CASES)
def test_full_size_round_trip_and_diffusers_loader(big_tmp, dtype, components):
    tmp_path = big_tmp
    src = write_random_pipeline(tmp_path / "src", dtype, seed=0, components=components, tokenizer_folder=TOKENIZER_DIR)
    unet_only = components == ("unet",)
    single = tmp_path / "model.safetensors"
    result = convert_to_single_file(src / "unet" if unet_only else src, single, progress=False)
    assert result.components["unet"] == 859_520_964
    if not unet_only:
        assert result.components["vae"] == 83_653_863 and result.components["text_encoder"] == 123_060_480

    # 1. Back to diffusers: bit-identical, every key.
    back = tmp_path / "back"
    convert_to_diffusers(single, back, config=src, progress=False)
    for name in components:
        restored = back / ("diffusion_pytorch_model.safetensors" if unet_only else WEIGHTS[name])
        assert same_tensors(src / WEIGHTS[name], restored) > 0
    del back

    # 2. diffusers' own from_single_file (an independent key map) reads the same tensors, no unused keys.
    from diffusers import UNet2DConditionModel

    from flow_lune.pipelines import FlowLunePipeline  # the random folder is a Flow Lune student's (FlowLuneScheduler)

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger("diffusers").addHandler(handler)
    try:
        if unet_only:
            models = {
                "unet": UNet2DConditionModel.from_single_file(
                    str(single), config=str(src), subfolder="unet", local_files_only=True, torch_dtype=dtype
                )
            }
        else:
            pipe = FlowLunePipeline.from_single_file(
                str(single), config=str(src), local_files_only=True, torch_dtype=dtype
            )
            models = {name: getattr(pipe, name) for name in components}
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    log = stream.getvalue().lower()
    assert "unexpected" not in log and "not used" not in log and "were not" not in log, log
    for name, model in models.items():
        state = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
        with safe_open(str(src / WEIGHTS[name]), "pt") as f:
            keys = {k.removeprefix("text_model."): k for k in f.keys()}
            assert keys.keys() == state.keys(), name
            for key, orig in keys.items():
                assert torch.equal(state[key], f.get_tensor(orig)), f"{name}: {key}"
