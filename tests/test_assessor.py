"""The assessor ("David"): it reacts to its input, loads strictly, profiles, and feeds the adaptive sampler."""

import json
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from flow_lune.flow import SigmaSampler, flow_state, sigma_to_bin
from flow_lune.tiny import SD15_SCHEDULER_CONFIG, tiny_unet
from flow_lune.training.assessor import Assessor, AssessorConfig
from flow_lune.training.assessor_formulas import coherence, info_nce, kmeans, pattern_entropy, timestep_error
from flow_lune.training.assessor_training import (
    AssessorTrainingConfig,
    TeacherBlockFeatures,
    assessor_loss,
    initialise_from_features,
    make_views,
)
from flow_lune.training.block_features import BASE_BLOCK_WEIGHTS, BLOCK_NAMES, block_channels
from flow_lune.training.block_penalty import AssessorBlockPenalty
from flow_lune.training.fusion import FusionConfig, fuse_block_weights
from flow_lune.training.profile import (
    AssessorProfile,
    ProfileAccumulator,
    adaptive_sampler_from_profile,
    load_profile,
    save_profile,
    stratified_sigmas,
)

SD15_CHANNELS = [320, 640, 1280, 1280, 1280, 1280, 1280, 640, 320]
SD15_UNET_PARAMETERS = 859_520_964  # UNet2DConditionModel of SD1.5 (DESIGN.md section 9: 859.5M)


@dataclass
class Trained:
    assessor: Assessor
    features: TeacherBlockFeatures
    x0: torch.Tensor
    prompt_embeds: torch.Tensor
    history: list


