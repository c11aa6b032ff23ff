import json
import random
from pathlib import Path

import pytest
from conftest import WORDS, make_tokenizer, write_jsonl

from sftmix.data import (
    DataError,
    Record,
    build_dataset,
    load_records,
    read_groups,
    to_messages,
    tokenize_conversation,
)


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


def supervised_runs(tokenizer, labels) -> list[str]:
    """The decoded text of each run of consecutive supervised tokens."""
    runs, current = [], []
    for token in [*labels, -100]:
        if token != -100:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


def test_only_assistant_turns_are_supervised_multi_turn(tokenizer):
    """Each assistant turn up to and including <|im_end|>; not ChatML's "\n" after it, which is a separator."""
    messages = [
        {"role": "assistant", "content": "sea sea"},  # before any user turn: context, not supervised
        {"role": "user", "content": "tell me about the cat"},
        {"role": "assistant", "content": "the cat sat"},
        {"role": "user", "content": "why"},
        {"role": "assistant", "content": "blue sky"},
    ]
    tokens = tokenize_conversation(messages, tokenizer, max_length=None)
    assert supervised_runs(tokenizer, tokens["labels"]) == ["the cat sat<|im_end|>", "blue sky<|im_end|>"]
    assert not tokens["truncated"]
    assert tokenizer.decode(tokens["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)


TEMPLATES = Path(__file__).parent / "chat_templates"
TWO_TURNS = [
    {"role": "user", "content": "tell me about the cat"},
    {"role": "assistant", "content": "the cat sat"},
    {"role": "user", "content": "why"},
    {"role": "assistant", "content": "blue sky"},
]
SYSTEM = [{"role": "system", "content": "one two three"}]
CHATML_SPECIALS = ["<|im_start|>", "<|im_end|>"]
# family: (special tokens, bos, eos, conversation, the supervised text of each assistant turn)
FAMILIES = {
    "smollm2": (CHATML_SPECIALS, "<|im_start|>", "<|im_end|>", TWO_TURNS,
                ["the cat sat<|im_end|>", "blue sky<|im_end|>"]),
    "qwen2_5": (CHATML_SPECIALS, "<|im_start|>", "<|im_end|>", SYSTEM + TWO_TURNS,
                ["the cat sat<|im_end|>", "blue sky<|im_end|>"]),
    "llama3": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>",
               "<|eot_id|>", SYSTEM + TWO_TURNS, ["the cat sat<|eot_id|>", "blue sky<|eot_id|>"]),
    "mistral": (["<s>", "</s>"], "<s>", "</s>", TWO_TURNS, ["the cat sat</s>", "blue sky</s>"]),
    "gemma": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", TWO_TURNS,
              ["the cat sat<end_of_turn>", "blue sky<end_of_turn>"]),
}


