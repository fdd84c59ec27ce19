"""training/dmd.py against independent references: the straight path, autograd, and the closed-form denoisers of
Gaussian data (whose DMD direction must point from the generator's distribution toward the real one)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from flow_lune.flow.convention import flow_state, x0_from_velocity
from flow_lune.training.dmd import backward_simulation, denoising_loss, dmd_direction, dmd_loss


def test_x0_from_velocity_inverts_the_straight_path():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 4, 3, 3, generator=g), torch.randn(5, 4, 3, 3, generator=g)
    sigma = torch.rand(5, generator=g)
    torch.testing.assert_close(x0_from_velocity(flow_state(x0, eps, sigma), eps - x0, sigma), x0)


def test_dmd_loss_gradient_is_the_direction_over_numel():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 2, 2, generator=g, requires_grad=True)
    real, fake = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    direction = dmd_direction(x, real, fake)
    dmd_loss(x, direction).backward()
    torch.testing.assert_close(x.grad, direction / x.numel())
    # the normalisation by hand: per sample, the mean absolute distance to the real prediction
    scale = torch.stack([(x[i] - real[i]).abs().mean() for i in range(3)]).detach()
    torch.testing.assert_close(direction, (fake - real) / scale[:, None, None, None])


def gaussian_x0(mean: float, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """E[x0 | x_t] for x0 ~ N(mean, 1), x_t = (1 - t) x0 + t n: the Gaussian posterior mean, written out."""
    a, s = 1 - t, t
    return mean + a / (a * a + s * s) * (x_t - a * mean)


@pytest.mark.parametrize("gen_mean", [1.5, -0.7])
def test_direction_moves_generated_samples_toward_the_real_distribution(gen_mean):
    # real data N(0, 1); the generator's samples N(gen_mean, 1); both scored by their exact denoisers
    g = torch.Generator().manual_seed(2)
    x0_gen = gen_mean + torch.randn(4096, 1, generator=g)
    t = 0.05 + 0.9 * torch.rand(4096, generator=g)
    x_t = flow_state(x0_gen, torch.randn(4096, 1, generator=g), t)
    tt = t[:, None]
    direction = dmd_direction(x0_gen, gaussian_x0(0.0, x_t, tt), gaussian_x0(gen_mean, x_t, tt))
    # a descent step x0 - lr * g moves the generator's mean toward 0, and nowhere else when it is already there
    assert torch.sign(direction.mean()) == torch.sign(torch.tensor(gen_mean))
    same = dmd_direction(x0_gen, gaussian_x0(gen_mean, x_t, tt), gaussian_x0(gen_mean, x_t, tt))
    assert same.abs().max() == 0


class PointTo(torch.nn.Module):
    """The exact velocity toward a fixed ``x0``: ``v(x, sigma) = (x - x0) / sigma`` (straight paths), counting
    the calls that build a graph."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0 = torch.nn.Parameter(x0.clone())
        self.graph_calls = 0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.graph_calls += torch.is_grad_enabled()
        return (x - self.x0) / sigma[:, None]


@pytest.mark.parametrize("k", [0, 1, 3])
def test_backward_simulation_lands_on_the_ode_end_with_one_graph(k):
    target = torch.tensor([[0.3, -1.2], [2.0, 0.5]])
    model = PointTo(target)
    grid = torch.tensor([1.0, 0.8, 0.5, 0.25, 0.0])
    x0 = backward_simulation(model, torch.randn(2, 2), grid, k)
    torch.testing.assert_close(x0, target)  # Euler is exact on straight paths, from any grid point
    assert model.graph_calls == 1  # only the last prediction carries gradient
    x0.sum().backward()
    assert model.x0.grad is not None
    with pytest.raises(ValueError, match="k must be"):
        backward_simulation(model, torch.randn(2, 2), grid, 4)


def test_denoising_loss_is_zero_for_the_exact_velocity_and_positive_otherwise():
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    sigma = 0.1 + 0.8 * torch.rand(6, generator=g)
    assert denoising_loss(PointTo(x0), x0, noise, sigma).item() < 1e-10
    wrong = denoising_loss(PointTo(x0 + 0.5), x0, noise, sigma)
    # v is off by 0.5 / sigma in every coordinate: the loss is the mean of 0.25 / sigma^2
    torch.testing.assert_close(wrong, (0.25 / sigma**2).mean())


