"""The teacher bridge against independent references: diffusers' DDIMScheduler and closed forms."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from flow_lune.flow import (
    EpsilonToFlowUNet,
    TeacherSchedule,
    euler_step,
    guided_velocity,
    sigma_from_t,
    t_from_sigma,
    teacher_query,
    velocity_from_eps,
)
from flow_lune.schedulers import FlowLuneScheduler
from flow_lune.tiny import SD15_SCHEDULER_CONFIG


@pytest.fixture(scope="module")
def schedule() -> TeacherSchedule:
    return TeacherSchedule.from_scheduler_config(SD15_SCHEDULER_CONFIG)


def ddim(num_steps: int, dtype=torch.float32) -> DDIMScheduler:
    """diffusers' DDIM (eta 0, no clipping, final alpha 1) over the same abar table as the bridge.

    diffusers accumulates abar in float32; the bridge keeps float64. Sharing the table isolates
    what is compared: DDIM's update formula against Euler with the bridge velocity.
    """
    config = {k: v for k, v in SD15_SCHEDULER_CONFIG.items() if k not in ("skip_prk_steps", "set_alpha_to_one")}
    sched = DDIMScheduler(**config, set_alpha_to_one=True, clip_sample=False)
    sched.alphas_cumprod = TeacherSchedule.from_scheduler_config(config).alphas_cumprod.to(dtype)
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=dtype)
    sched.set_timesteps(num_steps)
    return sched


def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic, nonlinear stand-in for a teacher's epsilon prediction."""
    t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return torch.tanh(0.7 * x + 0.3 * torch.roll(x, 1, dims=-1)) * (0.5 + t / 1000) + 0.1 * torch.sin(t / 97)


def test_schedule_range_matches_sd15(schedule):
    # Independent: scaled-linear betas written out here, not read from diffusers.
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(schedule.alphas_cumprod, abar, rtol=1e-6, atol=0)
    assert schedule.sigma_max == pytest.approx(0.93596, abs=1e-5)
    assert schedule.sigma_min == pytest.approx(0.02834, abs=1e-5)
    a, s = abar.sqrt(), (1 - abar).sqrt()
    torch.testing.assert_close(sigma_from_t(torch.arange(1000), schedule), s / (a + s), rtol=1e-6, atol=0)


def test_t_sigma_round_trips(schedule):
    t = torch.arange(1000, dtype=torch.float64)
    assert (t_from_sigma(sigma_from_t(t.long(), schedule), schedule) - t).abs().max() < 1e-9
    sigma = torch.linspace(schedule.sigma_min, schedule.sigma_max, 997, dtype=torch.float64)
    t_cont = t_from_sigma(sigma, schedule)
    # Back to sigma by interpolating log(s/a) at the continuous t (the inverse of the forward map).
    low = t_cont.floor().long().clamp(max=998)
    w = t_cont - low
    table = schedule.log_snr_sigmas
    rho = torch.exp((1 - w) * table[low] + w * table[low + 1])
    torch.testing.assert_close(rho / (1 + rho), sigma, rtol=1e-12, atol=1e-12)
    # Outside the teacher's range t clamps; sigma = 0 and 1 stay finite.
    assert t_from_sigma(torch.tensor([0.0, 0.01, 0.99, 1.0], dtype=torch.float64), schedule).tolist() == [
        0.0,
        0.0,
        999.0,
        999.0,
    ]