def family_tokenizer(family: str):
    specials, bos, eos = FAMILIES[family][:3] if family in FAMILIES else (CHATML_SPECIALS, "<|im_start|>", "<|im_end|>")
    template = (TEMPLATES / f"{family}.jinja").read_text()
    return make_tokenizer(specials=specials, bos=bos, eos=eos, chat_template=template)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chat_template_families_supervise_turn_and_end_of_turn_only(family):
    """Real templates: the sequence is the template's own rendering; each assistant turn is supervised up to
    its end-of-turn token (Mistral's ' ', Gemma's and ChatML's '\n' after it are not)."""
    tokenizer = family_tokenizer(family)
    _, _, _, messages, expected = FAMILIES[family]
    tokens = tokenize_conversation(messages, tokenizer, max_length=None)
    assert supervised_runs(tokenizer, tokens["labels"]) == expected
    assert tokenizer.decode(tokens["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)


REASONING = [
    {"role": "user", "content": "why is the sky blue"},
    {"role": "assistant", "content": "<think>\nthe sky\n</think>\n\nblue sky"},
    {"role": "user", "content": "and the sea"},
    {"role": "assistant", "content": "<think>\nred sea\n</think>\n\nthe sea is blue"},
]


def test_qwen3_reasoning_turns_are_supervised_as_generated():
    """Qwen3 drops an earlier turn's <think> block once a later user turn follows: not prefix-preserving.
    Each turn is supervised as the template renders it when generating it, reasoning included."""
    tokenizer = family_tokenizer("qwen3")
    full = tokenizer.apply_chat_template(REASONING, tokenize=False)
    assert "<think>\nthe sky" not in full  # the template's own rendering loses the first turn's reasoning
    tokens = tokenize_conversation(REASONING, tokenizer, max_length=None)
    runs = supervised_runs(tokenizer, tokens["labels"])
    assert runs == ["<think>\nthe sky\n</think>\n\nblue sky<|im_end|>",
                    "<think>\nred sea\n</think>\n\nthe sea is blue<|im_end|>"]
    assert tokenizer.decode(tokens["input_ids"]) == (
        "<|im_start|>user\nwhy is the sky blue<|im_end|>\n<|im_start|>assistant\n"
        "<think>\nthe sky\n</think>\n\nblue sky<|im_end|>\n<|im_start|>user\nand the sea<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nred sea\n</think>\n\nthe sea is blue<|im_end|>\n"
    )
    # each turn is exactly what the template generates after its own prompt (then its "\n" separator)
    for index, run in ((1, 0), (3, 1)):
        prompt = tokenizer.apply_chat_template(REASONING[:index], tokenize=False, add_generation_prompt=True)
        alone = tokenizer.apply_chat_template(REASONING[: index + 1], tokenize=False)
        assert alone == prompt + runs[run] + "\n"


DEEPSEEK_SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]


def test_deepseek_r1_distill_template_and_its_training_template():
    """The original template renders answers without their reasoning (and prompts '<think>\n'): sftmix trains on
    what it renders. TRL's training template marks generation blocks that keep the reasoning: used as marked."""
    def tokenizer_with(template_file):
        return make_tokenizer(specials=DEEPSEEK_SPECIALS, bos="<｜begin▁of▁sentence｜>",
                              eos="<｜end▁of▁sentence｜>", chat_template=(TEMPLATES / template_file).read_text())

    original = tokenizer_with("deepseek_r1_distill.jinja")
    tokens = tokenize_conversation(REASONING, original, max_length=None)
    assert supervised_runs(original, tokens["labels"]) == [
        "\n\nblue sky<｜end▁of▁sentence｜>", "\n\nthe sea is blue<｜end▁of▁sentence｜>"]
    assert original.decode(tokens["input_ids"]) == original.apply_chat_template(REASONING, tokenize=False)
    training = tokenizer_with("deepseek_r1_distill_training.jinja")
    tokens = tokenize_conversation(REASONING, training, max_length=None)
    assert supervised_runs(training, tokens["labels"]) == [
        "<｜Assistant｜><think>\nthe sky\n</think>\n\nblue sky<｜end▁of▁sentence｜>",
        "<｜Assistant｜><think>\nred sea\n</think>\n\nthe sea is blue<｜end▁of▁sentence｜>",
    ]


def test_generation_markers_are_used_as_marked():
    """A template whose {% generation %} blocks hold the content only: the end-of-turn token is then not
    supervised, because the markers (not sftmix's own rule) decide. Leading assistant turns stay context."""
    marked = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] == 'assistant' %}"
        "{% generation %}{{ m['content'] }}{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}"
        "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tokenizer = make_tokenizer(chat_template=marked)
    messages = [{"role": "assistant", "content": "sea sea"}, *TWO_TURNS]
    tokens = tokenize_conversation(messages, tokenizer, max_length=None)
    assert supervised_runs(tokenizer, tokens["labels"]) == ["the cat sat", "blue sky"]


def test_turn_by_turn_equals_one_rendering_for_prefix_preserving_templates():
    """The general path (used for Qwen3 / DeepSeek) gives the same pieces as the single-rendering path."""
    from sftmix.data.tokenization import _prefix_pieces, _turn_by_turn_pieces

    for family in ("llama3", "mistral", "gemma", "qwen2_5"):
        tokenizer = family_tokenizer(family)
        messages = FAMILIES[family][3]
        one_rendering = [piece for piece in _prefix_pieces(messages, tokenizer) if piece[0]]
        assert [piece for piece in _turn_by_turn_pieces(messages, tokenizer) if piece[0]] == one_rendering


