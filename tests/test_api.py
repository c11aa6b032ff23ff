"""The library: public imports, SFTMixTrainer used like SFTTrainer, and the core in a plain PyTorch loop."""

import json
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from conftest import WORDS, write_groups, write_jsonl

from sftmix import cli
from sftmix.config import SFTMixConfig
from sftmix.data import build_dataset
from sftmix.trainer import SFTMixTrainer

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_core_imports_neither_trl_nor_transformers():
    code = ("import sys, sftmix; from sftmix import BalancedBatchSampler, sftmix_loss, sample_lambda, mean_confidence; "
            "print(sorted(m for m in ('trl', 'transformers', 'datasets') if m in sys.modules)); import sftmix.data; "
            "print(sorted(m for m in ('trl', 'sftmix.cli') if m in sys.modules))")  # data: no TRL, and nothing
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)  # imports cli
    assert result.stdout.split() == ["[]", "[]"]
    from sftmix import SFTMixConfig as Config
    from sftmix import SFTMixTrainer as Trainer
    from sftmix import build_dataset as build
    from sftmix import read_groups  # noqa: F401

    assert (Config, Trainer, build) == (SFTMixConfig, SFTMixTrainer, build_dataset)


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    """Chat `messages` rows (a system prompt, two turns) and their confidence split."""
    import random

    rng = random.Random(7)
    words = lambda count: " ".join(rng.choices(WORDS, k=count))  # noqa: E731
    rows = [{"id": f"c{index}", "messages": [
        {"role": "system", "content": words(4)}, {"role": "user", "content": words(6)},
        {"role": "assistant", "content": words(rng.randint(3, 12))}, {"role": "user", "content": words(3)},
        {"role": "assistant", "content": words(rng.randint(2, 8))}]} for index in range(16)]
    directory = tmp_path_factory.mktemp("chat")
    return write_jsonl(directory / "chat.jsonl", rows), write_groups(directory / "confidence.jsonl",
                                                                      [row["id"] for row in rows])


def first_steps(history: list[dict]) -> list[tuple[float, float, float]]:
    return [(entry["loss"], entry["ntp_loss"], entry["mixup_loss"]) for entry in history if "ntp_loss" in entry]


def test_a_raw_dataset_through_the_api_trains_what_sftmix_train_trains(tiny_model_dir, chat_data, tmp_path):
    data, confidence = chat_data
    common = ["--per_device_train_batch_size", "4", "--max_steps", "2", "--learning_rate", "1e-3", "--logging_steps",
              "1", "--save_strategy", "no", "--use_cpu", "true", "--max_length", "48", "--disable_tqdm", "true"]
    assert cli.main(["train", "--model_name_or_path", str(tiny_model_dir), "--dataset_path", str(data),
                     "--confidence_path", str(confidence), "--output_dir", str(tmp_path / "cli"), *common]) == 0
    from_cli = json.loads((tmp_path / "cli" / "trainer_state.json").read_text())["log_history"]

    raw = datasets.load_dataset("json", data_files=str(data), split="train")  # what a TRL user has in hand
    args = SFTMixConfig(output_dir=str(tmp_path / "api"), confidence_path=str(confidence),
                        per_device_train_batch_size=4,
                        max_steps=2, learning_rate=1e-3, logging_steps=1, save_strategy="no", use_cpu=True,
                        max_length=48, disable_tqdm=True)
    trainer = SFTMixTrainer(model=str(tiny_model_dir), args=args, train_dataset=raw)
    labels = [label for row in trainer.train_dataset["labels"] for label in row]
    assert 0 < labels.count(-100) < len(labels)  # the prompts are masked, as the CLI masks them
    trainer.train()
    assert len(first_steps(from_cli)) == 2 and first_steps(trainer.state.log_history) == first_steps(from_cli)


def own_loop_example() -> str:
    section = README.read_text().split("## SFTMix in your own training loop", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_own_loop_runs_and_its_loss_is_the_trainers(tiny_model_dir, tiny_data, tmp_path):
    """The README's loop, with the tiny model, on 8 examples (one balanced batch of 4 + 4): its loss equals
    SFTMixTrainer's on the same batch, and its step changes the weights."""
    from transformers import AutoModelForCausalLM

    rows = [json.loads(line) for line in tiny_data[0].read_text().splitlines()]
    data = write_jsonl(tmp_path / "data.jsonl", rows[:8])
    confidence = write_groups(tmp_path / "confidence.jsonl", [f"e{index}" for index in range(8)])
    namespace = {"MODEL": str(tiny_model_dir), "DATA": str(data), "CONFIDENCE": str(confidence)}
    exec(compile(own_loop_example(), "README.md", "exec"), namespace)
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(namespace["model"].lm_head.weight, before.lm_head.weight)  # it trained

    args = SFTMixConfig(output_dir=str(tmp_path / "trainer"), confidence_path=str(confidence),
                        per_device_train_batch_size=8, use_cpu=True, seed=42, max_length=1024,
                        mixup_weight=0.2, mixup_alpha=0.5)
    trainer = SFTMixTrainer(model=before, args=args, train_dataset=namespace["dataset"])
    (batch,) = list(trainer.get_train_dataloader())
    own = namespace["batch"]
    assert torch.equal(batch["input_ids"][:, :own["input_ids"].size(1)], own["input_ids"])
    trainer.model.train()
    expected = trainer.compute_loss(trainer.model, batch)
    assert float(namespace["loss"].total) == pytest.approx(float(expected), rel=1e-5)


def test_what_the_api_cannot_read_is_one_clear_error(tiny_model_dir, chat_data, tmp_path):
    from sftmix.errors import InputError

    data, confidence = chat_data
    args = SFTMixConfig(output_dir=str(tmp_path / "o"), datasets=[{"path": str(data)}], loss_type="ntp", use_cpu=True)
    with pytest.raises(InputError, match="SFTMixTrainer reads args.dataset_path only"):
        SFTMixTrainer(model=str(tiny_model_dir), args=args)
    tokenised = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1, 1]]})
    with pytest.raises(InputError, match=r"a tokenised dataset needs the columns \['input_ids', 'labels'\]"):
        SFTMixTrainer(model=str(tiny_model_dir), args=SFTMixConfig(output_dir=str(tmp_path / "o"), loss_type="ntp",
                                                                   use_cpu=True), train_dataset=tokenised)


def test_a_raw_evaluation_set_is_tokenised_as_the_training_set(tiny_model_dir, chat_data, tmp_path):
    data, confidence = chat_data
    raw = datasets.load_dataset("json", data_files=str(data), split="train")
    args = SFTMixConfig(output_dir=str(tmp_path / "o"), confidence_path=str(confidence), use_cpu=True,
                        per_device_eval_batch_size=4, max_length=48)
    trainer = SFTMixTrainer(model=str(tiny_model_dir), args=args, train_dataset=raw)
    metrics = trainer.evaluate(raw.select(range(4)))  # raw rows: through sftmix's data path, not TRL's
    assert metrics["eval_loss"] > 0 and metrics["eval_ntp_loss"] == pytest.approx(metrics["eval_loss"])
