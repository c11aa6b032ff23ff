"""`build_dataset`: records -> tokenised `datasets.Dataset` (id, input_ids, labels) + a DataReport of every drop,
cached under $SFTMIX_CACHE by the content of what determines it (`keys.tokenisation_key`)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from .. import keys
from ..errors import InputError
from ..files import atomic_directory, cache_error, cache_root
from .formats import example_id, messages_and_ids, record_tools
from .reading import DataError, DataReport, Record, default_dataset_path, load_records
from .tokenization import IGNORE_INDEX, TRUNCATION_MODES, tokenize_conversations

logger = logging.getLogger(__name__)


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


