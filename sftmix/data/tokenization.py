"""Tokenising chat messages with any chat template: input_ids and labels (-100 outside assistant turns), cut to
max_length.

Only assistant turns are supervised, each up to and including its end-of-turn token: see
the "tokenising" section for how any chat template is handled ({% generation %} markers,
prefix-preserving templates, and templates such as Qwen3's that are not), and
"truncation" for how long conversations are cut without losing their supervision.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from .reading import DataError

IGNORE_INDEX = -100  # label of an unsupervised token (as in losses.py, which this module does not import)

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
             if not (marked or _has_tools(messages, tools))]
    not_prefix_preserving = set()  # the general path need not render these again to find it out
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
                elif layout is None:
                    not_prefix_preserving.add(position)
                else:
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
                results[position] = _tokenize_one(messages, tokenizer, max_length, truncation, tools,
                                                  try_prefix=position not in not_prefix_preserving)
            except (TemplateError, TemplateMismatch) as err:
                results[position] = err
    return results


RENDER_SLICE = 64  # conversations rendered, then encoded, together


def _through_last_turn(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    turns = supervised_turns(messages)
    return messages[: turns[-1] + 1] if turns else messages  # a trailing user turn teaches nothing


def _tokenize_one(messages, tokenizer, max_length, truncation, tools, try_prefix: bool = True) -> dict[str, Any]:
    """One conversation by the general path: any template, tool calls, generation markers. `try_prefix` False:
    the template is known not to be prefix-preserving for the whole conversation (see `encode_conversation`)."""
    if _has_tools(messages, tools):
        tokenizer = _WithTools(tokenizer, tools)
        _check_calls_rendered(messages, tokenizer)
    messages = _through_last_turn(messages)
    input_ids, labels = encode_conversation(messages, tokenizer, try_prefix)
    return _within(input_ids, labels, max_length, truncation, lambda: _fit_turns(messages, tokenizer, max_length))


def _has_tools(messages, tools) -> bool:
    return bool(tools) or any(message.get("tool_calls") for message in messages)


def _truncate(messages, layout, input_ids, labels, offsets, splitting, tokenizer, max_length,
              truncation) -> dict[str, Any]:
    """`_tokenize_one`'s truncation on a conversation already encoded whole: its turn cuts are read off that
    encoding where they can be (`_read_off_cuts`)."""
    def fit_turns():
        read_off = _read_off_cuts(layout, input_ids, offsets, splitting)
        return _fit_turns(messages, tokenizer, max_length, whole=(input_ids, labels), read_off=read_off)

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


def encode_conversation(messages: list[dict[str, str]], tokenizer: Any,
                        try_prefix: bool = True) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of the whole conversation, by the first of the three ways that applies (`try_prefix`
    False: the second, one rendering, is known not to)."""
    if GENERATION_MARKER.search(tokenizer.get_chat_template()):
        return _encode_generation_marked(messages, tokenizer)
    pieces = (try_prefix and _prefix_pieces(messages, tokenizer)) or _turn_by_turn_pieces(messages, tokenizer)
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
    start, special = 0, _special_tokens(tokenizer)
    for position, indices in enumerate(turns):
        messages, count = conversations[position], len(indices)
        own_befores, own_throughs = befores[start : start + count], throughs[start : start + count]
        start += count
        try:
            full = own_throughs[-1] if indices and indices[-1] == len(messages) - 1 else _render(messages, tokenizer)
        except (TemplateError, TemplateMismatch) as err:
            layouts[position] = err
            continue
        layouts[position] = _layout(full, own_befores, own_throughs, special)
    return layouts


def _layout(full: str, befores: list[str], throughs: list[str], special: list[str]) -> _Layout | None:
    spans = []
    for before, through in zip(befores, throughs):
        if not (full.startswith(before) and full.startswith(through)) or (spans and len(before) < spans[-1][1]):
            return None
        spans.append((len(before), len(before) + _turn_end(through[len(before):], special)))
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
    pieces, previous, tail, special = [], None, "", _special_tokens(tokenizer)
    for index in supervised_turns(messages):
        context, generated = _generation_split(messages, index, tokenizer)
        end = _turn_end(generated, special)
        between = context if previous is None else _text_between_turns(messages, previous, index, tokenizer, special)
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


