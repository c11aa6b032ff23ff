"""Tokenisation benchmark: sftmix's `build_dataset` against a TRL-style pass and the tokenizer's own floor.

    python bench/tokenisation.py                       # 400 multi-turn + 400 single-turn ShareGPT conversations
    python bench/tokenisation.py --count 2000 --max_length 1024 --tokenizer path/to/model

The same conversations, the same tokenizer (the embedded SmolLM2-135M's unless --tokenizer), in one process:
    sftmix     build_dataset on a datasets.Dataset of the conversations (normalising, ids, masks of the
               answers, truncation by turns when --max_length is given; cache off)
    trl-style  what TRL's SFTTrainer does with assistant_only_loss: datasets.map of apply_chat_template(...,
               return_assistant_tokens_mask=True) with the template marked by {% generation %} blocks, then a
               labels column
    floor      every conversation rendered once by the template and encoded in one batched call with the
               character offsets (which map the answers to tokens): what any such tokenisation has to do
Each pass is timed `--repeats` times (the order rotated each round); the table shows the best time. It also
checks that sftmix's and the floor's token ids agree and how many conversations get the same supervised
tokens from sftmix and from TRL's masks (they differ where TRL supervises an answer before the first question).
"""

from __future__ import annotations

import argparse
import logging
import os
import time

# The smollm2 template with {% generation %} around each answer and its end-of-turn token: TRL's way of marking
# what to train on. It renders exactly what the model's own template renders.
MARKED_SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def conversations(records, count: int, multi_turn: bool) -> list[list[dict[str, str]]]:
    """The first `count` ShareGPT conversations with 4+ messages (multi-turn) or exactly one exchange."""
    from sftmix.data import messages_and_ids

    chosen = []
    for messages, identifier in messages_and_ids(records):
        if identifier and ((len(messages) >= 4) if multi_turn else (len(messages) == 2)):
            chosen.append(messages)
            if len(chosen) == count:
                break
    return chosen


def sftmix_pass(rows, tokenizer, max_length):
    import datasets

    from sftmix.data import build_dataset

    dataset, _ = build_dataset(datasets.Dataset.from_list(rows), tokenizer, max_length=max_length)
    return dataset


def trl_style_pass(rows, tokenizer, max_length):
    """TRL 1.16's SFTTrainer tokenize_fn for conversational data, with its labels step (see sft_trainer.py)."""
    import datasets

    def tokenize(example):
        out = tokenizer.apply_chat_template(example["messages"], return_dict=True,
                                            return_assistant_tokens_mask=True, chat_template=MARKED_SMOLLM2)
        return {"input_ids": out["input_ids"], "assistant_masks": out["assistant_masks"]}

    def labels(example):
        ids, mask = example["input_ids"], example["assistant_masks"]
        if max_length is not None:
            ids, mask = ids[:max_length], mask[:max_length]
        return {"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]}

    dataset = datasets.Dataset.from_list(rows).map(tokenize, remove_columns=["messages"])
    return dataset.map(labels, remove_columns=["assistant_masks"])


def floor_pass(rows, tokenizer, max_length):
    texts = tokenizer.apply_chat_template([row["messages"] for row in rows], tokenize=False)
    return tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False,
                     truncation=max_length is not None, max_length=max_length)


PASSES = {"sftmix": sftmix_pass, "trl-style": trl_style_pass, "floor": floor_pass}


def run(name: str, chosen, tokenizer, args) -> None:
    rows = [{"messages": messages} for messages in chosen]
    best: dict[str, float] = {}
    outputs = {}
    order = list(PASSES)
    for round_ in range(args.repeats):
        for pass_name in order[round_ % 3:] + order[: round_ % 3]:
            start = time.perf_counter()
            outputs[pass_name] = PASSES[pass_name](rows, tokenizer, args.max_length)
            best[pass_name] = min(best.get(pass_name, float("inf")), time.perf_counter() - start)
    tokens = sum(len(ids) for ids in outputs["floor"]["input_ids"])
    print(f"\n{name}: {len(rows)} conversations, {tokens:,} tokens, max_length {args.max_length}")
    print(f"  {'pass':<10} {'seconds':>8} {'x floor':>8} {'tokens/s':>11}")
    for pass_name in PASSES:
        print(f"  {pass_name:<10} {best[pass_name]:8.2f} {best[pass_name] / best['floor']:8.2f} "
              f"{tokens / best[pass_name]:11,.0f}")
    ours, trl = outputs["sftmix"], outputs["trl-style"]
    if args.max_length is None:
        same_ids = ours["input_ids"] == list(map(list, outputs["floor"]["input_ids"]))
        print(f"  sftmix's token ids equal the floor's: {same_ids}")
    same = sum(a == b for a, b in zip(ours["labels"], trl["labels"]))
    print(f"  same supervised tokens as TRL's masks: {same} of {len(rows)} conversations")
    print(f"  sftmix within 2x of the floor: {best['sftmix'] <= 2 * best['floor']}; "
          f"faster than trl-style: {best['sftmix'] < best['trl-style']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=400, help="conversations per set (default 400)")
    parser.add_argument("--max_length", type=int, default=None, help="truncate to this many tokens (default: none)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokenizer", default=None, help="a model folder (default: the embedded SmolLM2-135M)")
    args = parser.parse_args()
    os.environ["SFTMIX_NO_CACHE"] = "1"  # time the tokenisation, not a cache hit
    logging.disable(logging.WARNING)
    import datasets

    from sftmix.data import default_dataset_path, load_records
    from sftmix.model import load_tokenizer, resolve_model_path

    datasets.disable_progress_bars()
    tokenizer = load_tokenizer(resolve_model_path(args.tokenizer))
    print(f"tokenizer: {tokenizer.name_or_path} ({type(tokenizer).__name__}), {os.cpu_count()} CPUs")
    records, _ = load_records(default_dataset_path())  # read once for both sets
    for name, multi_turn in (("multi-turn (4+ messages)", True), ("single-turn (one exchange)", False)):
        chosen = conversations(records, args.count, multi_turn)
        marked = tokenizer.apply_chat_template(chosen[:50], tokenize=False, chat_template=MARKED_SMOLLM2)
        if marked != tokenizer.apply_chat_template(chosen[:50], tokenize=False):
            raise SystemExit("the marked template does not render as the tokenizer's own: give a SmolLM2 tokenizer")
        run(name, chosen, tokenizer, args)


if __name__ == "__main__":
    main()
