"""Training sigma samplers: empirical quantiles against closed-form quantile functions."""

import math

import pytest
import torch

from flow_lune.flow import SIGMA_MIN, AdaptiveSigmaSampler, SigmaSampler, loss_weight

N = 200_000
QS = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)


def shifted(u: torch.Tensor, s: float) -> torch.Tensor:
    return s * u / (1 + (s - 1) * u)


def quantiles(sampler: SigmaSampler, seed: int = 0) -> torch.Tensor:
    draws = sampler.sample(N, torch.Generator().manual_seed(seed)).double()
    return torch.quantile(draws, QS)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_uniform_quantiles(shift):
    # The shift is monotone, so quantiles map through it: q_sigma(p) = shift(p).
    torch.testing.assert_close(quantiles(SigmaSampler("uniform", shift)), shifted(QS, shift), atol=4e-3, rtol=0)


def test_uniform_shift_three_median_is_three_quarters():
    assert quantiles(SigmaSampler("uniform", 3.0))[2].item() == pytest.approx(0.75, abs=3e-3)


def test_logit_normal_quantiles():
    m, s = 0.3, 0.8
    normal_q = torch.tensor([math.sqrt(2) * torch.erfinv(2 * q - 1).item() for q in QS], dtype=torch.float64)
    expected = shifted(torch.sigmoid(m + s * normal_q), 2.0)
    got = quantiles(SigmaSampler("logit_normal", 2.0, logit_mean=m, logit_std=s))
    torch.testing.assert_close(got, expected, atol=4e-3, rtol=0)


def test_mode_quantiles():
    # u = f(r) = 1 - r - c (cos^2(pi r / 2) - 1 + r) is decreasing in r for c < 2/(pi-2): q_u(p) = f(1 - p).
    c = 0.5
    r = 1 - QS
    expected = 1 - r - c * (torch.cos(math.pi * r / 2) ** 2 - 1 + r)
    torch.testing.assert_close(quantiles(SigmaSampler("mode", 1.0, mode_scale=c)), expected, atol=4e-3, rtol=0)


def test_cosmap_quantiles():
    expected = 1 - 1 / (torch.tan(math.pi / 2 * QS) + 1)
    torch.testing.assert_close(quantiles(SigmaSampler("cosmap", 1.0)), expected, atol=4e-3, rtol=0)


def test_clip_and_seeding():
    sampler = SigmaSampler("logit_normal", 3.0, logit_mean=-4.0, logit_std=2.0)
    draws = sampler.sample(10_000, torch.Generator().manual_seed(0))
    assert draws.min() >= SIGMA_MIN and draws.max() <= 1.0
    assert (draws == SIGMA_MIN).any()
    assert torch.equal(draws, sampler.sample(10_000, torch.Generator().manual_seed(0)))
    assert not torch.equal(draws, sampler.sample(10_000, torch.Generator().manual_seed(1)))


def test_loss_weightings():
    sigma = torch.tensor([0.1, 0.5, 0.9])
    torch.testing.assert_close(loss_weight("none", sigma), torch.ones(3))
    torch.testing.assert_close(loss_weight("sigma_sqrt", sigma), 1 / sigma**2)
    torch.testing.assert_close(loss_weight("cosmap", sigma), 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2)))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: SigmaSampler("gaussian"), "Unknown sigma density"),
        (lambda: SigmaSampler("uniform", shift=0), "shift must be > 0"),
        (lambda: loss_weight("snr", torch.ones(1)), "Unknown loss weighting"),
        (lambda: AdaptiveSigmaSampler(torch.ones(10), torch.ones(9)), "one value per bin"),
        (lambda: AdaptiveSigmaSampler(torch.zeros(10), torch.ones(10)), "finite and > 0"),
    ],
)
def test_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_adaptive_unreliable_bins_get_weight_one_and_draws_follow_profile():
    bins = 100
    difficulty = 1 + torch.linspace(0, 2, bins, dtype=torch.float64)
    accuracy = torch.full((bins,), 0.5, dtype=torch.float64)
    accuracy[:30] = 0.1  # below the 0.15 threshold: no opinion
    base = SigmaSampler("uniform", 1.0)
    sampler = AdaptiveSigmaSampler(difficulty, accuracy, base=base, reliability_threshold=0.15)
    assert torch.equal(sampler.bin_weights[:30], torch.ones(30, dtype=torch.float64))
    assert torch.equal(sampler.bin_weights[30:], difficulty[30:])

    draws = sampler.sample(N, torch.Generator().manual_seed(0))
    assert draws.min() >= SIGMA_MIN and draws.max() <= 1.0
    counts = torch.bincount((draws.double() * bins).long().clamp(max=bins - 1), minlength=bins).double()
    # Uniform base: every bin has mass 1/bins, so P(bin) must be proportional to the weights.
    expected = N * sampler.bin_weights / sampler.bin_weights.sum()
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert chi2 < 160, chi2  # 99 degrees of freedom; p ~ 1e-4 at 160
    # With base_jitter = 1 each draw stays in its own bin: within-bin positions are uniform.
    frac = (draws.double() * bins) % 1
    assert abs(frac.mean().item() - 0.5) < 0.01


def test_adaptive_keeps_the_base_density_when_all_weights_are_one():
    base = SigmaSampler("uniform", 3.0)
    sampler = AdaptiveSigmaSampler(torch.full((100,), 2.0), torch.zeros(100), base=base)
    got = torch.quantile(sampler.sample(N, torch.Generator().manual_seed(5)).double(), QS)
    torch.testing.assert_close(got, shifted(QS, 3.0), atol=1e-2, rtol=0)


def test_adaptive_jitter_scales_per_bin():
    difficulty, accuracy = torch.ones(4), torch.ones(4)
    scale = torch.tensor([0.0, 0.0, 1.0, 0.0])
    narrow = AdaptiveSigmaSampler(difficulty, accuracy, base_jitter=0.0, adaptive_jitter=1.0, jitter_scale=scale)
    draws = narrow.sample(5000, torch.Generator().manual_seed(0))
    centres = torch.tensor([0.125, 0.375, 0.625, 0.875])
    on_centre = (draws[:, None] - centres).abs().min(dim=1).values < 1e-6
    assert on_centre.all()  # base_jitter 0: every bin, whatever its scale, draws its centre
    wide = AdaptiveSigmaSampler(difficulty, accuracy, base_jitter=0.5, adaptive_jitter=1.0, jitter_scale=scale)
    d = wide.sample(20000, torch.Generator().manual_seed(0))
    in_bin2 = d[(d > 0.5) & (d < 0.75)]
    assert in_bin2.min() < 0.51 and in_bin2.max() > 0.74  # bin 2: jitter 0.5 * (1 + 1) = full bin width
    in_bin0 = d[d < 0.25]
    assert in_bin0.min() > 0.0625 - 1e-6 and in_bin0.max() < 0.1875 + 1e-6  # bin 0: half width
