"""Shared file helpers: a killed writer never leaves half a file or folder where a finished one is expected."""

import pytest

from sftmix.files import atomic_directory, copy_atomic


def test_atomic_directory_replaces_only_when_finished(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "weights").write_text("half")
        raise RuntimeError("killed while writing")
    assert (target / "weights").read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["model"]  # no staging folder left behind
    with atomic_directory(target) as staging:
        (staging / "weights").write_text("new")
    assert (target / "weights").read_text() == "new"
    assert [path.name for path in tmp_path.iterdir()] == ["model"]


def test_atomic_directory_gives_way_to_a_finished_twin(tmp_path):
    """Two processes filling the same cache entry: the one that finishes second keeps the first one's."""
    target = tmp_path / "cache-entry"
    with atomic_directory(target, keep_existing=True) as staging:
        (staging / "data").write_text("mine")
        target.mkdir()
        (target / "data").write_text("theirs")
    assert (target / "data").read_text() == "theirs"
    assert [path.name for path in tmp_path.iterdir()] == ["cache-entry"]


def test_copy_atomic(tmp_path):
    (tmp_path / "plot.png").write_bytes(b"\x89PNG new")
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "plot.png").write_bytes(b"old")
    copy_atomic(tmp_path / "plot.png", tmp_path / "report" / "plot.png")
    assert (tmp_path / "report" / "plot.png").read_bytes() == b"\x89PNG new"
    assert [path.name for path in (tmp_path / "report").iterdir()] == ["plot.png"]
