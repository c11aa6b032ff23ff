"""`sftmix select`: subsets by confidence, variability or length; same record format out; clear errors."""

import json
import subprocess
import sys

import pytest
from conftest import make_conversations, write_jsonl

from sftmix.config import SelectConfig
from sftmix.data import build_dataset, example_id, load_records, to_messages
from sftmix.errors import InputError
from sftmix.selection import select, summary_path


@pytest.fixture()
def records(tmp_path):
    rows = make_conversations(10, seed=3)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    # confidence decreasing with the index; variability highest for the middle examples
    confidence = write_jsonl(tmp_path / "confidence.jsonl", [
        {"id": row["id"], "confidence": -float(i), "variability": float(-abs(i - 4.5)), "group": "confident"
         if i < 5 else "unconfident"} for i, row in enumerate(rows)])
    return rows, data, confidence


def selected_ids(path):
    return [str(record.data["id"]) for record in load_records(path)[0]]


def test_top_and_bottom_by_confidence_and_variability(records, tmp_path):
    rows, data, confidence = records
    out = tmp_path / "top.jsonl"
    summary = select(SelectConfig(output=str(out), dataset_path=str(data), confidence_path=str(confidence), k=3))
    assert selected_ids(out) == ["e0", "e1", "e2"]
    assert [record.data for record in load_records(out)[0]] == rows[:3]  # records unchanged, input order
    assert summary["selected"] == 3 and summary["selected_range"] == [-2.0, 0.0]
    assert json.loads(summary_path(out).read_text()) == summary

    select(SelectConfig(output=str(out), dataset_path=str(data), confidence_path=str(confidence), keep="bottom",
                        fraction=0.2))
    assert selected_ids(out) == ["e8", "e9"]
    select(SelectConfig(output=str(out), dataset_path=str(data), confidence_path=str(confidence), by="variability",
                        k=2))
    assert selected_ids(out) == ["e4", "e5"]  # variability -0.5 for both: the tie is broken by id


def test_longest_responses_without_ids_get_their_ids(tmp_path):
    lengths = [5, 40, 12, 33, 7, 21, 40, 2]  # two records tie at 40
    rows = [{"instruction": f"question {i}", "output": "word " * n} for i, n in enumerate(lengths)]
    data = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    out = tmp_path / "longest.json"
    summary = select(SelectConfig(output=str(out), dataset_path=str(data), by="length", k=3))
    subset = [record.data for record in load_records(out)[0]]
    assert [{k: v for k, v in row.items() if k != "id"} for row in subset] == [rows[1], rows[3], rows[6]]
    assert summary["selected_range"] == [5.0 * 33, 5.0 * 40]  # characters of the reply
    # each selected record carries the id sftmix gives the original, so ids survive the subset
    originals = [example_id(record, to_messages(record)) for record in load_records(data)[0]]
    assert [row["id"] for row in subset] == [originals[1], originals[3], originals[6]]


def test_subset_loads_as_training_data(records, tmp_path, tokenizer):
    _, data, confidence = records
    out = tmp_path / "subset.jsonl"
    select(SelectConfig(output=str(out), dataset_path=str(data), confidence_path=str(confidence), k=5))
    dataset, report = build_dataset(str(out), tokenizer, max_length=64)
    assert sorted(dataset["id"]) == ["e0", "e1", "e2", "e3", "e4"] and report.num_examples == 5


def test_unscored_records_are_counted_not_selected(records, tmp_path):
    rows, data, confidence = records
    partial = write_jsonl(tmp_path / "partial.jsonl", [json.loads(line) for line in
                                                       confidence.read_text().splitlines()[2:]])
    summary = select(SelectConfig(output=str(tmp_path / "o.jsonl"), dataset_path=str(data),
                                  confidence_path=str(partial), fraction=0.5))
    assert summary["unscored"] == 2 and summary["unscored_ids"] == ["e0", "e1"]
    assert selected_ids(tmp_path / "o.jsonl") == ["e2", "e3", "e4", "e5"]  # half of the 8 scored


