"""The wheel holds every module and data file: built from a copy of the sources, imported from a clean path.

An editable install maps each top-level folder onto ``flow_lune.<name>`` and imports any file below it, so a
subpackage missing from ``setup.py`` would work here and be absent from the wheel. This builds the wheel,
unpacks it, and imports every module of the source tree from the unpacked copy in a fresh interpreter whose
working directory is elsewhere, with the editable install's finders removed.
"""

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

SOURCE_ITEMS = ("setup.py", "pyproject.toml", "README.md")  # what the build reads besides the package folders


def mapped_folders() -> dict[str, str]:
    """``FOLDERS`` of setup.py (package -> folder), read without running it."""
    tree = ast.parse((REPO / "setup.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "FOLDERS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no FOLDERS mapping")


def expected_modules(folders: dict[str, str]) -> list[str]:
    """Every module of the source tree under the installed names: ``flow_lune.convert.sfio`` for convert/sfio.py."""
    names = []
    for package, folder in folders.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            if "__pycache__" in rel.parts or not (path.parent / "__init__.py").is_file():
                continue
            parts = [p for p in rel.parts if p != "__init__"]
            names.append(".".join([package, *parts]))
    return names


def test_no_test_puts_the_repository_root_on_sys_path():
    offenders = [
        p.name
        for p in (REPO / "tests").glob("*.py")
        if p.name != Path(__file__).name
        and ("sys.path.insert(" in p.read_text() or "sys.path.append(" in p.read_text())
    ]
    assert not offenders, f"tests that edit sys.path: {offenders}; use conftest.load_script for the scripts"


@pytest.fixture(scope="module")
def wheel_dir(tmp_path_factory) -> Path:
    if importlib.util.find_spec("wheel") is None:
        import setuptools

        if tuple(int(x) for x in setuptools.__version__.split(".")[:2]) < (70, 1):
            pytest.skip("building a wheel offline needs the 'wheel' package or setuptools >= 70.1 (pip install wheel)")
    src = tmp_path_factory.mktemp("src")
    for name in SOURCE_ITEMS:
        shutil.copy2(REPO / name, src / name)
    for folder in mapped_folders().values():
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out)]
    proc = subprocess.run([*cmd, str(src)], cwd=src, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = out.glob("flow_lune-*.whl")
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return site


IMPORT_ALL = r"""
import importlib, json, sys
site, names = sys.argv[1], json.loads(sys.argv[2])
# The editable install's finders would serve any module the wheel lacks from the work tree: remove them.
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "").lower()]
sys.path_importer_cache.clear()
sys.path.insert(0, site)
failed, outside = {}, {}
for name in names:
    try:
        module = importlib.import_module(name)
    except Exception as err:
        failed[name] = f"{type(err).__name__}: {err}"
        continue
    if not str(getattr(module, "__file__", "")).startswith(site):
        outside[name] = module.__file__
import flow_lune
print(json.dumps({"failed": failed, "outside": outside, "path": sys.path,
                  "exports": [type(flow_lune.FlowLunePipeline).__name__, type(flow_lune.FlowLuneScheduler).__name__]}))
"""


def test_wheel_imports_every_module_from_a_clean_path(wheel_dir, tmp_path):
    folders = mapped_folders()
    names = expected_modules(folders)
    assert "flow_lune.flow.bridge" in names and "flow_lune.training.step" in names  # the walk sees the tree
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, str(wheel_dir), json.dumps(names)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["failed"], result["failed"]
    assert not result["outside"], f"imported from outside the wheel: {result['outside']}"
    assert str(REPO) not in result["path"]
    assert result["exports"] == ["type", "type"]  # FlowLunePipeline and FlowLuneScheduler are classes


def test_wheel_ships_the_data_files(wheel_dir):
    configs = sorted(p.name for p in (wheel_dir / "flow_lune" / "convert" / "configs" / "sd15").glob("*.json"))
    assert configs == sorted(p.name for p in (REPO / "convert" / "configs" / "sd15").glob("*.json"))
    assert configs, "the converter's built-in SD1.5 configs are missing from the wheel"
