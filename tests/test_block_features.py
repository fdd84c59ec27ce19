"""Block features: the nine SD1.5 UNet blocks, forward hooks, pooled features."""

import pytest
import torch
from conftest import Wrapper
from torch import nn

from flow_lune.tiny import tiny_unet
from flow_lune.training.block_features import BLOCK_NAMES, BlockFeatureHooks, block_channels, pool_block_output

pytestmark = pytest.mark.usefixtures("one_thread")


def _cond(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 77, 32, generator=torch.Generator().manual_seed(seed))


def test_hooks_capture_nine_pooled_blocks_and_detach():
    unet = tiny_unet(0)
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0]), _cond(2)
    with BlockFeatureHooks(unet, pooled=False) as full, BlockFeatureHooks(Wrapper(unet).module) as pooled:
        Wrapper(unet)(x, t, c)
        maps, feats = full.features, pooled.features
    assert len(feats) == len(BLOCK_NAMES) == 9
    assert [f.shape[1] for f in feats] == block_channels(unet) == [32, 32, 64, 64, 64, 64, 64, 32, 32]
    for m, f in zip(maps, feats):
        assert m.ndim == 4
        torch.testing.assert_close(f, m.mean(dim=(2, 3)), rtol=0, atol=0)
    # Outside the context the hooks are gone: a new forward captures nothing.
    hooks = BlockFeatureHooks(unet)
    unet(x, t, c)
    with pytest.raises(RuntimeError, match="No features captured"):
        _ = hooks.features


def test_pool_block_output_takes_first_of_tuple():
    h = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    expected = torch.stack([torch.stack([h[b, c].sum() / 20 for c in range(3)]) for b in range(2)])
    torch.testing.assert_close(pool_block_output((h, (torch.zeros(1),))), expected)
    torch.testing.assert_close(pool_block_output(h), expected)
    with pytest.raises(TypeError):
        pool_block_output(torch.zeros(2, 3))


def test_hooks_reject_a_model_without_sd15_blocks():
    with pytest.raises(ValueError, match="down_blocks.0"):
        BlockFeatureHooks(nn.Linear(2, 2))
