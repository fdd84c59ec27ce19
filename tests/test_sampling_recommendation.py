"""One sampling recommendation per recipe (issue 12 item 7): the README, the model card, the single file's header
and the ComfyUI workflow of a run agree, for a run on the toy teacher (the measured recommendation) and for a run
on an SD1.5-recipe teacher (``tiny``: the unmeasured one); the toy one follows from the README's measurement; the
converter run on its own takes the recommendation from the source, else SD1.5's.

Two short in-process runs (one step each) on the session's trainer cache; the conversions are of the toy student
(2M parameters) and take about a second each.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO, load_script
from safetensors import safe_open

from flow_lune.settings import SD15_RECIPE, SD15_SAMPLING, TOY_RECIPE, TOY_SAMPLING, recipe_for

train_flow_distill = load_script("train_flow_distill.py")

pytestmark = pytest.mark.usefixtures("one_thread")


def run_args(output_dir: Path, cache_dir: Path, teacher: str, *extra: str) -> list[str]:
    """One training step, one validation prompt at one step, the export with its single file."""
    return [
        "--pretrained_teacher_model", teacher, "--output_dir", str(output_dir), "--cache_dir", str(cache_dir),
        "--num_generated", "8", "--generation_steps", "2", "--train_batch_size", "2", "--report_to", "none",
        "--num_validation_inference_steps", "1", "--max_train_steps", "1", "--seed", "3", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, trainer_cache) -> Path:
    """A run on the shipped toy teacher (toy recipe): teacher latents from 8 toy captions, no judge or evaluation."""
    out = tmp_path_factory.mktemp("toy-run") / "out"
    args = run_args(
        out, trainer_cache, "toy", "--prompts_file", "toy", "--validation_prompts", "a red circle at the left",
        "--judge_prompts", "0", "--eval_prompts", "0",
    )  # fmt: skip
    train_flow_distill.main(train_flow_distill.parse_args(args))
    return out


@pytest.fixture(scope="module")
def sd15_run(tmp_path_factory, trainer_cache, tiny_pipeline_dir) -> Path:
    """A run on the session's tiny SD1.5 pipeline: any teacher but the toy one follows the SD1.5 recipe."""
    assert recipe_for(str(tiny_pipeline_dir)) is SD15_RECIPE
    out = tmp_path_factory.mktemp("sd15-run") / "out"
    args = run_args(out, trainer_cache, str(tiny_pipeline_dir), "--validation_prompts", "a red square")
    train_flow_distill.main(train_flow_distill.parse_args(args))
    return out


# ---------------------------------------------------------------- the recommendations and where they come from


def readme() -> str:
    return (REPO / "README.md").read_text(encoding="utf-8")


def fewest_good_steps(rows: dict[int, tuple[float, float]]) -> int:
    """The rule of ``settings.TOY_SAMPLING``: the fewest Euler steps whose judge accuracy (%) is within 1 point of
    the best and whose toy FID is within 10% of the best. ``rows``: steps -> (accuracy, toy FID)."""
    best_accuracy = max(a for a, _ in rows.values())
    best_fid = min(f for _, f in rows.values())
    return min(s for s, (a, f) in rows.items() if a >= best_accuracy - 1 and f <= 1.1 * best_fid)


def test_the_toy_recommendation_follows_from_the_measurement_in_the_readme():
    """The default job's measured row (README) under the rule gives TOY_SAMPLING's steps, at its guidance."""
    (row,) = [line for line in readme().splitlines() if line.startswith("| its `eval/summary.md`")]
    guidance = float(re.search(r"prompts, guidance ([\d.]+)\)", row).group(1))
    found = re.search(r"student Euler ([\d /]+): accuracy ([\d% /]+), toy FID ([\d. /]+);", row)
    steps, accuracy, fid = ([float(x) for x in g.replace("%", "").split(" / ")] for g in found.groups())
    rows = {int(s): (a, f) for s, a, f in zip(steps, accuracy, fid, strict=True)}
    assert len(rows) >= 3
    assert fewest_good_steps(rows) == TOY_SAMPLING.steps
    assert guidance == TOY_SAMPLING.guidance_scale
    # The rule can pick fewer steps: it is not a constant.
    assert fewest_good_steps({25: (100.0, 12.0), 8: (99.5, 12.5), 4: (99.0, 13.0)}) == 4


