"""Shared file helpers: a killed writer never leaves half a file or folder where a finished one is expected."""

import pytest

from sftmix.files import FULL_DISK_BYTES, atomic_directory, copy_atomic, out_of_space


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


def test_out_of_space_finds_the_errno_at_any_depth(tmp_path):
    import errno

    full = OSError(errno.ENOSPC, "No space left on device")
    try:
        try:
            raise full
        except OSError as err:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0") from err
    except RuntimeError as wrapped:
        assert out_of_space(wrapped, tmp_path) == "No space left on device"
    quota = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert out_of_space(quota, tmp_path) == "Disk quota exceeded"


def test_out_of_space_reads_safetensors_words(tmp_path):
    """safetensors (Rust) keeps no errno, only the words."""
    error = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    assert "os error 28" in out_of_space(error, tmp_path)


def test_out_of_space_falls_back_on_the_free_space_of_the_output_disk(tmp_path, monkeypatch):
    """torch.save on a full disk says only "unexpected pos 576 vs 534": then the disk's free space decides."""
    import shutil

    cryptic = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    seen = []

    def usage(path):
        seen.append(path)
        return shutil._ntuple_diskusage(100 * 2**20, 100 * 2**20 - 2**20, 2**20)  # 1 MiB free

    assert out_of_space(cryptic, tmp_path / "not" / "made" / "yet") is None  # this disk has room
    monkeypatch.setattr(shutil, "disk_usage", usage)
    assert out_of_space(cryptic, tmp_path / "not" / "made" / "yet") == "1.0 MiB left on its disk"
    assert seen == [tmp_path]  # the nearest folder that exists
    assert out_of_space(ValueError("a bug"), tmp_path) == "1.0 MiB left on its disk"  # any failure there
    assert 2**20 < FULL_DISK_BYTES
