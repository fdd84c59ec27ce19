"""FlowLuneScheduler against diffusers' FlowMatchEulerDiscreteScheduler and the flow formulas."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flow_lune.flow import euler_step, flow_state, shift_sigma
from flow_lune.schedulers import FlowLuneScheduler


def shifted(sigma: float, s: float) -> float:
    return s * sigma / (1 + (s - 1) * sigma)


def test_four_steps_shift_three_is_shifted_once():
    sched = FlowLuneScheduler(shift=3.0)
    sched.set_timesteps(4)
    expected = [shifted(x, 3.0) for x in (1.0, 0.75, 0.5, 0.25)] + [0.0]
    torch.testing.assert_close(sched.sigmas.float(), torch.tensor(expected))
    assert sched.sigmas.dtype == torch.float64  # exact sigmas; the Euler step and timesteps are float32
    torch.testing.assert_close(sched.timesteps, torch.tensor(expected[:-1]) * 1000)
    assert sched.timesteps.dtype == torch.float32
    assert sched.init_noise_sigma == 1.0


def test_diffusers_double_shift_is_the_only_difference():
    """diffusers shifts its already shifted training table again; FlowLune shifts once."""
    ours, theirs = FlowLuneScheduler(shift=3.0), FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours.set_timesteps(4)
    theirs.set_timesteps(4)
    torch.testing.assert_close(theirs.sigmas, torch.tensor([1.0, 0.858, 0.602, 0.0089, 0.0]), atol=1e-3, rtol=0)
    assert (ours.sigmas - theirs.sigmas).abs().max() > 0.4
    # diffusers spaces its grid linearly between the ends of its *shifted* training table
    # (1 and shift(1/1000)), then shifts it: the low end is shifted twice.
    table_min = shifted(1 / 1000, 3.0)
    base = torch.linspace(1.0, table_min, 4, dtype=torch.float64)
    double = shift_sigma(base, 3.0)
    torch.testing.assert_close(theirs.sigmas[:-1].double(), double, atol=1e-6, rtol=0)
    # Explicit sigmas: diffusers shifts them, FlowLune uses them as given.
    ours.set_timesteps(sigmas=[0.9, 0.5])
    theirs.set_timesteps(sigmas=[0.9, 0.5])
    torch.testing.assert_close(ours.sigmas.float(), torch.tensor([0.9, 0.5, 0.0]))
    torch.testing.assert_close(theirs.sigmas, torch.tensor([shifted(0.9, 3.0), shifted(0.5, 3.0), 0.0]))
    # At shift 1 there is no shift to apply twice, and only the base grids differ.
    one = FlowMatchEulerDiscreteScheduler(shift=1.0)
    one.set_timesteps(4)
    torch.testing.assert_close(one.sigmas[:-1].double(), torch.linspace(1.0, 1 / 1000, 4, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_step_identical_to_diffusers_for_identical_sigmas(dtype):
    sigmas = [1.0, 0.93, 0.7, 0.31, 0.05]
    # diffusers shifts explicit sigmas too (a third trap); at shift 1 it uses them as given.
    ours, theirs = FlowLuneScheduler(shift=3.0), FlowMatchEulerDiscreteScheduler(shift=1.0)
    ours.set_timesteps(sigmas=sigmas)
    theirs.set_timesteps(sigmas=sigmas)
    torch.testing.assert_close(ours.sigmas.float(), theirs.sigmas, rtol=0, atol=0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen).to(dtype)
    y = x.clone()
    for t_ours, t_theirs in zip(ours.timesteps, theirs.timesteps):
        v = torch.randn(2, 4, 8, 8, generator=gen).to(dtype)
        x = ours.step(v, t_ours, x).prev_sample
        y = theirs.step(v, t_theirs, y).prev_sample
        assert torch.equal(x, y)
        assert x.dtype == dtype


def test_from_config_both_ways_keeps_the_shift():
    ours = FlowLuneScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert ours.config.shift == 3.0 and isinstance(ours, FlowLuneScheduler)
    theirs = FlowMatchEulerDiscreteScheduler.from_config(FlowLuneScheduler(shift=2.5).config)
    assert theirs.config.shift == 2.5
    assert FlowLuneScheduler.from_config(FlowMatchEulerDiscreteScheduler().config).config.shift == 1.0


def test_save_load_round_trip(tmp_path):
    FlowLuneScheduler(shift=3.0).save_pretrained(tmp_path)
    assert FlowLuneScheduler.from_pretrained(tmp_path).config.shift == 3.0
    assert FlowMatchEulerDiscreteScheduler.from_pretrained(tmp_path).config.shift == 3.0


def test_explicit_sigmas_used_exactly():
    sched = FlowLuneScheduler(shift=3.0)
    sched.set_timesteps(sigmas=[0.9, 0.5, 0.1])
    torch.testing.assert_close(sched.sigmas.float(), torch.tensor([0.9, 0.5, 0.1, 0.0]))
    sched.set_timesteps(sigmas=[0.9, 0.5, 0.0])  # a terminal 0 already there is not doubled
    torch.testing.assert_close(sched.sigmas.float(), torch.tensor([0.9, 0.5, 0.0]))
    assert sched.num_inference_steps == 2


def test_euler_solves_a_straight_flow_exactly():
    """x_sigma = (1 - sigma) x0 + sigma eps has constant velocity eps - x0: Euler lands on x0."""
    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64)
    sched = FlowLuneScheduler(shift=3.0)
    sched.set_timesteps(7)
    x = flow_state(x0, eps, 1.0)
    for t in sched.timesteps:
        x = sched.step(eps - x0, t, x).prev_sample
    torch.testing.assert_close(x, x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(euler_step(flow_state(x0, eps, 0.8), eps - x0, 0.8, 0.3), flow_state(x0, eps, 0.3))


def test_scale_noise_and_add_noise_give_the_flow_state():
    gen = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 3, 4, 4, 4, generator=gen)
    sched = FlowLuneScheduler()
    torch.testing.assert_close(sched.scale_noise(x0, 250.0, eps), 0.75 * x0 + 0.25 * eps)
    out = sched.add_noise(x0, eps, torch.tensor([100.0, 900.0, 500.0]))
    for i, s in enumerate([0.1, 0.9, 0.5]):
        torch.testing.assert_close(out[i], (1 - s) * x0[i] + s * eps[i])
    assert torch.equal(sched.scale_model_input(x0, 500.0), x0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "num_inference_steps or sigmas"),
        ({"sigmas": [0.5, 0.7]}, "strictly decreasing"),
        ({"sigmas": [1.2, 0.5]}, r"\[0, 1\]"),
        ({"sigmas": [0.5, -0.1]}, r"\[0, 1\]"),
        ({"num_inference_steps": 0}, "positive integer"),
        ({"num_inference_steps": 3, "sigmas": [0.9, 0.5]}, "pass one of the two"),
    ],
)
def test_bad_schedules_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlowLuneScheduler().set_timesteps(**kwargs)


def test_bad_shift_raises():
    with pytest.raises(ValueError, match="shift must be > 0"):
        FlowLuneScheduler(shift=0.0)
    with pytest.raises(ValueError, match="shift must be > 0"):
        shift_sigma(0.5, -1.0)


def test_step_past_the_end_raises():
    sched = FlowLuneScheduler()
    sched.set_timesteps(1)
    x = torch.zeros(1, 4, 2, 2)
    sched.step(x, sched.timesteps[0], x)
    with pytest.raises(ValueError, match="set_timesteps again"):
        sched.step(x, sched.timesteps[0], x)
