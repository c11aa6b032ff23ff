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
    default_dataset_path,
    example_id,
    load_records,
    messages_and_ids,
    read_confidence_field,
    supervised_turns,
)
from .errors import InputError
from .files import refuse_writing_over_inputs, write_atomic, write_jsonl

logger = logging.getLogger(__name__)


def response_length(messages: list[dict[str, str]]) -> int:
    """Characters of the supervised assistant turns (tokenizer-free, so any model's subset is the same)."""
    return sum(len(messages[index]["content"]) for index in supervised_turns(messages))


def record_scores(records, by: str,
                  confidence_path: str | None) -> tuple[list[str | None], dict[str, float], list[str]]:
    """(example id of every record, score per scored id, ids of the records with no score) for `by`.

    The ids are build_dataset's (`data.messages_and_ids`), so they match confidence files. A record
    with no assistant reply is no example: its id is None, and it is unscored (named by its own id).
    """
    ids, lengths, no_reply = [], {}, []
    for record, (messages, identifier) in zip(records, messages_and_ids(records)):
        ids.append(identifier)
        if identifier is None:
            no_reply.append(example_id(record, messages))
        elif by == "length":  # the other scores come from the confidence file
            lengths[identifier] = float(response_length(messages))
    if by == "length":
        return ids, lengths, no_reply
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
    unscored = [identifier for identifier in ids if identifier is not None and identifier not in scores]
    return ids, scores, no_reply + unscored


def read_scores(confidence_path: str, by: str) -> dict[str, float]:
    """id -> confidence or variability from a confidence file; names the line of a bad row."""
    def problem(value: Any) -> str | None:
        if value is None and by == "variability":
            return "no 'variability' (written before sftmix recorded it): re-run `sftmix dynamics`"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"needs 'id' and a finite number {by!r}"
        return None

    return {identifier: float(value) for identifier, value in read_confidence_field(confidence_path, by,
                                                                                      problem).items()}


def choose(scores: dict[str, float], keep: str, count: int) -> list[str]:
    """The `count` ids with the highest (`top`) or lowest (`bottom`) score; ties broken by id."""
    sign = -1.0 if keep == "top" else 1.0
    return sorted(scores, key=lambda identifier: (sign * scores[identifier], identifier))[:count]


def select(config) -> dict[str, Any]:
    """Write the subset and its summary; returns the summary. `config` is a SelectConfig."""
    refuse_writing_over_inputs({"--output": config.output, "--output's summary": summary_path(config.output)},
                               {"--dataset_path": config.dataset_path, "--confidence_path": config.confidence_path})
    records, report = load_records(config.dataset_path or default_dataset_path(), config.dataset_split)
    if config.max_examples is not None:
        records = records[: config.max_examples]
    if not records:
        raise DataError(f"{config.dataset_path}: no records")
    ids, scores, unscored = record_scores(records, config.by, config.confidence_path)
    if unscored:
        source = f" in {config.confidence_path}" if config.by != "length" else ""
        logger.warning("%d of %d records have no %s%s (no assistant reply, or dropped by `sftmix dynamics`: nothing "
                       "left after truncation); they cannot be selected", len(unscored), len(ids), config.by, source)
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
        write_jsonl(path, rows, user_data=True)
    else:
        write_atomic(path, json.dumps(rows, ensure_ascii=False, indent=1, default=str))