@pytest.fixture(scope="session")
def trained():
    """A tiny assessor trained for 300 steps on the tiny teacher's features (cached states, one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only contend on the shared cores
    try:
        g = torch.Generator().manual_seed(0)
        unet = tiny_unet(seed=0).eval().requires_grad_(False)
        features = TeacherBlockFeatures(unet, SD15_SCHEDULER_CONFIG)
        n, m = 32, 768  # distinct samples, cached states (fewer states overfit the noise)
        x0 = torch.randn(n, 4, 8, 8, generator=g)
        prompt_embeds = torch.randn(n, 77, 32, generator=g)
        cfg = AssessorTrainingConfig()
        idx = torch.arange(m) % n
        views = make_views(x0[idx], SigmaSampler(shift=1.0).sample(m, g), cfg, g)
        f = features(
            torch.cat([views.x_sigma1, views.x_sigma2]),
            torch.cat([views.sigma1, views.sigma2]),
            torch.cat([prompt_embeds[idx]] * 2),
        )
        f1, f2 = [x[:m] for x in f], [x[m:] for x in f]
        assessor = Assessor(AssessorConfig(block_channels(unet), list(BLOCK_NAMES), hidden_dim=64))
        initialise_from_features(assessor, f1, seed=0)
        opt = torch.optim.AdamW(assessor.parameters(), lr=1e-2)
        history = []
        for _ in range(300):
            j = torch.randint(m, (64,), generator=g)
            s1, s2 = views.sigma1[j], views.sigma2[j]
            loss = assessor_loss(assessor, [x[j] for x in f1], [x[j] for x in f2], s1, s2, cfg)
            opt.zero_grad()
            loss.total.backward()
            opt.step()
            history.append(loss)
        assessor.eval().requires_grad_(False)
    finally:
        torch.set_num_threads(threads)  # restored before the session's other tests run
    return Trained(assessor, features, x0, prompt_embeds, history)


def states(t: Trained, sigma: float, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    n = len(t.x0)
    s = torch.full((n,), sigma)
    return t.features(flow_state(t.x0, torch.randn(t.x0.shape, generator=g), s), s, t.prompt_embeds), s


# ----------------------------------------------------------------------------------------------- formulas


def test_formulas_against_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 100, generator=g)
    bins = torch.tensor([0, 3, 50, 99, 7])
    p = logits.softmax(-1)
    ref_ce = torch.stack([-p[i, bins[i]].log() for i in range(5)]) / math.log(100)
    torch.testing.assert_close(timestep_error(logits, bins), ref_ce.clamp(0, 1))
    pl = torch.randn(5, 10, generator=g)
    q = pl.softmax(-1)
    torch.testing.assert_close(pattern_entropy(pl), -(q * q.log()).sum(-1) / math.log(10))
    torch.testing.assert_close(pattern_entropy(torch.zeros(2, 10)), torch.ones(2))  # uniform = 1
    a, b = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    ref_cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
    torch.testing.assert_close(coherence(a, b), (1 + ref_cos) / 2)
    torch.testing.assert_close(coherence(a, a), torch.ones(4))
    torch.testing.assert_close(coherence(a, -a), torch.zeros(4))


def test_sigma_bins_match_the_adaptive_sampler_binning():
    sigma = torch.tensor([0.0, 0.0049, 0.015, 0.505, 0.999, 1.0])
    assert sigma_to_bin(sigma, 100).tolist() == [0, 0, 1, 50, 99, 99]


def test_info_nce_against_direct_computation():
    g = torch.Generator().manual_seed(0)
    z1, z2 = F.normalize(torch.randn(6, 4, generator=g), dim=-1), F.normalize(torch.randn(6, 4, generator=g), dim=-1)
    sim = z1 @ z2.T / 0.1
    ref = 0.0
    for i in range(6):
        ref += -(sim[i, i] - sim[i].logsumexp(0)) - (sim[i, i] - sim[:, i].logsumexp(0))
    torch.testing.assert_close(info_nce(z1, z2, 0.1), ref / 12)


def test_kmeans_recovers_separated_clusters_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    c1 = kmeans(x, 3, torch.Generator().manual_seed(1))
    c2 = kmeans(x, 3, torch.Generator().manual_seed(1))
    torch.testing.assert_close(c1, c2, rtol=0, atol=0)
    found = sorted(c1.round().tolist())
    assert found == sorted(centres.tolist())
    with pytest.raises(ValueError, match="N >= k"):
        kmeans(x[:2], 3, g)


# ----------------------------------------------------------------------------------------------- trained behaviour


def test_training_reduces_every_loss(trained):
    first, last = trained.history[:10], trained.history[-10:]
    for name in ("timestep", "pattern", "contrastive"):
        before = sum(float(getattr(x, name)) for x in first) / 10
        after = sum(float(getattr(x, name)) for x in last) / 10
        assert after < 0.8 * before, (name, before, after)


def test_e_t_lower_at_the_right_sigma_than_at_a_far_one(trained):
    for sigma, far in ((0.3, 0.95), (0.8, 0.1)):
        f, s = states(trained, sigma)
        right = trained.assessor.signals(f, f, s).e_t
        wrong = trained.assessor.signals(f, f, torch.full_like(s, far)).e_t
        assert right.mean() < wrong.mean() - 0.05, (right, wrong)
        assert (right < wrong).sum() >= 8, (
            right,
            wrong,
        )  # nearly every block, not just on average


def test_coh_higher_for_the_teachers_features_than_for_shuffled_ones(trained):
    f, s = states(trained, 0.5)
    shuffled = [x.roll(1, dims=0) for x in f]  # each sample paired with another sample's teacher features
    same = trained.assessor.signals(f, f, s).coh
    other = trained.assessor.signals(f, shuffled, s).coh
    torch.testing.assert_close(same, torch.ones(9))
    assert (other < same - 0.05).all(), other
    # and it falls gradually as the student drifts from the teacher
    g = torch.Generator().manual_seed(3)
    drift = [x + 0.5 * x.std(0) * torch.randn(x.shape, generator=g) for x in f]
    mid = trained.assessor.signals(drift, f, s).coh
    assert (mid < same).all() and mid.mean() > other.mean()


def test_no_signal_is_constant(trained):
    """Each of e_t, e_p, coh changes with the input and differs between blocks (the earlier faults: 0 and const)."""
    a, sa = states(trained, 0.2, seed=1)
    b, sb = states(trained, 0.9, seed=2)
    sig_a = trained.assessor.signals(a, a, sa)
    sig_b = trained.assessor.signals(b, [x.roll(1, dims=0) for x in b], sb)
    for name in ("e_t", "e_p", "coh"):
        va, vb = getattr(sig_a, name), getattr(sig_b, name)
        assert ((va >= 0) & (va <= 1)).all() and ((vb >= 0) & (vb <= 1)).all()
        assert (va - vb).abs().max() > 1e-3, f"{name} does not react to its input: {va} vs {vb}"
        assert va.std() > 1e-4 or vb.std() > 1e-4, f"{name} is the same for every block"
    assert sig_a.e_t.max() > 0 and sig_a.e_p.max() > 0  # not the stuck-at-zero fault


def test_eval_mode_gives_the_training_outputs(trained):
    """No train/eval switch changes the logits (the earlier eval-mode sparsity zeroed them)."""
    f, _ = states(trained, 0.4)
    trained.assessor.train()
    try:
        out_train = trained.assessor(f)
    finally:
        trained.assessor.eval()
    out_eval = trained.assessor(f)
    for a, b in zip(out_train, out_eval):
        torch.testing.assert_close(a.timestep_logits, b.timestep_logits, rtol=0, atol=0)
        assert b.timestep_logits.abs().max() > 0 and b.pattern_logits.abs().max() > 0


def test_block_weighting_fuses_the_signals(trained, tmp_path):
    trained.assessor.save_pretrained(tmp_path / "a")
    fusion = FusionConfig(alpha=0.5, beta=0.25, delta=0.25)
    weighting = AssessorBlockPenalty.from_pretrained(tmp_path / "a", BASE_BLOCK_WEIGHTS, fusion, "cpu")
    f, s = states(trained, 0.6)
    student = [x + 0.3 * x.std(0) * torch.randn(x.shape, generator=torch.Generator().manual_seed(5)) for x in f]
    w = weighting(student, f, s)
    sig = trained.assessor.signals(student, f, s)
    torch.testing.assert_close(w.e_t, sig.e_t)
    torch.testing.assert_close(w.coh, sig.coh)
    base = torch.tensor(BASE_BLOCK_WEIGHTS)
    torch.testing.assert_close(w.lam, fuse_block_weights(base, sig.e_t, sig.e_p, sig.coh, fusion))
    assert not w.lam.requires_grad and w.lam.shape == (9,)
    ratio = w.lam / torch.tensor(BASE_BLOCK_WEIGHTS)
    assert ratio.std() > 1e-3, "lambda_b / w_b is the same for every block"
    with pytest.raises(ValueError, match="base"):
        AssessorBlockPenalty.from_pretrained(tmp_path / "a", [1.0] * 8, fusion, "cpu")


# ----------------------------------------------------------------------------------------------- save / load


def test_save_load_round_trip_and_refusals(trained, tmp_path):
    folder = trained.assessor.save_pretrained(tmp_path / "a")
    loaded = Assessor.from_pretrained(folder)
    f, s = states(trained, 0.5)
    for a, b in zip(trained.assessor(f), loaded(f)):
        torch.testing.assert_close(a.timestep_logits, b.timestep_logits, rtol=0, atol=0)
        torch.testing.assert_close(a.embedding, b.embedding, rtol=0, atol=0)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["block_names"] == list(BLOCK_NAMES) and cfg["num_bins"] == 100
    with pytest.raises(ValueError, match="exists"):
        trained.assessor.save_pretrained(folder)  # never overwrites

    state = load_file(str(folder / "model.safetensors"))
    cases = {
        "missing": {k: v for k, v in state.items() if k != "blocks.3.heads.weight"},
        "unexpected": {**state, "module.blocks.0.inp.weight": state["blocks.0.inp.weight"].clone()},
        "renamed": {("module." + k if k.startswith("blocks.0.") else k): v for k, v in state.items()},
        "shape": {**state, "blocks.0.heads.bias": torch.zeros(111)},
    }
    for name, bad in cases.items():
        save_file(bad, str(folder / "model.safetensors"))
        with pytest.raises(ValueError, match="missing keys|unexpected|Shape mismatch") as err:
            Assessor.from_pretrained(folder)
        if name != "shape":
            assert "blocks." in str(err.value)
    save_file(state, str(folder / "model.safetensors"))
    cfg["hidden_size"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hidden_size"):
        Assessor.from_pretrained(folder)
    with pytest.raises(ValueError, match="missing"):
        Assessor.from_pretrained(tmp_path / "nowhere")


def test_bad_features_raise_before_work(trained):
    f, s = states(trained, 0.5)
    with pytest.raises(ValueError, match="9 blocks"):
        trained.assessor.signals(f[:8], f[:8], s)
    with pytest.raises(ValueError, match=r"\(B, 32\)"):
        trained.assessor.signals([x[..., None, None] for x in f], f, s)
    with pytest.raises(ValueError, match="sigma"):
        trained.assessor.signals(f, f, s[:3])


def test_small_next_to_the_sd15_unet():
    assessor = Assessor(AssessorConfig(SD15_CHANNELS, list(BLOCK_NAMES)))
    assert assessor.num_parameters() < 0.01 * SD15_UNET_PARAMETERS


# ----------------------------------------------------------------------------------------------- profile


@pytest.fixture(scope="session")
def profile_dir(trained, tmp_path_factory):
    acc = ProfileAccumulator(trained.assessor)
    n = len(trained.x0)
    sigma = stratified_sigmas(400, 100, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    for start in range(0, 400, 100):
        s = sigma[start : start + 100]
        i = torch.arange(start, start + 100) % n
        x = flow_state(trained.x0[i], torch.randn(100, 4, 8, 8, generator=g), s)
        acc.update(trained.features(x, s, trained.prompt_embeds[i]), s)
    folder = tmp_path_factory.mktemp("assessor")
    save_profile(acc.result(), folder)
    return folder


def test_profile_files(profile_dir):
    profile = load_profile(profile_dir)
    assert profile.samples_per_bin == [4] * 100
    acc = profile.table("timestep_accuracy")
    assert acc.shape == (9, 100) and acc.max() > 0.15 and acc.std() > 0  # it reads some bins, not all equally
    assert profile.table("pattern_entropy").std() > 0
    from PIL import Image

    with Image.open(profile_dir / "profile.png") as img:
        assert img.width > 100 and img.height > 3 * 9
        assert len(set(img.convert("RGB").get_flattened_data())) > 10  # a heat map, not a blank page
    with pytest.raises(ValueError, match="exists"):
        save_profile(profile, profile_dir)


def test_stratified_sigmas_fill_every_bin():
    s = stratified_sigmas(250, 100, torch.Generator().manual_seed(0))
    counts = torch.bincount(sigma_to_bin(s, 100), minlength=100)
    assert counts.min() >= 2 and counts.max() <= 3
    with pytest.raises(ValueError, match="one sample per bin"):
        stratified_sigmas(50, 100)


def write_profile(folder, accuracy, error, entropy):
    profile = AssessorProfile(
        block_names=list(BLOCK_NAMES),
        num_bins=100,
        samples_per_bin=[25] * 100,
        timestep_accuracy=[list(accuracy)] * 9,
        timestep_error=[list(error)] * 9,
        pattern_entropy=[list(entropy)] * 9,
    )
    save_profile(profile, folder)
    return folder / "profile.json"


def test_adaptive_sampler_weights_and_draws_follow_the_profile(tmp_path):
    accuracy = [0.05] * 50 + [0.6] * 50  # the low-sigma half is unreliable
    error = [0.9 if k % 2 else 0.1 for k in range(100)]
    entropy = [k / 99 for k in range(100)]
    path = write_profile(tmp_path, accuracy, error, entropy)
    base = SigmaSampler(shift=1.0)  # uniform: every bin has the same base mass
    sampler = adaptive_sampler_from_profile(path, base, reliability_threshold=0.15, adaptive_jitter=0.5)
    w = sampler.bin_weights
    assert (w[:50] == 1).all()  # below the threshold: no opinion
    torch.testing.assert_close(w[50:], torch.tensor([1 + e for e in error[50:]], dtype=torch.float64))
    torch.testing.assert_close(sampler.jitter, torch.tensor([1 + 0.5 * e for e in entropy], dtype=torch.float64))

    n = 40_000
    draws = sampler.sample(n, torch.Generator().manual_seed(0))
    assert draws.min() >= 1e-3 and draws.max() <= 1.0
    # with base_jitter 1 and no adaptive jitter every draw stays in its bin: the histogram is the profile's
    sampler1 = adaptive_sampler_from_profile(path, base, reliability_threshold=0.15)
    draws1 = sampler1.sample(n, torch.Generator().manual_seed(0))
    counts1 = torch.bincount(sigma_to_bin(draws1, 100), minlength=100).double()
    expected = torch.tensor([1.0] * 50 + [1 + e for e in error[50:]], dtype=torch.float64)
    expected = n * expected / expected.sum()
    chi2 = ((counts1 - expected) ** 2 / expected).sum()
    assert chi2 < 149.4, chi2  # chi-square, 99 degrees of freedom, p = 0.001
    # the reliable high-error bins are drawn about 1.9 / 1.1 times as often as their low-error neighbours
    ratio = counts1[51:100:2].sum() / counts1[50:100:2].sum()
    assert 1.6 < ratio < 2.2


def test_adaptive_sampler_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="profile"):
        adaptive_sampler_from_profile(tmp_path / "none.json", SigmaSampler())
    path = write_profile(tmp_path, [0.5] * 100, [0.5] * 100, [0.5] * 100)
    with pytest.raises(ValueError, match="reliability_threshold"):
        adaptive_sampler_from_profile(path, SigmaSampler(), reliability_threshold=1.5)
    bad = json.loads(path.read_text())
    bad["timestep_error"][0][0] = 7.0
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="timestep_error"):
        load_profile(path)
