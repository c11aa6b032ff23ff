"""SFT data, top-down (one module each):

    reading.py       load_records(path) -> list[Record] (file/line kept for error messages); read_groups(path)
    formats.py       to_messages(record) -> [{"role", "content"}] (Alpaca, chat, prompt/completion, ShareGPT)
    tokenization.py  tokenize_conversation(...) -> input_ids + labels (-100 outside assistant turns), cut to max_length
    dataset.py       build_dataset(...) -> datasets.Dataset(id, input_ids, labels) + DataReport, cached
"""

from .dataset import build_dataset
from .formats import check_scored_set, example_id, load_prompts, messages_and_ids, to_messages
from .reading import (
    DataError,
    DataReport,
    DatasetSpec,
    Record,
    default_dataset_path,
    load_records,
    mix_records,
    read_confidence_field,
    read_groups,
    spec_records,
    write_records,
)
from .tokenization import supervised_turns, tokenize_conversation, tokenize_conversations

__all__ = [
    "DataError", "DataReport", "DatasetSpec", "Record", "build_dataset", "check_scored_set", "default_dataset_path",
    "example_id", "load_prompts", "load_records", "messages_and_ids", "mix_records",
    "read_confidence_field", "read_groups", "spec_records", "supervised_turns", "to_messages", "tokenize_conversation",
    "tokenize_conversations", "write_records",
]
