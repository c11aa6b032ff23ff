"""Every supported record format (Alpaca, chat `messages`, prompt/completion, ShareGPT `conversations`) to chat
messages, each example's id, and the sets evaluation reads (prompts to answer, sets to score)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import InputError
from .reading import DataError, Record, load_records
from .tokenization import supervised_turns

ROLE_ALIASES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant",
    "bard": "assistant", "model": "assistant",
    "system": "system",
    "tool": "tool", "function": "tool", "ipython": "tool",  # a tool's result (OpenAI, older OpenAI, Llama 3)
}

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