def test_errors_name_the_problem(records, tmp_path):
    rows, data, confidence = records
    out = str(tmp_path / "o.jsonl")
    other = write_jsonl(tmp_path / "other.jsonl", [{"id": "x1", "confidence": 1.0, "group": "confident"}])
    with pytest.raises(InputError, match=r"other.jsonl: 1 of 1 ids are not in the dataset \(e.g. \['x1'\]\)"):
        select(SelectConfig(output=out, dataset_path=str(data), confidence_path=str(other), k=1))
    with pytest.raises(InputError, match="needs --confidence_path"):
        select(SelectConfig(output=out, dataset_path=str(data), k=1))
    with pytest.raises(InputError, match="more than the 10 scored"):
        select(SelectConfig(output=out, dataset_path=str(data), confidence_path=str(confidence), k=11))
    no_variability = write_jsonl(tmp_path / "old.jsonl", [{"id": "e0", "confidence": 1.0, "group": "confident"}])
    with pytest.raises(InputError, match=r"old.jsonl:1: no 'variability'"):
        select(SelectConfig(output=out, dataset_path=str(data), confidence_path=str(no_variability), by="variability",
                            k=1))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "e0", "confidence": 1.0}\n{"id": "e1", "confidence": \n')
    with pytest.raises(InputError, match=r"broken.jsonl:2: invalid JSON"):
        select(SelectConfig(output=out, dataset_path=str(data), confidence_path=str(broken), k=1))
    with pytest.raises(InputError, match="exactly one of --k"):
        SelectConfig(output=out, k=2, fraction=0.5)
    with pytest.raises(InputError, match="use a .jsonl or .json"):
        SelectConfig(output=str(tmp_path / "o.csv"), k=2)
    assert not (tmp_path / "o.jsonl").exists()  # nothing half-written on error


@pytest.mark.integration
def test_select_command(records, tmp_path):
    _, data, confidence = records
    command = [sys.executable, "-m", "sftmix.cli", "select", "--dataset_path", str(data), "--confidence_path",
               str(confidence), "--k", "2", "--keep", "bottom", "--output", "subset.jsonl"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Selected 2 of 10 scored records by confidence (bottom" in done.stdout
    assert selected_ids(tmp_path / "subset.jsonl") == ["e8", "e9"]
    failed = subprocess.run([*command[:-1], "subset.txt"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines()[-1].startswith("sftmix select: error: --output subset.txt")


@pytest.mark.parametrize("line, message", [
    (b'{"id": "e0", "confidence": -1.0}\n{"id": "e1", "confidence": "caf\xe9"}\n',
     r"c\.jsonl:2: not valid UTF-8 \(byte 0xe9"),  # a traceback before: read as one UTF-8 text
    (b'{"id": "e0", "confidence": true}\n', r"c\.jsonl:1: needs 'id' and a finite number 'confidence'"),
    (b'{"id": "e0", "confidence": Infinity}\n', r"c\.jsonl:1: needs 'id' and a finite number 'confidence'"),
    (b'{"id": "e0", "confidence": NaN}\n', r"c\.jsonl:1: needs 'id' and a finite number 'confidence'"),
    (b'{"id": "e0", "confidence": 1}\n{"id": "e0", "confidence": 2}\n', r"c\.jsonl:2: duplicate id 'e0'"),
])
def test_confidence_file_is_read_as_every_input(records, tmp_path, line, message):
    """A confidence file gets the checks of data.read_groups: UTF-8 errors named by line, a byte-order mark
    accepted, and only finite real numbers as scores (JSON's `true` is no 1.0, inf no score)."""
    _, data, _ = records
    confidence = tmp_path / "c.jsonl"
    confidence.write_bytes(line)
    with pytest.raises(InputError, match=message):
        select(SelectConfig(output=str(tmp_path / "o.jsonl"), dataset_path=str(data),
                            confidence_path=str(confidence), k=1))
    assert not (tmp_path / "o.jsonl").exists()


def test_confidence_file_with_a_byte_order_mark_is_read(records, tmp_path):
    _, data, confidence = records
    marked = tmp_path / "bom.jsonl"
    marked.write_bytes(b"\xef\xbb\xbf" + confidence.read_bytes())
    select(SelectConfig(output=str(tmp_path / "o.jsonl"), dataset_path=str(data), confidence_path=str(marked), k=2))
    assert selected_ids(tmp_path / "o.jsonl") == ["e0", "e1"]


def test_select_ids_follow_the_training_ids(tmp_path, tokenizer):
    """Repeated ids and records with no reply: `select` names each record as build_dataset (and so the confidence
    file) does."""
    rows = [{"id": "x", "instruction": "a", "output": "b"}, {"id": "x", "instruction": "c", "output": ""},
            {"id": "x", "instruction": "e", "output": "f"}, {"id": "x#2", "instruction": "g", "output": "h"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    dataset, _ = build_dataset(str(data), tokenizer)
    summary = select(SelectConfig(output=str(tmp_path / "o.jsonl"), dataset_path=str(data), by="length", k=3))
    assert dataset["id"] == ["x", "x#2", "x#2#2"]  # the record with no reply claims no id
    assert summary["selected_ids"] == dataset["id"] and summary["unscored_ids"] == ["x"]
    assert [row["output"] for row in map(json.loads, (tmp_path / "o.jsonl").read_text().splitlines())] == [
        "b", "f", "h"]  # the record with no reply, also called x, is not taken for the example x
