"""Hostile-input battery, data loading: damaged files, colliding ids, stale or damaged caches.

Each test is one case a careful user or a production pipeline hits. The rule they check:
bad input stops with one clear error naming the file and line (or id) and what to do;
only a JSON array cut off at its very end may keep its complete records (counted).
"""

import json

import pytest
from conftest import write_jsonl

from sftmix.data import DataError, build_dataset, load_records, read_groups
from sftmix.errors import InputError

ROWS = [{"id": f"r{i}", "instruction": f"tell me {i}", "output": "blue sky"} for i in range(6)]


def json_array_text(rows) -> str:
    return json.dumps(rows, indent=2)


# --------------------------------------------------------------------------- 1. JSON arrays


def test_json_array_cut_off_at_end_keeps_complete_records(tmp_path):
    text = json_array_text(ROWS)
    path = tmp_path / "cut.json"
    for cut in (text.rindex('"blue'), text.rindex('"output"') + 4, text.rindex("}") - 1):
        path.write_text(text[:cut])
        records, report = load_records(path)
        assert [r.data["id"] for r in records] == [f"r{i}" for i in range(5)], cut
        assert "kept the 5 complete objects" in report.dropped_unparsable_tail
    path.write_text(text[: text.rindex("]")])  # every object complete, the closing ']' missing
    records, report = load_records(path)
    assert len(records) == 6 and "not closed" in report.dropped_unparsable_tail


def test_json_array_cut_at_any_position_keeps_exactly_the_complete_objects(tmp_path):
    rows = [{"id": "a", "instruction": 'q \u00e9 "x"', "output": "y", "n": -1.5e3, "ok": True, "none": None},
            {"id": "b", "instruction": "q", "output": "z", "list": [1, False, {"k": "v"}]}]
    text = json.dumps(rows, indent=1)
    ends = [text.index("\n }", text.index('"a"')) + 3, text.rindex("}") + 1]  # where each object closes
    path = tmp_path / "cut.json"
    for cut in range(2, len(text)):
        path.write_text(text[:cut])
        records, report = load_records(path)
        assert len(records) == sum(end <= cut for end in ends), text[:cut]
        assert report.dropped_unparsable_tail


def test_json_array_cut_inside_a_literal_at_end_keeps_complete_records(tmp_path):
    rows = [{"id": "a", "instruction": "q", "output": "x", "flag": True}, {"id": "b", "instruction": "q",
                                                                           "output": "y", "flag": True}]
    text = json.dumps(rows)
    path = tmp_path / "cut.json"
    path.write_text(text[: text.rindex("true") + 2])  # ... "flag": tr
    records, report = load_records(path)
    assert [r.data["id"] for r in records] == ["a"] and report.dropped_unparsable_tail


def test_json_array_error_in_the_middle_is_an_error_with_line(tmp_path):
    lines = json_array_text(ROWS).splitlines()
    broken = next(i for i, line in enumerate(lines) if '"id": "r2"' in line)
    lines[broken] = lines[broken].rstrip(",")  # a missing comma inside the third object
    path = tmp_path / "mid.json"
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=rf"mid\.json:{broken + 2}: invalid JSON"):
        load_records(path)


def test_two_concatenated_json_arrays_are_an_error(tmp_path):
    path = tmp_path / "two.json"
    path.write_text(json_array_text(ROWS[:3]) + "\n" + json_array_text(ROWS[3:]))
    with pytest.raises(DataError, match=r"two\.json:\d+: .*after the JSON array"):
        load_records(path)


def test_trailing_text_after_json_array_is_an_error(tmp_path):
    path = tmp_path / "trail.json"
    path.write_text(json_array_text(ROWS) + "\nthis is not json\n")
    with pytest.raises(DataError, match=r"trail\.json:\d+: .*after the JSON array"):
        load_records(path)


def test_json_objects_without_comma_are_an_error(tmp_path):
    path = tmp_path / "nocomma.json"
    path.write_text("[\n" + json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n]")
    with pytest.raises(DataError, match=r"nocomma\.json:3: expected ',' or ']'"):
        load_records(path)


# --------------------------------------------------------------------------- 13. encodings and missing files


def test_non_utf8_byte_names_file_and_line(tmp_path, tokenizer):
    good = json.dumps(ROWS[0]).encode()
    path = tmp_path / "latin.jsonl"
    path.write_bytes(good + b"\n" + good + b"\n" + json.dumps(ROWS[1]).encode().replace(b"blue", b"bl\xe9u") + b"\n")
    with pytest.raises(DataError, match=r"latin\.jsonl:3: not valid UTF-8"):
        build_dataset(path, tokenizer)
    array = tmp_path / "latin.json"
    array.write_bytes(b"[\n" + good + b",\n" + good.replace(b"blue", b"bl\xe9u") + b"\n]")
    with pytest.raises(DataError, match=r"latin\.json:3: not valid UTF-8"):
        load_records(array)


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode() + b"\n")
    records, _ = load_records(path)
    assert records[0].data["id"] == "r0"


def test_missing_data_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        load_records(tmp_path / "missing.jsonl")


def test_unreadable_parquet_names_the_file(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        load_records(path)


def test_missing_confidence_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match=r"missing\.jsonl: no such confidence file.*sftmix dynamics"):
        read_groups(tmp_path / "missing.jsonl")