def random_conversations(count: int, seed: int, system: bool) -> list[list[dict[str, str]]]:
    """Multi-turn conversations of varied lengths, some opening with a system or an assistant turn, some ending
    on a user turn."""
    rng = random.Random(seed)
    say = lambda: " ".join(rng.choices(WORDS, k=rng.randint(1, 25)))  # noqa: E731
    conversations = []
    for index in range(count):
        messages = [{"role": "system", "content": say()}] if system and index % 3 == 0 else []
        if index % 5 == 1:
            messages.append({"role": "assistant", "content": say()})
        for _ in range(rng.randint(1, 5)):
            messages += [{"role": "user", "content": say()}, {"role": "assistant", "content": say()}]
        if index % 7 == 2:
            messages.append({"role": "user", "content": say()})
        conversations.append(messages)
    return conversations


@pytest.mark.parametrize("family", [*sorted(FAMILIES), "qwen3", "smollm2_marked"])
def test_batched_tokenisation_equals_one_conversation_at_a_time(family, monkeypatch):
    """The fast path (one batched encode, labels from offsets, turn truncation read off the whole encoding)
    gives what the general path gives, conversation by conversation, at every max_length and truncation."""
    import sftmix.data.tokenization as data_module
    from sftmix.data.tokenization import _tokenize_one, tokenize_conversations

    if family == "smollm2_marked":  # generation markers: always the general path
        tokenizer = make_tokenizer(chat_template=(
            "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
            "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}"
            "{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"))
    else:
        tokenizer = family_tokenizer(family)
    conversations = random_conversations(16, seed=len(family), system=family != "mistral")
    read_off, real = [], data_module._read_off_cuts

    def recorded(*args):  # every cut read off the whole encoding (None: the cut was encoded instead)
        cuts = real(*args)
        return lambda m: read_off.append(cuts(m)) or read_off[-1]

    monkeypatch.setattr(data_module, "_read_off_cuts", recorded)
    for max_length in (None, 8, 40, 120):
        for truncation in ("turns", "right"):
            batched = tokenize_conversations([(c, None) for c in conversations], tokenizer, max_length, truncation)
            for messages, got in zip(conversations, batched):
                try:
                    expected = _tokenize_one(messages, tokenizer, max_length, truncation, None)
                except Exception as err:  # noqa: BLE001 - the same refusal either way
                    expected = err
                assert type(got) is type(expected)
                if isinstance(got, dict):
                    assert got == expected
    if family in ("smollm2", "qwen2_5", "llama3", "gemma"):  # cuts fall on a special token: no re-encoding
        assert any(kept is not None for kept in read_off)


def test_conversations_the_template_rejects_are_counted(tmp_path):
    """Mistral's template raises on a system turn: that record is skipped and counted, the others kept."""
    rows = [{"id": "ok", "messages": TWO_TURNS}, {"id": "system", "messages": SYSTEM + TWO_TURNS}]
    dataset, report = build_dataset(write_jsonl(tmp_path / "d.jsonl", rows), family_tokenizer("mistral"))
    assert dataset["id"] == ["ok"]
    assert report.skipped_records == {"rejected by the chat template (TemplateError)": 1}


