"""The tiny SD1.5 factory and the project's installed layout."""

import json
import subprocess
import sys
from pathlib import Path

from flow_lune.tiny import TINY_UNET_CONFIG, byte_level_vocab, tiny_sd_components, tiny_tokenizer

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "tiny-tokenizer"
ROOT = Path(__file__).resolve().parents[1]


def test_shipped_tokenizer_files_are_the_byte_level_vocabulary():
    assert json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8")) == byte_level_vocab()
    assert (TOKENIZER_DIR / "vocab.json").stat().st_size < 16_000
    shipped, built = tiny_tokenizer(TOKENIZER_DIR), tiny_tokenizer()
    for prompt in ["a red cat", "Ünïcode & émoji ☾", ""]:
        assert shipped(prompt).input_ids == built(prompt).input_ids
    ids = shipped("ab", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == 0 and ids[3] == 1  # bos, a, b</w>, eos


def test_components_keep_sd15_layout_and_are_seeded(tiny_components):
    unet = tiny_components.unet
    assert len(unet.down_blocks) == 4 and len(unet.up_blocks) == 4
    assert unet.down_blocks[0].attentions[0].proj_in.weight.ndim == 4  # conv 1x1, as SD1.5
    assert unet.config.cross_attention_dim == tiny_components.text_encoder.config.hidden_size
    assert 2 ** (len(tiny_components.vae.config.block_out_channels) - 1) == 8
    assert tiny_components.scheduler.config.prediction_type == "epsilon"
    other = tiny_sd_components(seed=0)
    assert all((a == b).all() for a, b in zip(unet.state_dict().values(), other.unet.state_dict().values()))
    different = tiny_sd_components(seed=1)
    assert any((a != b).any() for a, b in zip(unet.state_dict().values(), different.unet.state_dict().values()))
    assert TINY_UNET_CONFIG["use_linear_projection"] is False


def test_install_claims_only_the_flow_lune_namespace(tmp_path):
    """Installed, the subpackages live under flow_lune; no generic top-level name is importable."""
    code = (
        "import importlib.util as u, flow_lune.flow, flow_lune.schedulers, flow_lune.pipelines, flow_lune.convert, "
        "flow_lune.training; "
        "print([n for n in ('flow', 'convert', 'pipelines', 'schedulers', 'training') if u.find_spec(n)])"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    setup_py = (ROOT / "setup.py").read_text()
    assert '"flow_lune.convert": "convert"' in setup_py