# ---------------------------------------------------------------- experiments/dmd.py on tiny models


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A tiny teacher's pair set and a FlowLunePipeline folder of the same components (student and real init)."""
    from conftest import load_script
    from diffusers import StableDiffusionPipeline

    from flow_lune import FlowLunePipeline, FlowLuneScheduler
    from flow_lune.tiny import save_tiny_sd_pipeline

    root = tmp_path_factory.mktemp("dmd-world")
    teacher = save_tiny_sd_pipeline(root / "teacher", seed=0)
    threads = torch.get_num_threads()
    try:
        generate = load_script("generate_reflow_pairs.py")
        generate.main(generate.parse_args([
            "--model", str(teacher), "--num_pairs", "6", "--steps", "2", "--guidance", "2", "--seed", "0",
            "--threads", "1", "--output_dir", str(root / "pairs"),
        ]))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    sd = StableDiffusionPipeline.from_pretrained(teacher)
    student = FlowLunePipeline(sd.vae, sd.text_encoder, sd.tokenizer, sd.unet, FlowLuneScheduler())
    student.save_pretrained(root / "student")
    return root


def run_dmd(world, out, *extra):
    from conftest import load_script

    dmd = load_script("experiments/dmd.py")
    argv = [
        "--student", str(world / "student"), "--pairs", str(world / "pairs"), "--real_init", str(world / "student"),
        "--output_dir", str(out), "--real_steps", "2", "--steps", "3", "--warmup_steps", "1", "--batch_size", "2",
        "--dmd_batch_size", "2", "--sample_steps", "2", "--threads", "1", "--log_every", "1", *extra,
    ]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        return dmd.main(dmd.parse_args(argv))
    finally:
        torch.set_num_threads(threads)


def test_dmd_experiment_trains_the_student_and_restarts_without_redoing(tiny_world, tmp_path):
    from safetensors.torch import load_file

    out = run_dmd(tiny_world, tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["dmd"] >= 0 and r["direction"] > 0 and r["fake"] > 0 for r in records)
    before = load_file(next((tiny_world / "student" / "unet").glob("*.safetensors")))
    after = load_file(next((out / "unet").glob("*.safetensors")))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    assert (out / "model_index.json").is_file() and (tmp_path / "run" / "real" / "config.json").is_file()
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["command"].startswith("python experiments/dmd.py --student ") and run["settings"]["steps"] == 3
    stamp = (out / "unet").stat().st_mtime_ns
    assert run_dmd(tiny_world, tmp_path / "run") == out and (out / "unet").stat().st_mtime_ns == stamp
    # the control: reflow only, no generator batch, no fake model update
    run_dmd(tiny_world, tmp_path / "control", "--dmd_weight", "0")
    control = [json.loads(line) for line in (tmp_path / "control" / "log.jsonl").read_text().splitlines()]
    assert [sorted(r) for r in control] == [["reflow", "step"]] * 3


def test_dmd_experiment_refuses_bad_input_before_work(tiny_world, tmp_path, capsys):
    from conftest import load_script

    dmd = load_script("experiments/dmd.py")
    base = ["--student", str(tiny_world / "student"), "--real_init", str(tiny_world / "student")]
    with pytest.raises(SystemExit) as err:
        dmd.parse_args([*base, "--pairs", str(tmp_path / "none"), "--output_dir", str(tmp_path / "out")])
    assert err.value.code == 2 and "--pairs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dmd.parse_args(
            [*base, "--pairs", str(tiny_world / "pairs"), "--output_dir", "x", "--t_min", "0.9", "--t_max", "0.1"]
        )
    assert "--t_min 0.9" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dmd.parse_args([*base, "--pairs", str(tiny_world / "pairs"), "--output_dir", "x", "--real_teacher", "nope"])
    assert "--real_teacher 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dmd.parse_args([*base, "--pairs", str(tiny_world / "pairs"), "--output_dir", "x", "--select_prompts", "1"])
    assert "--select_prompts must be >= 2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_dmd_experiment_restart_after_the_real_stage_draws_as_an_unbroken_run(tiny_world, tmp_path):
    from safetensors.torch import load_file

    def unet(folder):
        return load_file(next((folder / "unet").glob("*.safetensors")))

    unbroken = unet(run_dmd(tiny_world, tmp_path / "a"))
    run_dmd(tiny_world, tmp_path / "b", "--steps", "1")  # stands in for a run stopped after its real stage
    shutil.rmtree(tmp_path / "b" / "pipeline")
    restarted = unet(run_dmd(tiny_world, tmp_path / "b"))
    assert all(torch.equal(unbroken[k], restarted[k]) for k in unbroken)