@pytest.mark.parametrize("num_steps", [4, 10, 25])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_euler_with_bridge_velocity_is_ddim(schedule, num_steps, dtype, tol):
    sched = ddim(num_steps, dtype)
    ts = sched.timesteps
    sigmas = torch.cat([sigma_from_t(ts, schedule), torch.zeros(1, dtype=torch.float64)])
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64).to(dtype)

    ddim_traj = [x_t]
    for t in ts:
        ddim_traj.append(sched.step(eps_fn(ddim_traj[-1], t.expand(2)), t, ddim_traj[-1]).prev_sample)

    x = x_t * (1 / (schedule.a[ts[0]] + schedule.s[ts[0]])).to(dtype)  # x_sigma = x_t * n(sigma)
    for i in range(len(ts)):
        sigma = sigmas[i].to(dtype).expand(2)
        q = teacher_query(x, sigma, schedule)
        v = velocity_from_eps(x, sigma, eps_fn(q.x_t, q.t), schedule)
        x = euler_step(x, v, sigmas[i].to(dtype), sigmas[i + 1].to(dtype))
        a, s = schedule.a, schedule.s
        prev_t = ts[i + 1] if i + 1 < len(ts) else None
        scale = 1.0 if prev_t is None else float(a[prev_t] + s[prev_t])  # x_t = x_sigma * (a + s)
        expected = ddim_traj[i + 1]
        err = (x * scale - expected).abs().max().item()
        if dtype == torch.float64:
            assert err < tol, (i, err)
        else:
            assert err / expected.abs().max().item() < tol, (i, err)


