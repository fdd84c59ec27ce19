"""The evaluator: metrics against independent recomputations, the runners, and evaluate.py end to end."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flow_lune.evaluation import (
    GroupedFID,
    attribute_accuracy,
    clip_score,
    inception_fid,
    jackknife_se,
    other_noise_partner,
    psnr,
    same_noise_agreement,
    toy_fid,
)
from flow_lune.tiny import save_tiny_sd_pipeline, tiny_sd_components
from flow_lune.toy import ATTRIBUTES, judge_path, toy_arrays
from flow_lune.toy.judge import JudgeFeatures, load_judge

ROOT = Path(__file__).resolve().parents[1]
# Loaded from its path: a bare `import evaluate` could find Hugging Face's `evaluate` package instead.
_spec = importlib.util.spec_from_file_location("flow_lune_evaluate_script", ROOT / "evaluate.py")
evaluate_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate_script)


@pytest.fixture(scope="module")
def judge():
    return load_judge(judge_path())


@pytest.fixture(scope="module")
def tiny_teacher_dir(tmp_path_factory):
    return save_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny-teacher") / "pipe")


@pytest.fixture(scope="module")
def tiny_student_dir(tmp_path_factory):
    from flow_lune import FlowLunePipeline, FlowLuneScheduler

    parts = tiny_sd_components(seed=5).as_dict()
    pipe = FlowLunePipeline(**{**parts, "scheduler": FlowLuneScheduler(shift=3.0)})
    folder = tmp_path_factory.mktemp("tiny-student") / "pipe"
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# --- metrics ---------------------------------------------------------------------------------------------


def test_psnr_and_accuracy_by_hand():
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[0] += 0.1
    b[1, 0, 0, 0] = 1.0
    expected = [10 * np.log10(1 / 0.01), 10 * np.log10(48.0)]
    assert psnr(a, b).tolist() == pytest.approx(expected, rel=1e-5)
    pred = torch.tensor([[0, 1, 2], [0, 0, 2], [1, 1, 2], [0, 1, 3]])
    acc = attribute_accuracy(pred, torch.tensor([[0, 1, 2]] * 4))
    assert acc == pytest.approx({"all": 0.25, "shape": 0.75, "colour": 0.75, "position": 0.75})
    with pytest.raises(ValueError, match="must both be"):
        attribute_accuracy(pred[:, :2], pred[:, :2])


def test_other_noise_partner_picks_the_same_prompt():
    assert other_noise_partner(["a", "b", "a", "b"]) == [2, 3, 0, 1]
    assert other_noise_partner(["a", "b", "c"]) == [1, 2, 0]
    x = torch.rand(4, 3, 8, 8)
    out = same_noise_agreement(x, x, ["p", "q", "p", "q"])
    assert out["same_noise_psnr"] == pytest.approx(100.0) and out["different_noise_psnr"] < 30


def test_toy_fid_matches_an_independent_frechet_distance(judge, monkeypatch):
    """torchmetrics on the judge's features = ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))`` by scipy."""
    linalg = pytest.importorskip("scipy.linalg")

    real = toy_arrays("heldout", 144).images.float() / 255.0
    fake = toy_arrays("train", 144).images.float() / 255.0
    fake = (fake + 0.15 * torch.randn(fake.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    with torch.no_grad():
        f1, f2 = (judge.features(x).double().numpy() for x in (real, fake))
    mu1, mu2, s1, s2 = f1.mean(0), f2.mean(0), np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    got = toy_fid(judge, real, fake)
    assert got == pytest.approx(expected, rel=2e-3)
    assert toy_fid(judge, real, real) < 1e-3 * got
    from flow_lune.evaluation import metrics

    monkeypatch.setattr(metrics, "FEATURE_BATCH", 7)  # features in batches of 7 images, summed: the same distance
    assert toy_fid(judge, real, fake) == pytest.approx(got, rel=1e-6)


def test_jackknife_se_of_a_mean_is_the_standard_error_of_the_group_means():
    """For the mean, leaving group k out gives t_k - mean t = -(g_k - mean g) / (K - 1), so the jackknife error is
    exactly ``std(g) / sqrt(K)`` over the K group means g: the textbook standard error of a mean of K values."""
    x = torch.randn(60, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 + 1
    groups = x.view(6, 10)
    left_out = [torch.cat([groups[:k], groups[k + 1 :]]).mean().item() for k in range(6)]
    expected = (groups.mean(1).std() / 6**0.5).item()
    assert jackknife_se(left_out) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        jackknife_se([1.0])


def test_grouped_fid_is_toy_fid_on_the_groups_kept(judge):
    """Over all groups, and with group k of both sides left out, GroupedFID gives toy_fid on exactly those images
    (merged torchmetrics states against images fed once); its ratio is d / d_ref - 1 with the same groups left out."""
    real = toy_arrays("heldout", 40).images.float() / 255.0
    noise = torch.randn((40, 3, 64, 64), generator=torch.Generator().manual_seed(1))
    fake_a = (toy_arrays("train", 40).images.float() / 255.0 + 0.1 * noise).clamp(0, 1)
    fake_b = (fake_a + 0.1 * noise).clamp(0, 1)
    grouped = GroupedFID(JudgeFeatures(judge), real, groups=4)
    a, b = grouped.score(grouped.states(fake_a)), grouped.score(grouped.states(fake_b))
    assert a[0] == pytest.approx(toy_fid(judge, real, fake_a), rel=1e-6)  # float32 features, other batches

    def kept(x, k):
        return torch.cat([c for j, c in enumerate(torch.tensor_split(x, 4)) if j != k])

    expected = [toy_fid(judge, kept(real, k), kept(fake_a, k)) for k in range(4)]
    assert a[1] == pytest.approx(expected, rel=1e-6)
    above, se = GroupedFID.ratio(b, a)
    assert above == pytest.approx(b[0] / a[0] - 1, rel=1e-12)
    assert se == pytest.approx(jackknife_se([x / y - 1 for x, y in zip(b[1], a[1])]), rel=1e-12) and se > 0
    single = GroupedFID(JudgeFeatures(judge), real, groups=1)
    one = single.score(single.states(fake_a))
    assert one == (pytest.approx(a[0], rel=1e-6), []) and GroupedFID.ratio(one, one) == (0.0, None)


def test_grouped_fid_jackknife_error_matches_the_spread_over_independent_draws():
    """The jackknife error of a Frechet distance, and of the paired ratio of two, against a Monte Carlo reference:
    the standard deviation of the statistic over 150 independent draws of Gaussian features (identity features)."""

    class Identity(torch.nn.Module):
        num_features = 3

        def forward(self, x):
            return x.double()

    gen = torch.Generator().manual_seed(0)
    scale = torch.tensor([1.0, 0.8, 1.3])
    fids, fid_se, ratios, ratio_se = [], [], [], []
    for _ in range(150):
        real = torch.randn(100, 3, generator=gen)
        z = torch.randn(100, 3, generator=gen)  # the shared noise of two paired "models"
        a = z * scale + 0.3
        b = 0.9 * z * scale + 0.35 + 0.3 * torch.randn(100, 3, generator=gen)
        grouped = GroupedFID(Identity(), real, groups=10)
        sa, sb = grouped.score(grouped.states(a)), grouped.score(grouped.states(b))
        fids.append(sa[0])
        fid_se.append(jackknife_se(sa[1]))
        above, se = GroupedFID.ratio(sb, sa)
        ratios.append(above)
        ratio_se.append(se)
    for values, errors in ((fids, fid_se), (ratios, ratio_se)):
        spread = torch.tensor(values).std().item()
        rms_error = torch.tensor(errors).pow(2).mean().sqrt().item()
        assert 0.8 < rms_error / spread < 1.35, (rms_error, spread)


# --- real-model metrics, offline on tiny components ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from flow_lune.tiny import byte_level_vocab, tiny_tokenizer

    text = dict(
        vocab_size=len(byte_level_vocab()),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    vision = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    folder = tmp_path_factory.mktemp("tiny-clip") / "clip"
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer()).save_pretrained(folder)
    return folder


def test_clip_score_offline_on_a_tiny_local_clip(tiny_clip_dir):
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    score = clip_score(images, ["a cat", "a dog", "a red circle"], tiny_clip_dir)
    assert 0.0 <= score <= 100.0 and np.isfinite(score)
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_score(images, ["a cat"], tiny_clip_dir)


class TinyFeatures(torch.nn.Module):
    """A stand-in for Inception: 8 fixed random projections of 4x4-pooled uint8 images."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(48, 8)
        self.num_features = 8

    def forward(self, x):
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x.float() / 255.0, 4).flatten(1)).double()


def test_inception_fid_path_with_a_tiny_feature_module():
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    torch.manual_seed(0)
    feature = TinyFeatures()
    a = torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    b = (a * 0.5).clamp(0, 1)
    assert inception_fid(a, a, feature) < 1e-6 < inception_fid(a, b, feature)
    if not _TORCH_FIDELITY_AVAILABLE:
        with pytest.raises(ValueError, match="torch-fidelity"):
            inception_fid(a, b, 2048)


# --- evaluate.py -----------------------------------------------------------------------------------------------


def run_main(argv):
    return evaluate_script.main(evaluate_script.parse_args([*argv, "--no_progress"]))


def sample_by_hand(teacher_dir, student_dir, prompts, teacher_setting, student_setting):
    """The teacher's DDIM and the student's Euler images from evaluate.py's noise (seed 0), each at its
    ``(steps, guidance)``: the rows' images recomputed outside evaluate.py."""
    from flow_lune.evaluation import fixed_noise, load_pipeline, make_runner, sample_all

    teacher = make_runner("teacher", load_pipeline(str(teacher_dir)), "ddim")
    student = make_runner("student", load_pipeline(str(student_dir)), "euler")
    size = teacher.pipe.unet.config.sample_size
    noise = fixed_noise(len(prompts), (teacher.pipe.unet.config.in_channels, size, size), 0)
    return tuple(
        sample_all(runner, prompts, noise, steps, g, len(prompts), lambda n: None)[0]
        for runner, (steps, g) in ((teacher, teacher_setting), (student, student_setting))
    )


def measured(row: dict) -> dict:
    """A report row without its timing, which differs between any two runs."""
    return {k: v for k, v in row.items() if k != "images_per_second"}


def test_evaluate_tiny_random_teacher_and_student_judge_near_chance(tiny_teacher_dir, tiny_student_dir, tmp_path):
    """End to end on random weights: files written, and the judge reads about chance (the metric can fail)."""
    out = tmp_path / "eval"
    report = run_main(
        [
            "--teacher",
            str(tiny_teacher_dir),
            "--student",
            str(tiny_student_dir),
            "--steps",
            "1",
            "2",
            "--guidance",
            "3",
            "--num_prompts",
            "48",
            "--heldout_images",
            "96",
            "--output_dir",
            str(out),
            "--straightness",
            "--straightness_steps",
            "3",
            "--straightness_prompts",
            "4",
        ]
    )
    saved = json.loads((out / "eval.json").read_text())
    assert saved["settings"] == json.loads(json.dumps(report["settings"]))
    rows = {(r["model"], r["sampler"], r["guidance"]): r for r in saved["straightness"]}
    assert set(rows) == {("teacher", "bridge", 3.0), ("student", "euler", 3.0)}
    for row in rows.values():  # random weights: curved paths, measured on the 4 prompts asked for
        assert row["steps"] == 3 and row["prompts"] == 4 and row["straightness"] > 0 and row["straightness_std"] >= 0
    labels = {(s["model"], s["sampler"], s["steps"]) for s in saved["settings"]}
    assert labels == {(m, s, k) for m, s in [("teacher", "ddim"), ("student", "euler")] for k in (1, 2)}
    chance = {"shape": 1 / 3, "colour": 1 / 4, "position": 1 / 4}
    for s in saved["settings"]:  # the student samples at its own training shift; DDIM has none
        assert s.get("shift") == (3.0 if s["model"] == "student" else None)
        assert s["accuracy"] <= 0.1
        for name in ATTRIBUTES:
            assert s["accuracy_per_attribute"][name] <= chance[name] + 0.2
        assert s["toy_fid_real"] > 10 * saved["reference"]["toy_fid_heldout_vs_train"]
        if not s.get("is_reference"):
            assert s["same_noise_psnr"] > 0 and "toy_fid_teacher" in s
    assert min(saved["reference"]["judge_accuracy_heldout"].values()) >= 0.99
    for name in ("grid.png", "chart.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 400
    with Image.open(out / "grid.png") as grid:
        assert grid.size[1] == 4 * (128 + 3 * 13 + 6)  # 2 samplers x 2 step counts, prompts under the tiles


def test_teacher_guidance_samples_the_teacher_there_and_is_every_student_row_reference(
    tiny_teacher_dir, tiny_student_dir, tmp_path
):
    """--guidance 1 --teacher_guidance 3: the teacher's rows are those of a plain run at 3, the student's are those of
    a plain run at 1 except for the comparisons, which use the teacher's reference at 3 (recomputed here)."""
    common = ["--teacher", str(tiny_teacher_dir), "--student", str(tiny_student_dir), "--steps", "2",
              "--num_prompts", "4", "--heldout_images", "8"]  # fmt: skip
    mixed = run_main([*common, "--guidance", "1", "--teacher_guidance", "3", "--output_dir", str(tmp_path / "m")])
    plain = run_main([*common, "--guidance", "1", "3", "--output_dir", str(tmp_path / "p")])

    def rows(report):
        return {(s["model"], s["guidance"]): s for s in report["settings"]}

    m, p = rows(mixed), rows(plain)
    assert set(m) == {("teacher", 3.0), ("student", 1.0)}
    assert measured(m["teacher", 3.0]) == measured(p["teacher", 3.0])
    same = ("accuracy", "toy_fid_real", "shift")
    assert {k: m["student", 1.0][k] for k in same} == {k: p["student", 1.0][k] for k in same}
    assert m["student", 1.0]["reference"] == "teacher ddim 2 steps g=3"
    assert p["student", 1.0]["reference"] == "teacher ddim 2 steps g=1"
    # the same comparison by hand: the student at cfg 1 against the teacher's DDIM at cfg 3, same noise
    from flow_lune.evaluation import same_noise_agreement

    ref, images = sample_by_hand(tiny_teacher_dir, tiny_student_dir, mixed["prompts"], (2, 3.0), (2, 1.0))
    expected = same_noise_agreement(images, ref, mixed["prompts"])
    got, other = m["student", 1.0]["same_noise_psnr"], p["student", 1.0]["same_noise_psnr"]
    assert got == pytest.approx(expected["same_noise_psnr"], rel=1e-6)
    assert abs(got - other) > 1e-4 * abs(other)  # the reference at g=1 is another one (random weights: close)


def test_reference_steps_outside_steps_is_a_scored_row(tiny_teacher_dir, tiny_student_dir, tmp_path):
    """--steps 1 --reference_steps 2: the teacher's 2-step reference gets its own row, scored like the others (the
    toy FID a student's is compared with), and is the same row a run with --steps 1 2 gives."""
    common = ["--teacher", str(tiny_teacher_dir), "--student", str(tiny_student_dir), "--guidance", "3",
              "--num_prompts", "4", "--heldout_images", "8"]  # fmt: skip
    report = run_main([*common, "--steps", "1", "--reference_steps", "2", "--output_dir", str(tmp_path / "r")])
    both = run_main([*common, "--steps", "1", "2", "--output_dir", str(tmp_path / "b")])
    rows = {(s["model"], s["steps"]): s for s in report["settings"]}
    assert set(rows) == {("teacher", 2), ("teacher", 1), ("student", 1)}
    ref = rows["teacher", 2]
    assert ref["is_reference"] and "toy_fid_real" in ref and "accuracy" in ref
    assert "toy_fid_real_vs_reference" not in ref and report["reference"]["toy_fid_groups"] == 1
    assert rows["student", 1]["reference"] == "teacher ddim 2 steps g=3"
    for row in (rows["teacher", 1], rows["student", 1]):  # every other row: its toy FID above the reference's
        assert row["toy_fid_real_vs_reference"] == pytest.approx(row["toy_fid_real"] / ref["toy_fid_real"] - 1)
        assert "toy_fid_real_vs_reference_se" not in row and "toy_fid_real_se" not in row  # 4 prompts: no error
    same = next(s for s in both["settings"] if (s["model"], s["steps"]) == ("teacher", 2))
    assert measured(ref) == measured(same)


def test_jackknife_errors_are_reported_from_enough_prompts(tiny_teacher_dir, tiny_student_dir, tmp_path, monkeypatch):
    """With left-out sets of enough images (the threshold lowered here: 20 prompts, not 570), every toy FID gets its
    jackknife error and every row its error above the reference, recomputed here with GroupedFID on the images."""
    monkeypatch.setattr(evaluate_script, "JACKKNIFE_PER_FEATURE", 0.1)
    report = run_main(["--teacher", str(tiny_teacher_dir), "--student", str(tiny_student_dir), "--guidance", "3",
                       "--num_prompts", "20", "--heldout_images", "40", "--steps", "1", "--reference_steps", "2",
                       "--output_dir", str(tmp_path)])  # fmt: skip
    assert report["reference"]["toy_fid_groups"] == 10
    rows = {(s["model"], s["steps"]): s for s in report["settings"]}
    ref, images = sample_by_hand(tiny_teacher_dir, tiny_student_dir, report["prompts"], (2, 3.0), (1, 3.0))
    grouped = GroupedFID(JudgeFeatures(load_judge(judge_path())), toy_arrays("heldout", 40).images.float() / 255.0)
    a, b = grouped.score(grouped.states(ref)), grouped.score(grouped.states(images))
    assert rows["teacher", 2]["toy_fid_real_se"] == pytest.approx(jackknife_se(a[1]), rel=1e-5)
    assert rows["student", 1]["toy_fid_real_se"] == pytest.approx(jackknife_se(b[1]), rel=1e-5)
    above, se = GroupedFID.ratio(b, a)
    assert rows["student", 1]["toy_fid_real_vs_reference"] == pytest.approx(above, rel=1e-5)
    assert rows["student", 1]["toy_fid_real_vs_reference_se"] == pytest.approx(se, rel=1e-5) and se > 0
    assert "toy_fid_real_vs_reference_se" in rows["teacher", 1]


def test_evaluate_toy_teacher_draws_the_prompts(tmp_path):
    report = run_main(
        [
            "--steps",
            "8",
            "--guidance",
            "3",
            "--num_prompts",
            "12",
            "--heldout_images",
            "48",
            "--output_dir",
            str(tmp_path),
            "--teacher_samplers",
            "ddim",
            "bridge",
            "--grid_columns",
            "4",
        ]
    )
    by = {s["sampler"]: s for s in report["settings"]}
    assert by["ddim"]["accuracy"] >= 0.75 and by["bridge"]["accuracy"] >= 0.5
    assert by["bridge"]["same_noise_psnr"] > by["bridge"]["different_noise_psnr"]


def test_evaluate_real_mode_offline(tiny_teacher_dir, tiny_clip_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a lighthouse\na cat on a mat\n")
    report = run_main(
        [
            "--teacher",
            str(tiny_teacher_dir),
            "--prompts_file",
            str(prompts),
            "--clip_model",
            str(tiny_clip_dir),
            "--steps",
            "1",
            "--guidance",
            "2",
            "--output_dir",
            str(tmp_path / "o"),
        ]
    )
    assert report["mode"] == "real" and 0 <= report["settings"][0]["clip_score"] <= 100
    assert (tmp_path / "o" / "chart.png").is_file()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--steps", "0"], "--steps must all be >= 1"),
        (["--student", "/nonexistent/x"], "no such file or folder"),
        (["--teacher", "none"], "nothing to evaluate"),
        (["--guidance", "0.5"], "--guidance scales must be >= 1"),
        (["--teacher_guidance", "0.5"], "--teacher_guidance must be >= 1"),
        (["--reference_images", "."], "real-model mode"),
    ],
)
def test_evaluate_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        evaluate_script.parse_args([*argv, "--output_dir", "x"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "error: " in err and message in err


def test_evaluate_single_file_needs_config(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    result = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), "--student", str(f), "--output_dir", "x"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "error: --student is a single file: pass --config" in result.stderr


def test_single_file_student_loads_with_its_shift_and_samples_like_its_folder(tiny_student_dir, tmp_path):
    from flow_lune.convert import convert_to_single_file
    from flow_lune.evaluation import fixed_noise, load_pipeline, make_runner

    single = tmp_path / "student.safetensors"
    convert_to_single_file(tiny_student_dir, single, progress=False)
    from_file = load_pipeline(single, config=tiny_student_dir)
    from_folder = load_pipeline(tiny_student_dir)
    assert from_file.scheduler.config.shift == from_folder.scheduler.config.shift == 3.0
    noise = fixed_noise(2, (4, 8, 8), seed=0)
    prompts = ["a red circle at the left", "a blue square at the top"]
    a = make_runner("student", from_file, "euler").sample(prompts, noise, 2, 3.0)
    b = make_runner("student", from_folder, "euler").sample(prompts, noise, 2, 3.0)
    # float rounding only: identical weights and configs, yet 2.2e-5 apart on one 2-core machine under pytest
    # (0 in a plain script there); 1e-4 on [0, 1] images is far below any conversion fault's size
    assert a.shape == (2, 3, 64, 64) and torch.allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="sample it with 'euler'"):
        make_runner("student", from_folder, "ddim")


def test_student_shift_override_samples_like_a_folder_saved_with_that_shift(tiny_student_dir, tmp_path):
    """``make_runner(..., shift=1)`` on a shift-3 student equals loading a copy whose scheduler config says 1."""
    import shutil

    from flow_lune.evaluation import fixed_noise, load_pipeline, make_runner

    copy = tmp_path / "shift1"
    shutil.copytree(tiny_student_dir, copy)
    config_path = copy / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "shift": 1.0}))
    student = load_pipeline(tiny_student_dir)
    runner = make_runner("student", student, "euler", shift=1.0)
    assert runner.pipe.scheduler.config.shift == 1.0 and student.scheduler.config.shift == 3.0  # a copy
    noise = fixed_noise(2, (4, 8, 8), seed=0)
    prompts = ["a red circle at the left", "a blue square at the top"]
    a = runner.sample(prompts, noise, 3, 2.0)
    b = make_runner("student", load_pipeline(copy), "euler").sample(prompts, noise, 3, 2.0)
    c = make_runner("student", student, "euler").sample(prompts, noise, 3, 2.0)
    assert torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, c, atol=1e-3)  # rounding, not a shift
