"""docs/ ships with the project: links resolve, and the facts the docs state are the code's."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from flow_lune.convert import editor_workflow_path, workflow_path
from flow_lune.convert.architecture import expected_shapes
from flow_lune.convert.configs import builtin_config
from flow_lune.convert.metadata import single_file_metadata

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("math.md", "formats.md", "comfyui.md", "reflow.md", "evaluation.md")
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


def doc(name: str) -> str:
    return (ROOT / "docs" / name).read_text(encoding="utf-8")


@pytest.mark.parametrize("page", ["README.md", *(f"docs/{d}" for d in DOCS)])
def test_relative_links_resolve(page):
    path = ROOT / page
    targets = [m.group(1) for m in LINK.finditer(path.read_text(encoding="utf-8"))]
    local = [t for t in targets if not t.startswith(("http://", "https://"))]
    missing = [t for t in local if not (path.parent / t).exists()]
    assert not missing, f"{page} links to missing files: {missing}"


def test_readme_links_every_doc_and_no_outside_design_file():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "../shared" not in readme
    for name in DOCS:
        assert f"(docs/{name})" in readme


def table_keys(text: str, after: str) -> set[str]:
    """The backticked first cells of the Markdown table that follows the line containing ``after``."""
    lines = text[text.index(after) :].splitlines()[1:]
    rows = []
    started = False
    for line in lines:
        if line.startswith("|"):
            started = True
            rows.append(line)
        elif started:
            break
    keys = set()
    for row in rows[2:]:  # header and rule
        cell = row.split("|")[1].strip()
        keys |= set(re.findall(r"`([^`]+)`", cell))
    return keys


def test_formats_lists_exactly_the_header_keys_the_converter_writes():
    common = dict(cfg=4.5, steps=20, width=512, height=512, components=["unet"], source_kind="x", ema=None)
    flow = single_file_metadata(title="t", shift=3.0, source_names=["a"], **common)
    eps = single_file_metadata(title="t", prediction_type="epsilon", shift=None, source_names=None, **common)
    documented = table_keys(doc("formats.md"), "**Header metadata**")
    flow_keys = {k.split(",")[0] for k in documented}
    assert set(flow) | set(eps) == {k for k in flow_keys if "." in k or k == "format"}


def test_formats_counts_match_the_key_tables():
    text = doc("formats.md")
    counts = {}
    for name in ("unet", "vae", "text_encoder"):
        shapes = expected_shapes(name, builtin_config(name))
        counts[name] = (len(shapes), sum(math.prod(s) for s in shapes.values()))
    assert f"| {counts['unet'][0]} | {counts['unet'][1]:,} |" in text
    assert f"| {counts['vae'][0]} | {counts['vae'][1]:,} |" in text
    assert f"{counts['text_encoder'][0]}, plus `text_model.embeddings.position_ids`" in text
    assert f"| {counts['text_encoder'][1]:,} |" in text
    total = sum(n for n, _ in counts.values()) + 1  # + position_ids
    assert f"holds {total} tensors" in text


def test_docs_name_the_workflow_files_the_converter_writes():
    dst = Path("student.safetensors")
    for name in ("formats.md", "comfyui.md"):
        text = doc(name)
        assert workflow_path(dst).name.replace("student", "") in text  # ".workflow.json"
        assert editor_workflow_path(dst).name.replace("student", "") in text  # ".workflow-editor.json"


def test_math_quotes_the_teachers_range():
    from flow_lune.flow import TeacherSchedule

    schedule = TeacherSchedule.from_scheduler_config(builtin_config("scheduler"))
    text = doc("math.md")
    assert f"sigma(0) = {float(schedule.sigma_min):.5f}" in text
    assert f"sigma(999) = {float(schedule.sigma_max):.5f}" in text


def test_readme_install_and_gpu_sections():
    """The CPU-only install line is PyTorch's CPU index; the memory estimate's parts are the models' sizes."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in readme
    assert "an estimate, not a GPU\nmeasurement" in readme
    sizes = {
        name: sum(math.prod(s) for s in expected_shapes(name, builtin_config(name)).values())
        for name in ("unet", "vae", "text_encoder")
    }
    unet = sizes["unet"]
    assert f"{unet / 1e6:.1f}M parameters" in readme
    assert f"fp32 weights {unet * 4 / 1e9:.2f} GB" in readme
    assert f"two fp32 states {unet * 8 / 1e9:.2f} GB" in readme
    assert f"`--use_8bit_adam`: {unet * 2 / 1e9:.2f} GB" in readme
    assert f"teacher UNet in bf16 {unet * 2 / 1e9:.2f} GB" in readme
    assert f"text encoder in fp32 {(sizes['vae'] + sizes['text_encoder']) * 4 / 1e9:.2f} GB" in readme
    for name in ("ddp.yaml", "fsdp.yaml", "deepspeed_zero2.yaml"):
        assert f"`{name}`" in readme and (ROOT / "configs" / "accelerate" / name).is_file()
