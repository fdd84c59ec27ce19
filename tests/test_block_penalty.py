"""lambda_b of the KD penalty: the constant control (``--assessor none``) and the builder."""

import pytest
import torch

from flow_lune.training.block_features import BASE_BLOCK_WEIGHTS
from flow_lune.training.block_penalty import BlockWeights, ConstantBlockPenalty, build_block_penalty


def test_constant_block_penalty_and_builder():
    penalty = build_block_penalty("none", BASE_BLOCK_WEIGHTS, fusion=None, device="cpu")
    assert isinstance(penalty, ConstantBlockPenalty)
    feats = [torch.randn(2, 3) for _ in range(9)]
    out = penalty(feats, feats, torch.tensor([0.5, 0.5]))
    assert isinstance(out, BlockWeights) and out.e_t is None
    torch.testing.assert_close(out.lam, torch.tensor(BASE_BLOCK_WEIGHTS))
    with pytest.raises(ValueError, match="9 finite values"):
        ConstantBlockPenalty([1.0, 2.0])