def test_each_recipe_carries_one_recommendation_labelled_measured_or_not():
    assert TOY_RECIPE.sampling is TOY_SAMPLING and SD15_RECIPE.sampling is SD15_SAMPLING
    assert recipe_for("toy").sampling is TOY_SAMPLING and recipe_for("tiny").sampling is SD15_SAMPLING
    assert TOY_SAMPLING.basis.startswith("measured") and SD15_SAMPLING.basis.startswith("not measured")
    # The toy recipe validates and evaluates the student at the guidance the recommendation was measured at.
    assert TOY_RECIPE.validation_guidance_scale == TOY_SAMPLING.guidance_scale
    assert (SD15_RECIPE.num_validation_inference_steps, SD15_RECIPE.validation_guidance_scale) == (
        SD15_SAMPLING.steps, SD15_SAMPLING.guidance_scale,
    )  # fmt: skip


def test_reflow_keeps_its_own_override_on_the_recipe():
    from flow_lune.training.export import recommended_sampling

    assert recommended_sampling("toy") == TOY_SAMPLING and recommended_sampling("tiny") == SD15_SAMPLING
    guided = recommended_sampling("toy", "reflow", pair_guidance=3.0)
    assert (guided.steps, guided.guidance_scale) == (TOY_RECIPE.reflow_sampling_steps, 1.0)
    unguided = recommended_sampling("tiny", "reflow", pair_guidance=1.0)
    assert (unguided.steps, unguided.guidance_scale) == (
        SD15_RECIPE.reflow_sampling_steps,
        SD15_SAMPLING.guidance_scale,
    )
    assert recommended_sampling("toy", "reflow", 1.0).guidance_scale == TOY_SAMPLING.guidance_scale
    assert TOY_RECIPE.reflow_steps_basis.startswith("measured") and SD15_RECIPE.reflow_steps_basis.startswith("not")


def test_the_toy_reflow_steps_follow_from_the_committed_reflow_report():
    """docs/reflow/results.json (experiments/reflow.py) under TOY_SAMPLING's rule gives the toy reflow steps."""
    results = json.loads((REPO / "docs" / "reflow" / "results.json").read_text(encoding="utf-8"))
    rows = {
        int(s): (100 * row["accuracy"]["mean"], row["toy_fid_real"]["mean"]) for s, row in results["reflowed"].items()
    }
    assert len(rows) >= 3 and results["config"]["guidance"] > 1  # guided pairs: the student samples at cfg 1
    assert fewest_good_steps(rows) == TOY_RECIPE.reflow_sampling_steps


# ---------------------------------------------------------------- the four places of a run


def readme_example() -> str:
    (example,) = [
        b for b in re.findall(r"```python\n(.*?)```", readme(), flags=re.S) if "flow-lune-output/pipeline" in b
    ]
    return example


def test_the_readme_states_both_recommendations_and_which_is_measured():
    """The sampling example runs on the quickstart's toy student, so it uses the toy recommendation; the table
    gives both, labelled."""
    example = readme_example()
    toy, sd15 = TOY_SAMPLING, SD15_SAMPLING
    assert f"num_inference_steps={toy.steps}, guidance_scale={toy.guidance_scale!r})" in example
    assert f"an SD1.5 student: {sd15.steps} steps at {sd15.guidance_scale:g}" in example
    rows = {line.split("|")[1].strip(): line for line in readme().splitlines() if line.startswith("| ")}
    toy_row, sd15_row = rows["the toy teacher (the default job)"], rows["any other teacher (SD1.5)"]
    assert f"| {toy.steps} | {toy.guidance_scale:g} | **measured**" in toy_row
    assert f"| {sd15.steps} | {sd15.guidance_scale:g} | **not measured**" in sd15_row


def single_file_sampling(path: Path) -> tuple[int, float, float]:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return int(meta["flow_lune.steps"]), float(meta["flow_lune.cfg"]), float(meta["flow_lune.shift"])


def workflow_sampling(path: Path) -> tuple[int, float, float]:
    graph = json.loads(path.read_text())
    (sampler,) = [n["inputs"] for n in graph.values() if n["class_type"] == "KSampler"]
    (sd3,) = [n["inputs"] for n in graph.values() if n["class_type"] == "ModelSamplingSD3"]
    return sampler["steps"], sampler["cfg"], sd3["shift"]


def editor_sampling(path: Path) -> tuple[int, float]:
    (sampler,) = [n for n in json.loads(path.read_text())["nodes"] if n["type"] == "KSampler"]
    return sampler["widgets_values"][2], sampler["widgets_values"][3]  # seed, control, steps, cfg, ...


