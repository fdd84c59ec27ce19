"""Straightness of sampling paths: the formula on known trajectories, and trajectories collected by the pipeline."""

from __future__ import annotations

import pytest
import torch

from flow_lune.evaluation import sample_trajectory, straightness, straightness_summary, trajectory_straightness


def test_quadratic_path_by_hand():
    # x(s) = x_end + a s + b s^2 on s = 1, 0.5, 0: the line between the ends is x_end + s (a + b), so the middle
    # state is off by b s (s - 1) = -b / 4; S = (b^2 / 16) / 3 / (a + b)^2 = 1/192 for a = b = 1.
    s = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    x_end = torch.tensor([[2.0, -1.0]])  # (B=1, D=2); a = b = 1 in both coordinates
    states = torch.stack([x_end + si + si**2 for si in s])
    torch.testing.assert_close(straightness(states, s), torch.tensor([1 / 192], dtype=torch.float64))


def test_straight_paths_score_zero_whatever_the_speed():
    g = torch.Generator().manual_seed(0)
    start, end = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    s = torch.tensor([1.0, 0.9, 0.6, 0.2, 0.0], dtype=torch.float64)
    on_line = torch.stack([(1 - si) * end + si * start for si in s.float()])
    torch.testing.assert_close(straightness(on_line, s), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="sigmas must be"):
        straightness(on_line, s[:3])
    with pytest.raises(ValueError, match="noise to image"):
        straightness(on_line, s.flip(0))


@pytest.fixture
def tiny_flow_pipe(tiny_components):
    from flow_lune import FlowLunePipeline, FlowLuneScheduler

    pipe = FlowLunePipeline(**{**tiny_components.as_dict(), "scheduler": FlowLuneScheduler(shift=1.0)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def analytic_velocity(unet, a: float, b: float):
    """Make the UNet return v(x, sigma) = a + 2 b sigma everywhere (t = 1000 sigma)."""

    def forward(x, t, encoder_hidden_states=None, **kwargs):
        sigma = (t.double() / 1000).reshape(-1, *([1] * (x.ndim - 1)))
        return ((a + 2 * b * sigma).to(x.dtype).expand_as(x).clone(),)

    unet.forward = forward


def test_constant_velocity_gives_zero_through_the_pipeline(tiny_flow_pipe, one_thread):
    analytic_velocity(tiny_flow_pipe.unet, a=0.7, b=0.0)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    values = trajectory_straightness(tiny_flow_pipe, noise, 6, 1.0, ["a red square", "a blue circle"])
    torch.testing.assert_close(values, torch.zeros(2, dtype=torch.float64), atol=1e-10, rtol=0)


def test_curved_analytic_ode_through_the_pipeline(tiny_flow_pipe, one_thread):
    # Euler on sigma = 1, 0.5, 0 with v = a + 2 b sigma: x1 = z - a/2 - b, x2 = z - a - 3b/2; the line's middle
    # is z - a/2 - 3b/4, so the middle state is off by -b/4: S = (b^2 / 16) / 3 / (a + 3b/2)^2 = 1/300 at a = b = 1.
    analytic_velocity(tiny_flow_pipe.unet, a=1.0, b=1.0)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    traj = sample_trajectory(tiny_flow_pipe, noise, None, 1.0, ["a red square"], sigmas=[1.0, 0.5])
    assert traj.states.shape == (3, 1, 4, 8, 8) and traj.sigmas.tolist() == [1.0, 0.5, 0.0]
    assert torch.equal(traj.states[0], noise)
    torch.testing.assert_close(traj.states[2], noise - 2.5, atol=1e-5, rtol=0)
    torch.testing.assert_close(straightness(traj.states, traj.sigmas), torch.tensor([1 / 300], dtype=torch.float64))


def test_summary_is_the_mean_and_spread_of_the_paths(tiny_flow_pipe, one_thread):
    # v = a + 2 b sigma on Euler 2 steps: S = 1/300 for every path (the case above), so the spread is 0; one path
    # alone reports std 0 rather than torch's NaN.
    analytic_velocity(tiny_flow_pipe.unet, a=1.0, b=1.0)
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    prompts = ["a red square", "a blue circle", "a green triangle"]
    summary = straightness_summary(tiny_flow_pipe, noise, 2, 1.0, prompts, batch_size=2)
    assert summary["paths"] == 3 and summary["steps"] == 2 and summary["guidance"] == 1.0
    assert abs(summary["mean"] - 1 / 300) < 1e-9 and summary["std"] < 1e-9
    single = straightness_summary(tiny_flow_pipe, noise[:1], 2, 1.0, prompts[:1])
    assert single["paths"] == 1 and single["std"] == 0.0 and abs(single["mean"] - 1 / 300) < 1e-9