# --------------------------------------------------------------------------- 8. repeated ids


def test_repeated_id_suffix_never_collides_with_an_existing_id(tmp_path, tokenizer):
    rows = [{"id": "x#2", "instruction": "a", "output": "b"}, {"id": "x", "instruction": "c", "output": "d"},
            {"id": "x", "instruction": "e", "output": "f"}, {"id": "x", "instruction": "g", "output": "h"}]
    dataset, report = build_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer)
    assert dataset["id"] == ["x#2", "x", "x#3", "x#4"]
    assert len(set(dataset["id"])) == 4
    assert report.skipped_records == {"repeated id, made unique with a #k suffix (kept)": 2}


def test_later_own_id_equal_to_an_earlier_suffix_stays_unique(tmp_path, tokenizer):
    rows = [{"id": "x", "instruction": "a", "output": "b"}, {"id": "x", "instruction": "c", "output": "d"},
            {"id": "x#2", "instruction": "e", "output": "f"}]
    dataset, _ = build_dataset(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer)
    assert len(set(dataset["id"])) == 3 and dataset["id"][:2] == ["x", "x#2"]


# --------------------------------------------------------------------------- 11. the tokenisation cache


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SFTMIX_NO_CACHE", raising=False)
    return tmp_path / "cache"


def test_cache_is_keyed_by_format_a_json_file_holding_jsonl_is_refused(tmp_path, tokenizer, fresh_cache):
    jsonl = write_jsonl(tmp_path / "d.jsonl", ROWS)
    build_dataset(jsonl, tokenizer, max_length=64)
    same_bytes = tmp_path / "d.json"
    same_bytes.write_bytes(jsonl.read_bytes())  # JSONL content under a .json name
    with pytest.raises(DataError, match=r"d\.json(?!l)"):  # this file, not the cached d.jsonl
        build_dataset(same_bytes, tokenizer, max_length=64)


def test_cache_report_names_the_file_actually_read(tmp_path, tokenizer, fresh_cache):
    first = write_jsonl(tmp_path / "first.jsonl", ROWS)
    second = tmp_path / "second.jsonl"
    second.write_bytes(first.read_bytes())
    build_dataset(first, tokenizer, max_length=64)
    _, report = build_dataset(second, tokenizer, max_length=64)
    assert "second.jsonl" in report.source and "first.jsonl" not in report.source


def test_damaged_cache_entry_is_rebuilt_with_a_warning(tmp_path, tokenizer, fresh_cache, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    first, _ = build_dataset(path, tokenizer, max_length=64)
    arrow_files = list(fresh_cache.rglob("*.arrow"))
    assert arrow_files
    for arrow in arrow_files:
        arrow.write_bytes(b"garbage")
    again, _ = build_dataset(path, tokenizer, max_length=64)
    assert again.to_dict() == first.to_dict()
    assert any("damaged" in r.getMessage() and "rebuilt" in r.getMessage() and str(fresh_cache) in r.getMessage()
               for r in caplog.records)  # names the entry
    third, _ = build_dataset(path, tokenizer, max_length=64)  # the rebuilt entry serves the next run
    assert third.to_dict() == first.to_dict()


CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                           "parameters": CITY}}]
TOOL_CONVERSATION = {"id": "t1", "tools": TOOLS, "messages": [
    {"role": "user", "content": "is the sky blue in paris"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "paris"}}}]},
    {"role": "tool", "content": "blue sky", "tool_call_id": "c1"},
    {"role": "assistant", "content": "the sky is blue"},
]}


def test_tool_calls_are_trained_as_the_template_renders_them(tmp_path):
    """The calls are supervised (they are what the model must produce), the tool's result and the tool schemas are
    context; a template that cannot render calls skips the record and says why, never trains it as plain text."""
    from test_data import family_tokenizer, supervised_runs



    data = tmp_path / "tools.jsonl"
    data.write_text(json.dumps(TOOL_CONVERSATION) + "\n")
    tokenizer = family_tokenizer("qwen2_5")  # Qwen2.5's real template: tools, <tool_call>, <tool_response>
    dataset, report = build_dataset(data, tokenizer, max_length=None)
    input_ids, labels = dataset[0]["input_ids"], dataset[0]["labels"]
    text = tokenizer.decode(input_ids)
    assert "get_weather" in text.split("<|im_start|>user")[0]  # the schema, in the system prompt
    supervised = supervised_runs(tokenizer, labels)
    assert len(supervised) == 2 and '"name": "get_weather"' in supervised[0] and "paris" in supervised[0]
    assert supervised[1] == "the sky is blue<|im_end|>"
    assert "blue sky" in text and all("blue sky" not in run for run in supervised)  # the tool's result: context

    plain = family_tokenizer("smollm2")  # ChatML without tool support: it would drop the call
    data.write_text(json.dumps(TOOL_CONVERSATION) + "\n" + json.dumps({"instruction": "a", "output": "b"}) + "\n")
    dataset, report = build_dataset(data, plain, max_length=None)
    assert len(dataset) == 1 and report.skipped_records == {"rejected by the chat template (TemplateMismatch)": 1}


def test_malformed_tool_fields_name_the_line(tmp_path, tokenizer):


    bad = dict(TOOL_CONVERSATION, tools="{not json")
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:2: 'tools' is a string that does not parse as JSON"):
        build_dataset(data, tokenizer, max_length=None)
