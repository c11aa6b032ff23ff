"""Hostile-input battery, files: results readable as the umask says, the cache variable, filesystems without locks,
and what compare-splits compares."""

import errno
import os
import stat

import pytest
from conftest import write_jsonl

from sftmix import files
from sftmix.cli import main


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_results_are_as_readable_as_the_umask_says(umask, mode, tmp_path):
    previous = os.umask(umask)
    try:
        files.write_atomic(tmp_path / "metrics.json", "{}")
        files.copy_atomic(tmp_path / "metrics.json", tmp_path / "copy.json")
        with files.atomic_directory(tmp_path / "cache-entry") as staging:
            (staging / "report.json").write_text("{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "copy.json").stat().st_mode) == mode
    assert stat.S_IMODE((tmp_path / "cache-entry").stat().st_mode) == mode | (mode & 0o444) >> 2  # r -> x


def test_an_empty_cache_variable_means_the_default(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SFTMIX_CACHE", "")
    assert files.cache_root() == files.Path.home() / ".cache" / "sftmix"  # not ./, where tokenized/ appeared


def test_a_filesystem_without_locks_is_told_apart_from_a_held_lock(monkeypatch, tmp_path, caplog):
    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(files.fcntl, "flock", no_locks)
    files.OutputLock(tmp_path / "out").acquire()  # no false "in use by another sftmix run"
    assert "does not lock files" in caplog.text


def test_compare_splits_says_how_many_examples_it_compared(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", [{"id": f"e{n}", "group": "confident" if n < 8 else "unconfident"}
                                       for n in range(16)])
    write_jsonl(tmp_path / "b.jsonl", [{"id": f"e{n}", "group": "confident"} for n in (0, 1)] +
                [{"id": f"x{n}", "group": "unconfident"} for n in range(14)])
    assert main(["compare-splits", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]) == 0
    captured = capsys.readouterr()
    assert "1.0000 of the 2 shared examples" in captured.out and "16 examples" in captured.out
    assert "only 2 of the examples are in both files" in captured.err


def test_an_unwritable_cache_costs_the_cache_not_the_run(tmp_path, tokenizer, tiny_data, monkeypatch, caplog):
    from sftmix.data import build_dataset

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")  # read-only for root too
    monkeypatch.setenv("SFTMIX_CACHE", str(blocked))
    monkeypatch.delenv("SFTMIX_NO_CACHE", raising=False)
    dataset, _ = build_dataset(tiny_data[0], tokenizer, max_length=64)
    assert len(dataset) == 16 and "tokenised data is not cached this time" in caplog.text
    assert str(blocked) in caplog.text


def test_a_full_cache_disk_is_named_as_the_cache(tmp_path, monkeypatch):
    import sftmix.data.reading as data
    from sftmix.errors import InputError

    monkeypatch.setenv("SFTMIX_CACHE", str(tmp_path / "cache"))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(data, "write_jsonl", full)
    with pytest.raises(InputError, match=rf"into the cache {tmp_path / 'cache'} \(the disk is full"):
        data.write_records([data.Record({"instruction": "a", "output": "b"}, "x:1")], ["mixture"])
