"""Offline fixtures: a tiny Llama with a byte-level BPE tokenizer and a ChatML template, built locally."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = "the a cat dog sat on mat red blue green one two three tell me about why how what is are sky sea".split()


def make_tokenizer(vocab_size: int = 300, seed: int = 0, specials=("<|im_start|>", "<|im_end|>"),
                   eos: str = "<|im_end|>", bos: str = "<|im_start|>", chat_template: str = CHATML):
    """A byte-level BPE trained on WORDS; `specials` become single special tokens (a model family's markers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", *specials],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [" ".join(random.Random(seed * 1000 + i).choices(WORDS, k=12)) for i in range(200)]
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token=eos, bos_token=bos)
    fast.chat_template = chat_template
    return fast


def make_conversations(count: int, seed: int = 0) -> list[dict]:
    """Alpaca-style rows with varied response lengths; ids e0, e1, ..."""
    rng = random.Random(seed)
    rows = []
    for index in range(count):
        rows.append({
            "id": f"e{index}",
            "instruction": " ".join(rng.choices(WORDS, k=rng.randint(3, 8))),
            "output": " ".join(rng.choices(WORDS, k=rng.randint(2, 20))),
        })
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_groups(path: Path, ids: list[str]) -> Path:
    """A confidence file: first half confident, confidence decreasing with index."""
    half = len(ids) // 2
    rows = [
        {"id": i, "confidence": -float(n), "group": "confident" if n < half else "unconfident"}
        for n, i in enumerate(ids)
    ]
    return write_jsonl(path, rows)


OPT_IN = ("slow", "gpu")  # markers whose tests run only when -m names them


def pytest_collection_modifyitems(config, items):
    """Leave out the opt-in tests unless `-m` asks for them, so `-m integration` / `-m "not integration"` pick a
    tier of the default suite."""
    wanted = config.getoption("markexpr") or ""
    kept, left_out = [], []
    for item in items:
        opt_in = [name for name in OPT_IN if item.get_closest_marker(name)]
        (left_out if any(name not in wanted for name in opt_in) else kept).append(item)
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = kept


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Tokenised-data and model caches go to a temporary folder, not the user's ~/.cache/sftmix.

    Subprocesses inherit the variable. Slow tests that need the embedded model convert it once more.
    """
    import os

    previous = os.environ.get("SFTMIX_CACHE")
    if previous is None:  # a cache chosen by the caller (e.g. with the converted default model) is kept
        os.environ["SFTMIX_CACHE"] = str(tmp_path_factory.mktemp("sftmix-cache"))
    yield
    if previous is None:
        os.environ.pop("SFTMIX_CACHE", None)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    directory = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> tuple[Path, Path]:
    """(dataset.jsonl, confidence.jsonl) with 16 examples split 8 / 8."""
    directory = tmp_path_factory.mktemp("tiny-data")
    rows = make_conversations(16)
    data = write_jsonl(directory / "data.jsonl", rows)
    groups = write_groups(directory / "confidence.jsonl", [row["id"] for row in rows])
    return data, groups


def model_variant(source_dir: Path, target_dir: Path, change=None, vocab_size: int | None = None) -> Path:
    """A copy of a saved model (with its tokenizer) whose weights `change(model)` altered in place, or with
    fewer token embeddings (`vocab_size`): the damaged checkpoints of the hostile-input battery."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source_dir)
    if vocab_size is not None:
        model.resize_token_embeddings(vocab_size)
    if change is not None:
        with torch.no_grad():
            change(model)
    model.save_pretrained(target_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(source_dir).save_pretrained(target_dir)
    return target_dir