def test_right_truncation_is_counted_and_unsupervised_examples_dropped(tmp_path, tokenizer):
    rows = [
        {"id": "short", "instruction": "why", "output": "blue"},
        {"id": "long-answer", "instruction": "why", "output": " ".join(["blue sky"] * 40)},
        {"id": "long-prompt", "instruction": " ".join(["tell me"] * 60), "output": "red"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    dataset, report = build_dataset(path, tokenizer, max_length=40, truncation="right")
    assert dataset["id"] == ["short", "long-answer"]
    assert report.num_truncated == 2 and report.truncation == {"cut on the right": 2}
    assert report.dropped_no_supervised_tokens == ["long-prompt"]
    assert all(len(ids) <= 40 for ids in dataset["input_ids"])
    assert "1 dropped: no assistant token left after truncation" in report.summary()
    kept, report = build_dataset(path, tokenizer, max_length=40)  # the default keeps supervision
    assert kept["id"] == ["short", "long-answer", "long-prompt"] and not report.dropped_no_supervised_tokens
    assert report.truncation == {"response cut on the right": 1, "prompt cut from the left": 1}
    assert all(len(ids) <= 40 for ids in kept["input_ids"])


def render_tokens(tokenizer, messages):
    return tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]


def test_turn_truncation_keeps_whole_turns_from_the_start(tokenizer):
    messages = [*SYSTEM, *TWO_TURNS, {"role": "user", "content": "how"}, {"role": "assistant", "content": "red " * 30}]
    limit = len(render_tokens(tokenizer, messages[:5])) + 2
    tokens = tokenize_conversation(messages, tokenizer, max_length=limit)
    assert tokens["cuts"] == ["later turns dropped"] and len(tokens["input_ids"]) <= limit
    assert tokenizer.decode(tokens["input_ids"]) == tokenizer.apply_chat_template(messages[:5], tokenize=False)
    assert supervised_runs(tokenizer, tokens["labels"]) == ["the cat sat<|im_end|>", "blue sky<|im_end|>"]


def test_turn_truncation_cuts_a_long_prompt_from_the_left_keeping_the_system_message(tokenizer):
    long_prompt = " ".join(f"one {word}" for word in "the a cat dog sat on mat red blue green".split() * 4)
    messages = [{"role": "assistant", "content": "sea"}, *SYSTEM, {"role": "user", "content": long_prompt},
                {"role": "assistant", "content": "blue sky"}]
    empty_prompt = [*SYSTEM, {"role": "user", "content": ""}, messages[-1]]
    limit = len(render_tokens(tokenizer, empty_prompt)) + 20
    tokens = tokenize_conversation(messages, tokenizer, max_length=limit)
    text = tokenizer.decode(tokens["input_ids"])
    assert tokens["cuts"] == ["prompt cut from the left"] and limit - 3 <= len(tokens["input_ids"]) <= limit
    assert text.startswith("<|im_start|>system\none two three<|im_end|>\n<|im_start|>user\n")
    kept_prompt = text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    assert long_prompt.endswith(kept_prompt) and len(kept_prompt) < len(long_prompt)
    assert "sea" not in text  # the assistant context before the first user turn is dropped first
    assert supervised_runs(tokenizer, tokens["labels"]) == ["blue sky<|im_end|>"]


def test_turn_truncation_cuts_a_response_longer_than_the_window(tokenizer):
    messages = [{"role": "user", "content": "tell me " * 30}, {"role": "assistant", "content": "blue sky " * 40}]
    tokens = tokenize_conversation(messages, tokenizer, max_length=48)
    assert tokens["cuts"] == ["prompt cut from the left", "response cut on the right"]
    assert len(tokens["input_ids"]) == 48
    kept_prompt = tokenizer.decode(tokens["input_ids"]).split("user\n")[1].split("<|im_end|>")[0]
    assert len(tokenizer(kept_prompt)["input_ids"]) == 48 // 4  # the prompt keeps a quarter of the window
    supervised = supervised_runs(tokenizer, tokens["labels"])
    assert len(supervised) == 1 and ("blue sky " * 40).startswith(supervised[0])


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
    assert read_groups(path) == {"a": "confident", "b": "unconfident"}
    write_jsonl(path, [{"id": "a", "group": "sure"}])
    with pytest.raises(DataError, match=r"c\.jsonl:1: needs 'id' and 'group'"):
        read_groups(path)
    with pytest.raises(DataError, match="sftmix dynamics"):
        read_groups(tmp_path / "missing.jsonl")


def test_tokenised_data_is_cached_and_keyed(tmp_path, tokenizer, monkeypatch):
    import sftmix.data.dataset as data_module

    monkeypatch.setenv("SFTMIX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SFTMIX_NO_CACHE", raising=False)
    rows = [{"id": "a", "instruction": "why", "output": "blue sky"}, {"id": "b", "instruction": "how", "output": "red"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    first, first_report = build_dataset(path, tokenizer, max_length=64)
    calls = []
    real = data_module.tokenize_conversations
    monkeypatch.setattr(data_module, "tokenize_conversations", lambda conversations, *a: calls.extend(conversations)
                        or real(conversations, *a))
    second, second_report = build_dataset(path, tokenizer, max_length=64)
    assert calls == []  # served from the cache
    assert second.to_dict() == first.to_dict() and vars(second_report) == vars(first_report)
    build_dataset(path, tokenizer, max_length=32)  # another max_length: tokenised again
    assert len(calls) == 2
    write_jsonl(path, rows + [{"id": "c", "instruction": "what", "output": "green"}])
    third, _ = build_dataset(path, tokenizer, max_length=64)  # the file changed: tokenised again
    assert third["id"] == ["a", "b", "c"]
