"""Checkpoint folders (partial ones ignored, oldest pruned), the epoch sampler and the counter-based random streams."""

import pytest
import torch

from flow_lune.training.checkpoints import EpochShuffleSampler, list_checkpoints, prune_checkpoints, resolve_resume
from flow_lune.training.seeds import RandomStreams, row_noise, row_seed, stream_seed


def test_checkpoint_folders_ignore_partial_ones_and_prune_oldest(tmp_path):
    for name in ("checkpoint-10", "checkpoint-2", "checkpoint-30", "checkpoint-40.tmp", "other"):
        (tmp_path / name).mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-10", "checkpoint-30"]
    assert resolve_resume("latest", tmp_path).name == "checkpoint-30"
    assert resolve_resume("checkpoint-10", tmp_path).name == "checkpoint-10"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume("checkpoint-40.tmp", tmp_path)
    prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint-10",
        "checkpoint-30",
        "checkpoint-40.tmp",
        "other",
    ]


def test_random_streams_and_sampler_depend_on_position_only():
    a, b = RandomStreams(seed=1), RandomStreams(seed=1)
    x = torch.randn(5, generator=a.generator("noise", 2, 7))
    assert torch.equal(x, torch.randn(5, generator=b.generator("noise", 2, 7)))
    assert not torch.equal(x, torch.randn(5, generator=b.generator("noise", 2, 8)))
    assert not torch.equal(x, torch.randn(5, generator=b.generator("sigma", 2, 7)))
    assert not torch.equal(x, torch.randn(5, generator=RandomStreams(1, process_index=1).generator("noise", 2, 7)))
    sampler = EpochShuffleSampler(10, seed=4)
    sampler.set_epoch(3)
    order = list(sampler)
    assert sorted(order) == list(range(10))
    sampler.set_epoch(0)
    assert list(sampler) != order
    sampler.set_epoch(3)
    assert list(sampler) == order


def test_seeds_are_fixed_functions_of_their_names():
    """The two key formats are pinned: cached latents and resumed runs depend on them."""
    assert stream_seed(1, "noise", 0, 2, 7) == stream_seed(1, "noise", 0, 2, 7) < 2**63
    assert stream_seed(1, "noise", 0, 2, 7) != stream_seed(1, "noise", 0, 2, 8)
    assert row_seed(7, 0, "noise") != row_seed(7, 1, "noise")
    a, b = row_noise(range(0, 3), (4, 2, 2), 7), row_noise(range(1, 3), (4, 2, 2), 7)
    assert torch.equal(a[1:], b)  # a row's noise does not depend on the rows drawn with it