def test_dmd_experiment_writes_the_average_and_snapshots(tiny_world, tmp_path):
    from safetensors.torch import load_file

    def unet(folder):
        return load_file(next((folder / "unet").glob("*.safetensors")))

    root = tmp_path / "run"
    out = run_dmd(tiny_world, root, "--ema_decay", "0.5", "--snapshot_every", "1")
    assert sorted(p.name for p in (root / "snapshots").iterdir()) == ["1", "1-ema", "2", "2-ema"]
    w = [unet(root / "snapshots" / "1"), unet(root / "snapshots" / "2"), unet(out)]
    averages = [unet(root / "snapshots" / "1-ema"), unet(root / "snapshots" / "2-ema"), unet(root / "pipeline-ema")]
    # the reference: s_n = d_n s_(n-1) + (1 - d_n) w_n with EMAModel's decay min(0.5, n / (9 + n)) at update n,
    # 0 at the first (diffusers.training_utils.EMAModel.get_decay without ema warm-up)
    s = w[0]
    for n, (weights, average) in enumerate(zip(w, averages), start=1):
        d = 0.0 if n == 1 else min(0.5, n / (9 + n))
        s = {k: d * s[k] + (1 - d) * weights[k] for k in s}
        assert all(torch.allclose(average[k], s[k], atol=1e-6) for k in s), n
    assert any(not torch.equal(w[2][k], averages[2][k]) for k in w[2])


def test_dmd_experiment_with_the_teacher_as_the_real_score_skips_the_first_stage(tiny_world, tmp_path):
    from safetensors.torch import load_file

    out = run_dmd(tiny_world, tmp_path / "run", "--real_teacher", str(tiny_world / "teacher"))
    assert not (tmp_path / "run" / "real").exists()
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["direction"] > 0 for r in records)
    before = load_file(next((tiny_world / "student" / "unet").glob("*.safetensors")))
    after = load_file(next((out / "unet").glob("*.safetensors")))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_dmd_experiment_selects_the_best_student_on_held_apart_data_without_changing_the_run(tiny_world, tmp_path):
    from safetensors.torch import load_file

    from flow_lune.evaluation import fixed_noise, load_pipeline, make_runner, sample_all, toy_fid
    from flow_lune.toy import heldout_prompts, judge_path, toy_arrays
    from flow_lune.toy.judge import load_judge

    def unet(folder):
        return load_file(next((folder / "unet").glob("*.safetensors")))

    root = tmp_path / "run"
    out = run_dmd(tiny_world, root, "--select_every", "1", "--select_prompts", "8", "--snapshot_every", "1")
    plain = run_dmd(tiny_world, tmp_path / "plain")
    assert all(torch.equal(unet(out)[k], w) for k, w in unet(plain).items())  # selection draws no training numbers
    selection = json.loads((root / "run.json").read_text())["selection"]
    scores = {int(k): v for k, v in selection["toy_fid"].items()}
    assert sorted(scores) == [0, 1, 2, 3] and len(set(scores.values())) == 4
    best = min(scores, key=scores.get)
    assert selection["best_step"] == best
    folders = {0: tiny_world / "student", 1: root / "snapshots" / "1", 2: root / "snapshots" / "2", 3: out}
    assert all(torch.equal(unet(root / "pipeline-best")[k], w) for k, w in unet(folders[best]).items())
    # the last score, recomputed from the written folder with the evaluator's functions
    prompts = heldout_prompts(8)
    runner = make_runner("student", load_pipeline(out), "euler")
    images, _ = sample_all(runner, prompts, fixed_noise(8, (4, 8, 8), 1000), 2, 1.0, 96)
    real = toy_arrays("train", 16, seed=0).images.float() / 255.0
    assert toy_fid(load_judge(judge_path()), real, images) == pytest.approx(scores[3], rel=1e-4)