@pytest.mark.parametrize("run, recipe", [("toy_run", TOY_RECIPE), ("sd15_run", SD15_RECIPE)])
def test_the_model_card_header_and_workflows_of_a_run_give_its_recipes_recommendation(request, run, recipe):
    from huggingface_hub import metadata_load

    out = request.getfixturevalue(run)
    expected = recipe.sampling
    steps, cfg, shift = expected.steps, expected.guidance_scale, expected.shift
    card_path = out / "pipeline" / "README.md"
    card = card_path.read_text()
    assert f'prompt = "{recipe.validation_prompts[0]}"' in card  # a prompt this teacher draws
    assert f"**Sampling:** {steps} Euler steps, guidance {cfg:g}, shift {shift:g}" in card
    assert f"num_inference_steps={steps}, guidance_scale={cfg:g}" in card
    assert f"with {steps} euler steps at cfg {cfg:g}" in card
    assert expected.basis in card  # measured or not, in words
    assert metadata_load(card_path)["flow_lune_sampling"] == {
        "steps": steps, "guidance_scale": cfg, "shift": shift, "basis": expected.basis,
    }  # fmt: skip
    assert "TODO" not in card and "/tmp" not in card and str(Path.home()) not in card
    assert single_file_sampling(out / "flow_lune.safetensors") == (steps, cfg, shift)
    assert workflow_sampling(out / "flow_lune.workflow.json") == (steps, cfg, shift)
    assert editor_sampling(out / "flow_lune.workflow-editor.json") == (steps, cfg)
    plan = json.loads((out / "export-plan.json").read_text())
    assert (plan["sampling"]["steps"], plan["sampling"]["guidance_scale"]) == (steps, cfg)


# ---------------------------------------------------------------- the converter on its own


def convert(*argv: str) -> None:
    from flow_lune.convert.__main__ import main

    assert main([*argv, "--no-progress"]) == 0


def test_the_converter_takes_the_recommendation_from_the_model_card(toy_run, tmp_path, capsys):
    """``flow-lune-convert to-single-file`` on the toy run's pipeline folder, without --steps/--cfg."""
    dst = tmp_path / "student.safetensors"
    convert("to-single-file", str(toy_run / "pipeline"), str(dst), "--no-source-hash")
    toy = (TOY_SAMPLING.steps, TOY_SAMPLING.guidance_scale, TOY_SAMPLING.shift)
    assert single_file_sampling(dst) == toy and workflow_sampling(dst.with_suffix(".workflow.json")) == toy
    assert "sampling recommendation from the model card" in capsys.readouterr().out
    # Given flags win over the card, each on its own.
    given = tmp_path / "given.safetensors"
    convert("to-single-file", str(toy_run / "pipeline"), str(given), "--no-source-hash", "--steps", "5")
    assert single_file_sampling(given)[:2] == (5, TOY_SAMPLING.guidance_scale)


def test_a_round_trip_through_diffusers_keeps_the_recommendation(toy_run, tmp_path):
    """file -> to-diffusers (the header goes into the folder's card) -> to-single-file: the same steps and cfg."""
    folder = tmp_path / "back"
    convert("to-diffusers", str(toy_run / "flow_lune.safetensors"), str(folder), "--config", str(toy_run / "pipeline"))
    again = tmp_path / "again.safetensors"
    convert("to-single-file", str(folder), str(again), "--no-source-hash")
    assert single_file_sampling(again) == single_file_sampling(toy_run / "flow_lune.safetensors")


def test_a_source_without_a_recommendation_gets_sd15s_and_says_so(toy_run, tmp_path, capsys):
    folder = tmp_path / "pipeline"
    shutil.copytree(toy_run / "pipeline", folder)
    (folder / "README.md").unlink()
    dst = tmp_path / "plain.safetensors"
    convert("to-single-file", str(folder), str(dst), "--no-source-hash")
    assert single_file_sampling(dst)[:2] == (SD15_SAMPLING.steps, SD15_SAMPLING.guidance_scale)
    assert "no sampling recommendation" in capsys.readouterr().out


@pytest.mark.parametrize(
    "header, message",
    [
        ("flow_lune_sampling:\n  steps: 0\n  guidance_scale: 2.0\n", "need a whole number of steps >= 1"),
        ("flow_lune_sampling: eight\n", "not a mapping"),
        ("flow_lune_sampling: [unclosed\n", "does not parse"),
    ],
)
def test_a_broken_recommendation_in_the_card_is_one_error(toy_run, tmp_path, capsys, header, message):
    from flow_lune.convert.__main__ import main

    folder = tmp_path / "pipeline"
    shutil.copytree(toy_run / "pipeline", folder)
    (folder / "README.md").write_text(f"---\n{header}---\n\n# a card\n")
    dst = tmp_path / "never.safetensors"
    assert main(["to-single-file", str(folder), str(dst), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "--steps and --cfg" in err[0]
    assert not dst.exists()
    # Both given: the card is not read.
    convert("to-single-file", str(folder), str(dst), "--no-source-hash", "--steps", "3", "--cfg", "1.5")
    assert single_file_sampling(dst)[:2] == (3, 1.5)