def test_velocity_above_sigma_max_carries_noise_to_ddim_start(schedule):
    """Above sigma(999) v* is the rescaling x = n(sigma) z: integrated from sigma = 1 (an independent RK4 on
    dx/dsigma = v*) it reaches DDIM's start n(sigma(999)) z, whatever the teacher predicts there."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, 8, 8, generator=gen, dtype=torch.float64)
    eps = torch.randn(1, 4, 8, 8, generator=gen, dtype=torch.float64)  # ignored above the range
    s_max = schedule.sigma_max

    def v(x, s):
        return velocity_from_eps(x, torch.tensor([s], dtype=torch.float64), eps, schedule)

    x, grid = z.clone(), torch.linspace(1.0, s_max + 2e-6, 201, dtype=torch.float64).tolist()
    for s0, s1 in zip(grid[:-1], grid[1:]):
        h = s1 - s0
        k1 = v(x, s0)
        k2 = v(x + h / 2 * k1, s0 + h / 2)
        k3 = v(x + h / 2 * k2, s0 + h / 2)
        k4 = v(x + h * k3, s1)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    n = lambda s: ((1 - s) ** 2 + s**2) ** 0.5  # noqa: E731
    torch.testing.assert_close(x, n(grid[-1]) * z, rtol=1e-10, atol=1e-10)
    # Finite at sigma = 1 (v = x there), and the in-range eps form holds at sigma(999) itself, in float32 too.
    torch.testing.assert_close(v(z, 1.0), z)
    for dtype in (torch.float64, torch.float32):
        at_max = velocity_from_eps(z.to(dtype), torch.tensor([s_max], dtype=dtype), eps.to(dtype), schedule)
        x0_hat = (z - s_max * eps) / (1 - s_max)
        torch.testing.assert_close(at_max, (eps - x0_hat).to(dtype))
    # Below sigma(0) the in-range eps form holds: at sigma = 0, x0_hat = x_sigma.
    torch.testing.assert_close(velocity_from_eps(z, torch.tensor([0.0], dtype=torch.float64), eps, schedule), eps - z)


def test_not_the_ddpm_v_prediction_target(schedule):
    """DDPM v-prediction ``a*eps - s*x0`` is not the flow velocity; the bridge gives ``eps - x0``."""
    gen = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 4, 4, 4, generator=gen, dtype=torch.float64).unbind(0)
    x0, eps = x0[None], eps[None]
    t = 500
    sigma = sigma_from_t(torch.tensor([t]), schedule)
    x_sigma = (1 - sigma) * x0 + sigma * eps
    v = velocity_from_eps(x_sigma, sigma, eps, schedule)  # a perfect teacher returns the true eps
    torch.testing.assert_close(v, eps - x0)
    v_ddpm = schedule.a[t] * eps - schedule.s[t] * x0
    assert (v - v_ddpm).abs().max() > 0.1


def test_guidance_in_eps_equals_guidance_in_v(schedule):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 4, 4, generator=gen, dtype=torch.float64)
    e_u, e_c = torch.randn(2, 3, 4, 4, 4, generator=gen, dtype=torch.float64)
    sigma = torch.tensor([0.99, 0.5, 0.01], dtype=torch.float64)  # above, inside and below the range
    w = 7.5
    v_from_guided_eps = velocity_from_eps(x, sigma, e_u + w * (e_c - e_u), schedule)
    v_guided = guided_velocity(
        velocity_from_eps(x, sigma, e_u, schedule), velocity_from_eps(x, sigma, e_c, schedule), w
    )
    torch.testing.assert_close(v_guided, v_from_guided_eps)


def test_teacher_config_errors():
    with pytest.raises(ValueError, match="no scheduler config"):
        TeacherSchedule.from_scheduler_config(None)
    with pytest.raises(ValueError, match="prediction_type is 'v_prediction'"):
        TeacherSchedule.from_scheduler_config({**SD15_SCHEDULER_CONFIG, "prediction_type": "v_prediction"})
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        TeacherSchedule.from_scheduler_config({**SD15_SCHEDULER_CONFIG, "rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match="lacks"):
        TeacherSchedule.from_scheduler_config({"prediction_type": "epsilon"})


def test_wrapped_tiny_unet_through_flow_scheduler_is_ddim(tiny_components):
    """FlowLuneScheduler.step over the wrapped tiny UNet reproduces DDIM over the raw UNet."""
    unet = tiny_components.unet
    schedule = TeacherSchedule.from_scheduler_config(SD15_SCHEDULER_CONFIG)
    teacher = EpsilonToFlowUNet(unet, SD15_SCHEDULER_CONFIG)
    sched = ddim(6)
    gen = torch.Generator().manual_seed(4)
    cond = torch.randn(1, 77, 32, generator=gen)
    x_t = torch.randn(1, 4, 8, 8, generator=gen)
    flow = FlowLuneScheduler()
    flow.set_timesteps(sigmas=sigma_from_t(sched.timesteps, schedule).float())
    x = x_t * float(1 / (schedule.a[sched.timesteps[0]] + schedule.s[sched.timesteps[0]]))
    with torch.no_grad():
        for t_ddim, t_flow in zip(sched.timesteps, flow.timesteps):
            x_t = sched.step(unet(x_t, t_ddim, cond).sample, t_ddim, x_t).prev_sample
            x = flow.step(teacher(x, t_flow, encoder_hidden_states=cond).sample, t_flow, x).prev_sample
    rel = ((x - x_t).abs().max() / x_t.abs().max()).item()
    assert rel < 1e-5, rel
    assert math.isfinite(rel)


def test_wrapper_queries_the_teacher_at_full_timestep_precision_for_half_samples(schedule):
    """fp16 samples must not round sigma (5e-4 resolution) before t(sigma) is computed."""
    seen = {}

    class RecordingUNet(torch.nn.Module):
        config = None
        dtype = torch.float16

        def forward(self, x_t, t, encoder_hidden_states, return_dict=False):
            seen["t"], seen["x_t"] = t, x_t
            return (torch.zeros_like(x_t),)

    wrapper = EpsilonToFlowUNet(RecordingUNet(), SD15_SCHEDULER_CONFIG)
    timestep = torch.tensor(501.2345, dtype=torch.float32)
    x = torch.ones(2, 4, 2, 2, dtype=torch.float16)
    wrapper(x, timestep, encoder_hidden_states=None)
    expected = t_from_sigma(timestep.double() / 1000, schedule).float()
    assert seen["t"].dtype == torch.float32 and seen["x_t"].dtype == torch.float16
    torch.testing.assert_close(seen["t"], expected.expand(2), rtol=0, atol=1e-4)
