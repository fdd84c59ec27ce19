"""Fusion of e_t, e_p, coh into lambda_b (training/fusion.py)."""

import pytest
import torch

from flow_lune.training.fusion import FusionConfig, fuse_block_weights

W = torch.tensor([0.7, 0.9, 1.0, 1.1, 1.2, 1.1, 1.0, 0.9, 0.7])  # DESIGN.md section 5, written out independently


def reference(w, e_t, e_p, coh, a, b, d, lo, hi):
    out = []
    for wi, ti, pi, ci in zip(w.tolist(), e_t.tolist(), e_p.tolist(), coh.tolist()):
        out.append(min(max(wi * (1 + a * ti + b * pi + d * (1 - ci)), lo), hi))
    return torch.tensor(out, dtype=torch.float64)


def test_equals_base_weights_when_signals_are_zero():
    zeros, ones = torch.zeros(9), torch.ones(9)
    lam = fuse_block_weights(W, zeros, zeros, ones, FusionConfig())
    torch.testing.assert_close(lam, W, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "cfg", [FusionConfig(), FusionConfig(alpha=3.0, beta=2.0, delta=1.0), FusionConfig(lam_min=0.8, lam_max=1.3)]
)
def test_matches_reference_and_respects_bounds(dtype, cfg):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        e_t, e_p, coh = (torch.rand(9, generator=g, dtype=dtype) for _ in range(3))
        w = W.to(dtype) * (0.2 + 3 * torch.rand(9, generator=g, dtype=dtype))  # some below / above the bounds
        lam = fuse_block_weights(w, e_t, e_p, coh, cfg)
        assert lam.dtype == dtype and not lam.requires_grad
        assert (lam >= cfg.lam_min).all() and (lam <= cfg.lam_max).all()
        ref = reference(w, e_t, e_p, coh, cfg.alpha, cfg.beta, cfg.delta, cfg.lam_min, cfg.lam_max)
        torch.testing.assert_close(lam.double(), ref)


def test_bounds_are_hit():
    lam = fuse_block_weights(W * 10, torch.ones(9), torch.ones(9), torch.zeros(9), FusionConfig())
    assert (lam == 3.0).all()
    lam = fuse_block_weights(W * 0.01, torch.zeros(9), torch.zeros(9), torch.ones(9), FusionConfig())
    assert (lam == 0.5).all()


def test_no_grad():
    e_t = torch.rand(9, requires_grad=True)
    lam = fuse_block_weights(W, e_t, torch.zeros(9), torch.ones(9), FusionConfig())
    assert not lam.requires_grad


@pytest.mark.parametrize(
    "kwargs",
    [dict(alpha=-0.1), dict(lam_min=2.0, lam_max=1.0), dict(delta=float("nan")), dict(lam_min=-1.0)],
)
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        FusionConfig(**kwargs)


def test_bad_signals():
    cfg = FusionConfig()
    with pytest.raises(ValueError, match="e_t"):
        fuse_block_weights(W, torch.full((9,), 1.5), torch.zeros(9), torch.ones(9), cfg)
    with pytest.raises(ValueError, match="coh"):
        fuse_block_weights(W, torch.zeros(9), torch.zeros(9), torch.ones(8), cfg)
    with pytest.raises(TypeError):
        fuse_block_weights(W, torch.zeros(9), torch.zeros(9), torch.ones(9), {"alpha": 0.5})


def test_none_gives_base_weights_exactly_and_zero_signals_fuse_to_the_same():
    from flow_lune.training.block_features import BASE_BLOCK_WEIGHTS
    from flow_lune.training.block_penalty import ConstantBlockPenalty, build_block_penalty

    none = build_block_penalty("none", BASE_BLOCK_WEIGHTS, FusionConfig(), "cpu")
    assert isinstance(none, ConstantBlockPenalty)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):  # whatever the features and sigma
        f = [torch.randn(2, c, generator=g) for c in (32, 32, 64, 64, 64, 64, 64, 32, 32)]
        out = none(f, [x.flip(0) for x in f], torch.rand(2, generator=g))
        torch.testing.assert_close(out.lam, W, rtol=0, atol=0)
        assert out.e_t is None and out.e_p is None and out.coh is None
    # an assessor with all signals at zero (e_t = e_p = 0, coh = 1) gives the same lambda_b as none
    lam = fuse_block_weights(
        torch.tensor(BASE_BLOCK_WEIGHTS), torch.zeros(9), torch.zeros(9), torch.ones(9), FusionConfig()
    )
    torch.testing.assert_close(lam, out.lam, rtol=0, atol=0)