def _text_between_turns(messages, previous: int, index: int, tokenizer, special: list[str]) -> str:
    """What the template renders between the end-of-turn of assistant turn `previous` and turn `index`'s
    generation (the user turns in between, separators, the generation prompt)."""
    marked = [dict(m) for m in messages]
    marked[previous]["content"] = SENTINEL
    _, generated = _generation_split(marked, previous, tokenizer)
    closing = generated[generated.find(SENTINEL) + len(SENTINEL) : _turn_end(generated, special)]
    context, _ = _generation_split(marked, index, tokenizer)
    after = context.find(SENTINEL) + len(SENTINEL)
    if SENTINEL not in generated or after < len(SENTINEL) or not context.startswith(closing, after):
        raise TemplateMismatch(
            f"the chat template renders assistant turn {previous} differently when it is generated and when it is "
            "context, so the turns cannot be aligned; give a template with {% generation %} markers "
            "(--chat_template_path)"
        )
    return context[after + len(closing):]


def _turn_end(generated: str, special: list[str]) -> int:
    """Length of a generated turn up to and including its last special token (its end-of-turn token; `special`:
    `_special_tokens`); the rest is the template's separator. All of it when the turn holds no special token."""
    ends = [generated.rfind(token) + len(token) for token in special if token in generated]
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


def _fit_turns(messages, tokenizer, max_length: int, whole: tuple[list[int], list[int]] | None = None,
               read_off: Callable[[int], int | None] | None = None) -> tuple[list[int], list[int], list[str]]:
    """Truncate by whole turns so that every kept response keeps its prompt and its end-of-turn token.

    1. Keep the longest run of turns from the start that fits (every later turn dropped; each kept
       response sees all the conversation before it).
    2. If the first exchange alone is too long, cut its prompt: drop any assistant context before
       the first user turn, keep the system message, cut the last user message from the left.
    3. If the response alone is still too long, the prompt keeps a quarter of max_length and the
       response is cut on the right.

    `whole`, `read_off`: the whole conversation's (input_ids, labels), and read_off(m), the number of its first
    tokens that the conversation cut after turn m encodes to, where that can be read off it (None: encode the cut).
    """
    turns = supervised_turns(messages)
    encoded = functools.cache(lambda m: encode_conversation(messages[: turns[m] + 1], tokenizer))
    kept = functools.cache(lambda m: read_off(m) if read_off is not None else None)
    best = _longest_fitting(len(turns), lambda m: len(encoded(m)[0]) if kept(m) is None else kept(m), max_length)
    if best < 0:  # not even the first exchange fits
        return _cut_first_prompt(messages[: turns[0] + 1], tokenizer, max_length)
    input_ids, labels = encoded(best) if kept(best) is None else (whole[0][: kept(best)], whole[1][: kept(best)])
    return input_ids, labels, ["later turns dropped"]


def _longest_fitting(count: int, length_of: Callable[[int], int], max_length: int) -> int:
    """The last supervised turn m (of `count`; the whole conversation is known not to fit) such that the
    conversation cut after it is at most max_length tokens long, by binary search over `length_of(m)`;
    -1 when none fits."""
    best, low, high = -1, 0, count - 2
    while low <= high:
        middle = (low + high) // 2
        length = length_of(middle)
        if length <= max_length:
            best, low = middle, middle + 1
        else:
            high = middle - 1
    return best


def _splitting_tokens(tokenizer) -> list[int]:
    """Ids of the special tokens the tokenizer splits the text at before anything else (no left-strip)."""
    return [token_id for token_id, token in tokenizer.added_tokens_decoder.items()
            if token.special and not token.lstrip]


def _read_off_cuts(layout: _Layout, input_ids, offsets, splitting: list[int]) -> Callable[[int], int | None]:
    """read_off(m) for `_fit_turns`: how many of the whole conversation's tokens the conversation cut after turn m
    encodes to, read off the whole encoding.

    The conversation up to turn m renders as the whole rendering's first `layout.ends[m]` characters. When the
    whole rendering goes on there with a `splitting` token, the tokenizer splits the text at that token before
    anything else, so the shorter conversation encodes as the whole encoding's first tokens. None when the cut
    is not at such a token: `_fit_turns` encodes it. `offsets`: as `_offsets_array` gives them.
    """
    import numpy as np

    at_splitting = np.isin(np.fromiter(input_ids, dtype=np.int64, count=len(input_ids)), splitting)

    def tokens_through(m: int) -> int | None:
        end = layout.ends[m]
        if max(layout.ends[: m + 1]) > end or layout.spans[m + 1][0] < end:
            return None
        at = np.flatnonzero((offsets[:, 0] == end) & at_splitting)
        if len(at) != 1 or (offsets[: at[0], 1] > end).any() or (offsets[at[0]:, 0] < end).any():
            return None
        return int(at[0])

    return tokens_through


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
