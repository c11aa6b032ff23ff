import json

import pytest
from conftest import write_jsonl

from sftmix.data import (
    DataError,
    Record,
    build_dataset,
    load_records,
    read_confidence,
    to_messages,
    tokenize_conversation,
)


def supervised_text(tokenizer, labels):
    return tokenizer.decode([token for token in labels if token != -100])


@pytest.mark.parametrize(
    "data, expected",
    [
        (
            {"instruction": "tell me", "input": "the cat", "output": "one dog"},
            [{"role": "user", "content": "tell me\n\nthe cat"}, {"role": "assistant", "content": "one dog"}],
        ),
        (
            {"instruction": "tell me", "input": "", "output": "one dog"},
            [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": "one dog"}],
        ),
        (
            {"prompt": "why", "completion": "blue"},
            [{"role": "user", "content": "why"}, {"role": "assistant", "content": "blue"}],
        ),
        (
            {"prompt": [{"role": "user", "content": "why"}], "completion": [{"role": "assistant", "content": "sky"}]},
            [{"role": "user", "content": "why"}, {"role": "assistant", "content": "sky"}],
        ),
        (
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "red"}]},
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "red"}],
        ),
        (
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                          {"role": "assistant", "content": "a"}]},
            [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
             {"role": "assistant", "content": "a"}],
        ),
    ],
)
def test_formats_normalise_to_messages(data, expected):
    assert to_messages(Record(data, "x.jsonl:1")) == expected


def test_only_assistant_turns_are_supervised_multi_turn(tokenizer):
    messages = [
        {"role": "assistant", "content": "sea sea"},  # before any user turn: context, not supervised
        {"role": "user", "content": "tell me about the cat"},
        {"role": "assistant", "content": "the cat sat"},
        {"role": "user", "content": "why"},
        {"role": "assistant", "content": "blue sky"},
    ]
    tokens = tokenize_conversation(messages, tokenizer, max_length=None)
    assert supervised_text(tokenizer, tokens["labels"]) == "the cat sat<|im_end|>\nblue sky<|im_end|>\n"
    assert not tokens["truncated"]
    assert tokenizer.decode(tokens["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_truncation_is_counted_and_unsupervised_examples_dropped(tmp_path, tokenizer):
    rows = [
        {"id": "short", "instruction": "why", "output": "blue"},
        {"id": "long-answer", "instruction": "why", "output": " ".join(["blue sky"] * 40)},
        {"id": "long-prompt", "instruction": " ".join(["tell me"] * 60), "output": "red"},
    ]
    dataset, report = build_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, max_length=40)
    assert dataset["id"] == ["short", "long-answer"]
    assert report.num_truncated == 2
    assert report.dropped_no_supervised_tokens == ["long-prompt"]
    assert all(len(ids) <= 40 for ids in dataset["input_ids"])
    assert "1 dropped: no assistant token left after truncation" in report.summary()


def test_malformed_jsonl_names_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        build_dataset(path, tokenizer)
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": 3}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: field 'output' must be a string"):
        build_dataset(path, tokenizer)
    path.write_text('{"conversations": [{"from": "alien", "value": "x"}]}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: turn 0 has unknown role 'alien'"):
        build_dataset(path, tokenizer)
    path.write_text('{"text": "no format"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: unknown format"):
        build_dataset(path, tokenizer)


def test_truncated_json_array_keeps_complete_records(tmp_path):
    rows = [{"id": str(i), "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
            for i in range(3)]
    text = json.dumps(rows, indent=2)
    cut = text[: text.rindex('"id": "2"') + 12]  # cut inside the third object
    path = tmp_path / "cut.json"
    path.write_text(cut)
    records, report = load_records(path)
    assert [r.data["id"] for r in records] == ["0", "1"]
    assert "kept the 2 complete objects" in report.dropped_unparsable_tail
    assert records[1].where == "cut.json[1]"


def test_parquet_and_json_array(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": "p0", "instruction": "why", "output": "blue"}, {"id": "p1", "instruction": "how", "output": "red"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    from_parquet, _ = build_dataset(tmp_path / "d.parquet", tokenizer)
    from_json, _ = build_dataset(tmp_path / "d.json", tokenizer)
    assert from_parquet["id"] == from_json["id"] == ["p0", "p1"]
    assert from_parquet["labels"] == from_json["labels"]


def test_ids_are_stable_hashes_or_own_and_made_unique(tmp_path, tokenizer):
    rows = [
        {"instruction": "why", "output": "blue"},
        {"instruction": "why", "output": "red"},
        {"id": "x", "instruction": "a", "output": "b"},
        {"id": "x", "instruction": "c", "output": "d"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    first, report = build_dataset(path, tokenizer)
    second, _ = build_dataset(path, tokenizer)
    assert first["id"] == second["id"]
    assert len(first["id"][0]) == 16 and first["id"][0] != first["id"][1]
    assert first["id"][2:] == ["x", "x#2"]
    assert report.skipped_records == {"repeated id, made unique with a #k suffix (kept)": 1}


def test_records_without_assistant_reply_are_counted(tmp_path, tokenizer):
    rows = [
        {"id": "ok", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"id": "empty", "conversations": []},
        {"id": "only-gpt", "conversations": [{"from": "gpt", "value": "a"}]},
    ]
    dataset, report = build_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer)
    assert dataset["id"] == ["ok"]
    assert report.skipped_records == {"no assistant reply to a user turn": 2}


def test_read_confidence(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"id": "a", "confidence": -1.0, "group": "confident", "extra": 1},
        {"id": "b", "confidence": -2.0, "group": "unconfident"},
    ])
    assert read_confidence(path) == {"a": "confident", "b": "unconfident"}
    write_jsonl(path, [{"id": "a", "group": "sure"}])
    with pytest.raises(DataError, match=r"c\.jsonl:1: needs 'id' and 'group'"):
        read_confidence(path)
    with pytest.raises(FileNotFoundError, match="sftmix dynamics"):
        read_confidence(tmp_path / "missing.jsonl")


def test_data_and_losses_do_not_import_trl():
    import subprocess
    import sys

    code = "import sys, sftmix.data, sftmix.losses; sys.exit('trl' in sys.modules or 'sftmix.cli' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_tokenised_data_is_cached_and_keyed(tmp_path, tokenizer, monkeypatch):
    import sftmix.data as data_module

    monkeypatch.setenv("SFTMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SFTMIX_NO_CACHE", raising=False)
    rows = [{"id": "a", "instruction": "why", "output": "blue sky"}, {"id": "b", "instruction": "how", "output": "red"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    first, first_report = build_dataset(path, tokenizer, max_length=64)
    calls = []
    real = data_module.tokenize_conversation
    monkeypatch.setattr(data_module, "tokenize_conversation", lambda *a: calls.append(1) or real(*a))
    second, second_report = build_dataset(path, tokenizer, max_length=64)
    assert calls == []  # served from the cache
    assert second.to_dict() == first.to_dict() and vars(second_report) == vars(first_report)
    build_dataset(path, tokenizer, max_length=32)  # another max_length: tokenised again
    assert len(calls) == 2
    write_jsonl(path, rows + [{"id": "c", "instruction": "what", "output": "green"}])
    third, _ = build_dataset(path, tokenizer, max_length=64)  # the file changed: tokenised again
    assert third["id"] == ["a", "b", "c"]
