"""Shared fixtures: tiny SD1.5 components built from configs, offline."""

import os

# No test may reach the Hugging Face Hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from flow_lune.tiny import TinySDComponents, tiny_sd_components  # noqa: E402

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "tiny-tokenizer"
REPO = Path(__file__).resolve().parents[1]  # where the scripts live; never put on sys.path


def load_script(name: str):
    """A top-level script of the repository (e.g. ``train_flow_distill.py``) imported from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Wrapper(torch.nn.Module):
    """Stands in for DDP: the hooked UNet is inside ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


@pytest.fixture
def tiny_components() -> TinySDComponents:
    """Fresh tiny SD1.5 components (seed 0), the tokenizer read from the files shipped in tests/."""
    return tiny_sd_components(seed=0, tokenizer_folder=TOKENIZER_DIR)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A tiny StableDiffusionPipeline folder on disk (seed 0), written once per session."""
    from flow_lune.tiny import save_tiny_sd_pipeline

    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-sd15") / "pipe", seed=0)


@pytest.fixture(scope="session")
def trainer_cache(tmp_path_factory) -> Path:
    """One trainer --cache_dir (tiny teacher, generated latents, embeddings) for every trainer test module: runs
    with the same data flags reuse the same caches instead of rebuilding them per module."""
    return tmp_path_factory.mktemp("flow-lune-cache")


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; on a shared 2-core machine two threads can be 100x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_configure(config):
    """``slow``: full-size conversions and the like, run only with FLOW_LUNE_SLOW=1."""
    config.addinivalue_line("markers", "slow: long tests, skipped unless FLOW_LUNE_SLOW=1")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FLOW_LUNE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow; set FLOW_LUNE_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
