"""Atomic writers: a failed write leaves the destination as it was and no temporary file behind."""

import pytest

from flow_lune.atomic import atomic_file, atomic_folder, atomic_text


def test_atomic_file_replaces_only_on_success(tmp_path):
    dst = tmp_path / "a.txt"
    atomic_text(dst, "old")

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_file(dst, fail)
    assert dst.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    atomic_text(dst, "new")
    assert dst.read_text() == "new"


def test_atomic_folder_keeps_the_old_folder_when_filling_fails(tmp_path):
    dst = tmp_path / "out"
    atomic_folder(dst, lambda tmp: (tmp / "x").write_text("1"))

    def fail(tmp):
        (tmp / "y").write_text("2")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_folder(dst, fail)
    assert sorted(p.name for p in dst.iterdir()) == ["x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    atomic_folder(dst, lambda tmp: (tmp / "z").write_text("3"))
    assert sorted(p.name for p in dst.iterdir()) == ["z"]
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="not a folder"):
        atomic_folder(tmp_path / "file", lambda tmp: None)
