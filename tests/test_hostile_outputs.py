"""Hostile-input battery, outputs: no command writes over one of its inputs, however the path is spelled."""

import json
import os

import pytest
from conftest import write_groups, write_jsonl

from sftmix.cli import main


def refused(capsys, *argv) -> str:
    status = main(list(argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sftmix ")]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def inputs(tmp_path, tiny_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = [json.loads(line) for line in tiny_data[0].read_text().splitlines()]
    data = write_jsonl(tmp_path / "arr.jsonl", rows)
    groups = write_groups(tmp_path / "confidence.jsonl", [row["id"] for row in rows])
    os.symlink(data, tmp_path / "link.jsonl")
    return {name: path.read_bytes() for name, path in [("arr.jsonl", data), ("confidence.jsonl", groups)]}


@pytest.mark.parametrize("output, what", [("arr.jsonl", "--dataset_path arr.jsonl"),
                                          ("./arr.jsonl", "--dataset_path arr.jsonl"),
                                          ("link.jsonl", "--dataset_path arr.jsonl"),
                                          ("confidence.jsonl", "--confidence_path confidence.jsonl")])
def test_select_never_writes_over_its_dataset_or_confidence_file(output, what, inputs, capsys, tmp_path):
    line = refused(capsys, "select", "--dataset_path", "arr.jsonl", "--confidence_path", "confidence.jsonl",
                   "--by", "confidence", "--k", "3", "--output", output)
    assert f"--output {output} is {what}: sftmix never writes over its inputs" in line
    assert {name: (tmp_path / name).read_bytes() for name in inputs} == inputs  # untouched


def test_select_summary_never_writes_over_an_input(inputs, capsys, tmp_path):
    (tmp_path / "sub.jsonl.selection.json").write_text("{}")  # the user's, named as select names its summary
    line = refused(capsys, "select", "--dataset_path", "sub.jsonl.selection.json", "--by", "length", "--k", "1",
                   "--output", "sub.jsonl")
    assert "--output's summary sub.jsonl.selection.json is --dataset_path" in line


def test_train_never_writes_over_the_base_model(tiny_model_dir, tiny_data, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = {path.name: path.read_bytes() for path in tiny_model_dir.iterdir() if path.is_file()}
    line = refused(capsys, "train", "--model_name_or_path", str(tiny_model_dir), "--output_dir", f"{tiny_model_dir}/.",
                   "--dataset_path", str(tiny_data[0]), "--loss_type", "ntp", "--use_cpu", "true")
    assert "is --model_name_or_path" in line and "choose another --output_dir" in line
    assert {path.name: path.read_bytes() for path in tiny_model_dir.iterdir() if path.is_file()} == before


def test_run_never_writes_over_a_dataset_inside_its_folder(inputs, capsys, tmp_path):
    (tmp_path / "r" / "data").mkdir(parents=True)
    (tmp_path / "r" / "data" / "train.jsonl").write_bytes(inputs["arr.jsonl"])
    line = refused(capsys, "run", "--dataset_path", "r/data/train.jsonl", "--output_dir", "r", "--use_cpu", "true")
    assert "--output_dir's data/train.jsonl r/data/train.jsonl is --dataset_path r/data/train.jsonl" in line
    assert (tmp_path / "r" / "data" / "train.jsonl").read_bytes() == inputs["arr.jsonl"]


def test_dynamics_never_scores_into_the_checkpoint_it_reads(tiny_model_dir, tiny_data, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, "dynamics", "--checkpoints", str(tiny_model_dir), "--model_name_or_path",
                   str(tiny_model_dir), "--output_dir", str(tiny_model_dir), "--dataset_path", str(tiny_data[0]))
    assert "is --model_name_or_path" in line or "is --checkpoints" in line


def test_eval_never_writes_over_its_mt_bench_questions(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    questions = write_jsonl(tmp_path / "question.jsonl", [{"question_id": 81, "turns": ["a", "b"]}])
    before = questions.read_bytes()
    line = refused(capsys, "eval", "--model", "m", "--mt_bench_questions", "question.jsonl", "--output_dir",
                   "./question.jsonl")
    assert "question.jsonl is --mt_bench_questions question.jsonl: sftmix never writes over its inputs" in line
    assert questions.read_bytes() == before
