"""The converter's file sniffing and destination checks, on inputs a new user meets (issue 12, items 5 and 6)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flow_lune.convert import ConversionError, convert_to_diffusers, convert_to_single_file, inspect_path
from flow_lune.convert.__main__ import main
from flow_lune.convert.sfio import read_header, sniff_format

PICKLE_PROTO_BYTE = 0x80  # what a protocol-2+ pickle starts with; also the low byte of 1 header length in 256


def header_length(path: Path) -> int:
    """The 8-byte little-endian header length at the start of a safetensors file."""
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def save_with_header_length(tensors: dict[str, torch.Tensor], path: Path, second_byte: int) -> int:
    """Save ``tensors`` with safetensors' own writer, padding a metadata value until the header length's first
    byte is 0x80 and its second ``second_byte`` (<= 5: the pair then also reads as a pickle protocol header)."""
    save_file(tensors, path, metadata={"pad": ""})
    base = header_length(path)
    target = PICKLE_PROTO_BYTE + 256 * second_byte
    while target < base:
        target += 65536  # keep the two low bytes, go past the unpadded header
    for pad in range(target - base - 8, target - base + 9):
        if pad < 0:
            continue
        save_file(tensors, path, metadata={"pad": "x" * pad})
        if header_length(path) == target:
            return target
    raise AssertionError(f"could not reach a header length of {target} (unpadded {base})")


@pytest.fixture(scope="module")
def epsilon_file(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """The tiny SD1.5 teacher as an honest epsilon single file, written once for the module."""
    dst = tmp_path_factory.mktemp("eps-single") / "teacher.safetensors"
    convert_to_single_file(
        tiny_pipeline_dir, dst, prediction_type="epsilon", write_workflow=False, source_hash=False, progress=False
    )
    return dst


@pytest.mark.parametrize("second_byte", [0, 2, 5])
def test_safetensors_whose_header_length_starts_with_0x80_is_not_a_pickle(
    epsilon_file, tiny_pipeline_dir, tmp_path, capsys, second_byte
):
    """About one safetensors file in 256 opens with the bytes of a pickle's protocol opcode; it is still read."""
    tensors = load_file(epsilon_file)
    with safe_open(str(epsilon_file), framework="pt") as f:
        metadata = f.metadata()
    crafted = tmp_path / "crafted.safetensors"
    n = save_with_header_length(tensors, crafted, second_byte)
    head = crafted.read_bytes()[:2]
    assert head[0] == PICKLE_PROTO_BYTE and head[1] == second_byte  # what the old sniffing called a pickle
    # safetensors itself reads it, and so does the converter.
    with safe_open(str(crafted), framework="pt") as f:
        assert set(f.keys()) == set(tensors) and f.metadata()["pad"].startswith("x")
    assert sniff_format(crafted) == "safetensors"
    header = read_header(crafted)
    assert header.header_bytes == n and set(header.tensors) == set(tensors)
    assert main(["inspect", str(crafted)]) == 0
    out = capsys.readouterr().out
    assert "LDM single file, full (SD1.5)" in out and "pickle" not in out.lower()
    # A full conversion back to diffusers gives the same weights as the untouched file.
    assert metadata["modelspec.prediction_type"] == "epsilon"
    back = convert_to_diffusers(crafted, tmp_path / "back", config=tiny_pipeline_dir, progress=False)
    assert back.dst.is_dir()
    unet = load_file(tmp_path / "back" / "unet" / "diffusion_pytorch_model.safetensors")
    ref = load_file(tiny_pipeline_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert unet.keys() == ref.keys() and all(torch.equal(unet[k], ref[k]) for k in ref)


@pytest.mark.parametrize("legacy", [False, True])
def test_real_pickles_are_still_called_pickles(tmp_path, capsys, legacy):
    """torch.save's zip container and its legacy (protocol 2) format are both refused as pickles, exit 2."""
    fake = tmp_path / "fake.safetensors"
    torch.save({"w": torch.zeros(3)}, fake, _use_new_zipfile_serialization=not legacy)
    assert sniff_format(fake) == "pickle"
    before = fake.read_bytes()
    with pytest.raises(ConversionError, match="PICKLE.*--allow-pickle"):
        inspect_path(fake)
    assert main(["inspect", str(fake)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("flow-lune-convert: error:") and "PICKLE" in err[0]
    assert fake.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["fake.safetensors"]
    # With the flag, inspect looks inside and exits 0.
    assert main(["inspect", str(fake), "--allow-pickle"]) == 0
    assert "pickle" in capsys.readouterr().out


def test_inspect_exits_nonzero_on_files_it_cannot_read(tmp_path, capsys):
    """Random bytes and a truncated safetensors file: one error line, exit 2."""
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model at all")
    assert sniff_format(junk) == "unknown"
    assert main(["inspect", str(junk)]) == 2
    truncated = tmp_path / "cut.safetensors"
    save_file({"w": torch.zeros(64)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:-10])
    assert main(["inspect", str(truncated)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("not a valid safetensors file" in line for line in err)


def test_existing_workflow_beside_dst_is_refused_before_any_work(tiny_pipeline_dir, tmp_path, capsys):
    """DST.workflow.json is part of DST: an existing one is refused without --overwrite, before reading SRC."""
    dst = tmp_path / "teacher.safetensors"
    workflow = tmp_path / "teacher.workflow.json"
    workflow.write_text('{"mine": true}\n')
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    argv = ["to-single-file", str(tiny_pipeline_dir), str(dst), "--prediction-type", "epsilon", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(workflow) in err[0] and "--overwrite" in err[0]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # Checked before any work: a SRC that does not exist is not even looked at.
    with pytest.raises(ConversionError, match="workflow.json already exists"):
        convert_to_single_file(tmp_path / "no-such-src", dst, progress=False)
    # --no-workflow writes no workflow, so the existing one is no obstacle and stays as it was.
    assert main([*argv, "--no-workflow"]) == 0
    assert workflow.read_text() == '{"mine": true}\n' and dst.is_file()
    dst.unlink()
    # --overwrite replaces both.
    assert main([*argv, "--overwrite"]) == 0
    assert dst.is_file() and "CheckpointLoaderSimple" in workflow.read_text()
