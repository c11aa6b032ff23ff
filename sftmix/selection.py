"""`sftmix select`: a subset of a dataset by confidence, variability or response length.

    records (any supported format) + confidence.jsonl (for confidence / variability)
      -> score per record -> top or bottom k (or a fraction) -> the same records, as JSONL / JSON
      -> <output>.selection.json: what was selected, from what, and the score range kept

The paper combines SFTMix with data selection (AlpaGasus-style filtering, the longest
responses): select a subset, then run the whole recipe on it (`sftmix run --dataset_path
subset.jsonl`), which recomputes the confidence split on the subset.

Selected records keep every field they had; a record without an `id` gets the id sftmix
gave it (a hash of its content), so the subset's examples keep their ids. Ties are broken
by id, so a selection is deterministic.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from .data import (
    DataError,
    UniqueIds,
    default_dataset_path,
    example_id,
    load_records,
    supervised_turns,
    to_messages,
)
from .errors import InputError
from .files import write_atomic

logger = logging.getLogger(__name__)

SCORES = ("confidence", "variability", "length")


def response_length(messages: list[dict[str, str]]) -> int:
    """Characters of the supervised assistant turns (tokenizer-free, so any model's subset is the same)."""
    return sum(len(messages[index]["content"]) for index in supervised_turns(messages))


def record_scores(records, by: str, confidence_path: str | None) -> tuple[list[str], dict[str, float], list[str]]:
    """(id of every record, score per scored id, ids of records with no score) for `by`."""
    ids, unique_ids, lengths = [], UniqueIds(), {}
    for record in records:
        messages = to_messages(record)
        identifier = example_id(record, messages)
        # the same #k suffixes as data.build_dataset (which skips records with no reply first), so ids
        # match confidence files
        if any(messages[index]["content"] for index in supervised_turns(messages)):
            identifier = unique_ids.claim(identifier)
        ids.append(identifier)
        lengths[identifier] = float(response_length(messages))
    if by == "length":
        return ids, lengths, []
    if confidence_path is None:
        raise InputError(f"--by {by} needs --confidence_path (the confidence.jsonl of `sftmix dynamics` on this data)")
    scores = read_scores(confidence_path, by)
    unknown = sorted(set(scores) - set(ids))
    if unknown:
        raise InputError(
            f"{confidence_path}: {len(unknown)} of {len(scores)} ids are not in the dataset (e.g. {unknown[:3]}): "
            "it was made from other data. Use the confidence file of `sftmix dynamics` on this dataset "
            "(with the same --max_examples)."
        )
    unscored = [identifier for identifier in ids if identifier not in scores]
    return ids, scores, unscored


def read_scores(confidence_path: str, by: str) -> dict[str, float]:
    """id -> confidence or variability from a confidence file; names the line of a bad row."""
    path = Path(confidence_path)
    if not path.exists():
        raise InputError(f"{path}: no such confidence file; make one with `sftmix dynamics`")
    scores: dict[str, float] = {}
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{line_number}: invalid JSON ({err.msg})") from err
        if not isinstance(row, dict):
            raise InputError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
        value = row.get(by)
        if value is None and by == "variability":
            raise InputError(f"{path}:{line_number}: no 'variability' (written before sftmix recorded it): re-run "
                             "`sftmix dynamics`")
        if "id" not in row or not isinstance(value, (int, float)) or math.isnan(value):
            raise InputError(f"{path}:{line_number}: needs 'id' and a numeric {by!r}, got {line[:200]!r}")
        if str(row["id"]) in scores:
            raise InputError(f"{path}:{line_number}: duplicate id {row['id']!r}")
        scores[str(row["id"])] = float(value)
    return scores


def choose(scores: dict[str, float], keep: str, count: int) -> list[str]:
    """The `count` ids with the highest (`top`) or lowest (`bottom`) score; ties broken by id."""
    sign = -1.0 if keep == "top" else 1.0
    return sorted(scores, key=lambda identifier: (sign * scores[identifier], identifier))[:count]


def select(config) -> dict[str, Any]:
    """Write the subset and its summary; returns the summary. `config` is a SelectConfig."""
    records, report = load_records(config.dataset_path or default_dataset_path(), config.dataset_split)
    if config.max_examples is not None:
        records = records[: config.max_examples]
    if not records:
        raise DataError(f"{config.dataset_path}: no records")
    ids, scores, unscored = record_scores(records, config.by, config.confidence_path)
    if unscored:
        logger.warning("%d of %d records have no %s in %s (dropped by `sftmix dynamics`, e.g. no assistant reply "
                       "or nothing left after truncation); they cannot be selected", len(unscored), len(ids),
                       config.by, config.confidence_path)
    count = config.k if config.k is not None else round(config.fraction * len(scores))
    if count < 1:
        raise InputError(f"the selection is empty: {config.fraction} of {len(scores)} scored records rounds to 0")
    if count > len(scores):
        raise InputError(f"--k {count} is more than the {len(scores)} scored records")
    chosen = set(choose(scores, config.keep, count))
    subset = [_with_id(record.data, identifier) for record, identifier in zip(records, ids) if identifier in chosen]
    _write_records(Path(config.output), subset)
    kept = [scores[identifier] for identifier in chosen]
    summary = {
        "source": report.source, "output": str(config.output), "by": config.by, "keep": config.keep,
        "k": config.k, "fraction": config.fraction, "confidence_path": config.confidence_path,
        "records": len(ids), "scored": len(scores), "unscored": len(unscored), "unscored_ids": unscored[:20],
        "selected": len(subset), "selected_range": [min(kept), max(kept)],
        "all_range": [min(scores.values()), max(scores.values())],
        "selected_ids": [identifier for identifier in ids if identifier in chosen],
    }
    write_atomic(summary_path(config.output), json.dumps(summary, indent=2))
    return summary


def summary_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".selection.json")


def _with_id(data: dict[str, Any], identifier: str) -> dict[str, Any]:
    if data.get("id") not in (None, ""):
        return data
    return {"id": identifier, **data}


def _write_records(path: Path, rows: list[dict[str, Any]]) -> None:
    """JSONL or a JSON array by the output's suffix (SelectConfig checks it): both load back with `load_records`."""
    if path.suffix == ".jsonl":
        write_atomic(path, "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows))
    else:
        write_atomic(path, json.dumps(rows, ensure_ascii=False, indent=1, default=str))
