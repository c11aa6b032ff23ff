import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import make_conversations, make_tokenizer, write_jsonl
from test_trainer import make_config
from transformers import AutoModelForCausalLM

from sftmix import scoring
from sftmix.confidence import split_groups
from sftmix.config import DynamicsConfig
from sftmix.data import build_dataset
from sftmix.errors import InputError
from sftmix.recipes.dynamics import dynamics
from sftmix.recipes.train import train


def dynamics_config(tmp_path, model_dir, data_path, name="dyn", **overrides):
    settings = dict(
        output_dir=str(tmp_path / name), model_name_or_path=str(model_dir), dataset_path=str(data_path),
        per_device_train_batch_size=4, learning_rate=1e-3, use_cpu=True, num_train_epochs=2, seed=3,
        activation_checkpointing=False, disable_tqdm=True, max_length=64, scoring_batch_tokens=100,
    )
    settings.update(overrides)
    return DynamicsConfig(**settings)


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def independent_perplexity(model, tokenizer, example):
    """exp(mean CE over response tokens) of one unpadded example, from full logits."""
    input_ids = torch.tensor([example["input_ids"]])
    labels = torch.tensor(example["labels"])
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits[0, :-1]
    return math.exp(F.cross_entropy(logits, labels[1:], ignore_index=-100).item())


def test_writes_three_files_with_independently_checked_perplexities(tiny_model_dir, tiny_data, tokenizer, tmp_path):
    # save_total_limit (e.g. inherited from a run config) must not delete checkpoints before they are scored
    output_dir = dynamics(dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], save_total_limit=1))
    rows = read(output_dir / "confidence.jsonl")
    meta = json.loads((output_dir / "dynamics.json").read_text())
    assert (output_dir / "confidence.png").stat().st_size > 5000
    assert len(meta["checkpoints"]) == 4 and meta["dataset"]["fingerprint"]
    assert meta["summary"]["confident"]["count"] == meta["summary"]["unconfident"]["count"] == 8
    dataset, _ = build_dataset(tiny_data[0], tokenizer, max_length=64)
    for checkpoint_number, checkpoint in enumerate(meta["checkpoints"]):
        model = AutoModelForCausalLM.from_pretrained(checkpoint)
        for index in (0, 5, 11):
            expected = independent_perplexity(model, tokenizer, dataset[index])
            assert rows[index]["id"] == dataset[index]["id"]
            assert rows[index]["perplexities"][checkpoint_number] == pytest.approx(expected, rel=1e-4)
    for row in rows:
        assert row["confidence"] == pytest.approx(-sum(row["perplexities"]) / 4)
        mean = sum(row["perplexities"]) / 4  # variability: population std over the 4 checkpoints
        assert row["variability"] == pytest.approx((sum((p - mean) ** 2 for p in row["perplexities"]) / 4) ** 0.5)
        assert row["num_tokens"] == sum(label != -100 for label in dataset[rows.index(row)]["labels"][1:])
    variability = sorted(row["variability"] for row in rows if row["group"] == "unconfident")
    median = (variability[3] + variability[4]) / 2
    assert meta["summary"]["variability"]["unconfident"]["median"] == pytest.approx(median)
    assert (output_dir / "data_map.png").stat().st_size > 5000
    confident = [row["confidence"] for row in rows if row["group"] == "confident"]
    unconfident = [row["confidence"] for row in rows if row["group"] == "unconfident"]
    assert min(confident) >= max(unconfident)
    # checkpoints are evenly spaced over the 8-step run
    assert [c.rsplit("-", 1)[1] for c in meta["checkpoints"]] == ["2", "4", "6", "8"]


def test_split_ties_and_odd_counts_are_deterministic():
    ids = ["d", "b", "c", "a", "e"]
    groups = split_groups(ids, [1.0, 1.0, 0.0, 1.0, -1.0])
    # two confident of five (floor); among the three tied at 1.0, ids a and b win
    assert groups == ["unconfident", "confident", "unconfident", "confident", "unconfident"]
    assert split_groups(ids, [1.0, 1.0, 0.0, 1.0, -1.0], split_ratio=0.8).count("confident") == 4


def test_length_batches_cover_everything_within_budget():
    lengths = [5, 30, 12, 12, 7, 50, 3]
    batches = scoring.length_batches(lengths, max_tokens=40)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 40
    assert batches[0] == [5]  # longest first, alone


def test_deterministic_and_resumes_after_kill(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    straight = dynamics(dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], name="straight"))
    calls, kill = [], {"at_call": 2}
    real_score = scoring.score_model

    def dies_on_second_checkpoint(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        if len(calls) == kill["at_call"]:
            raise KeyboardInterrupt("simulated kill")
        return real_score(*args, **kwargs)

    monkeypatch.setattr(scoring, "score_model", dies_on_second_checkpoint)
    config = dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], name="killed")
    with pytest.raises(KeyboardInterrupt):
        dynamics(config)
    assert not (tmp_path / "killed" / "confidence.jsonl").exists()
    assert len(list((tmp_path / "killed" / "scores").glob("*.json"))) == 1
    calls.clear()
    kill["at_call"] = None
    dynamics(config)
    assert calls == ["Scoring checkpoint-4", "Scoring checkpoint-6", "Scoring checkpoint-8"]  # first one reused
    assert (tmp_path / "killed" / "confidence.jsonl").read_text() == (straight / "confidence.jsonl").read_text()


def test_scoring_batch_tokens_bounds_every_scoring_forward(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    """--scoring_batch_tokens is the padded-token budget of each scoring forward, in `sftmix dynamics` and in
    `sftmix eval` (a longer example alone may exceed it); a larger budget makes fewer, fuller batches."""
    from sftmix.config import EvalConfig
    from sftmix.recipes.evaluate import evaluate

    shapes, real = [], scoring._batch_nll
    monkeypatch.setattr(scoring, "_batch_nll", lambda model, batch, linear: shapes.append(batch["input_ids"].shape)
                        or real(model, batch, linear))

    def forwards(run, budget):
        shapes.clear()
        run(budget)
        assert shapes and all(rows == 1 or rows * width <= budget for rows, width in shapes), (budget, shapes)
        return len(shapes)

    def dynamics_with(budget):
        dynamics(dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], name=f"d{budget}",
                                 checkpoints=[str(tiny_model_dir)], scoring_batch_tokens=budget))

    def eval_with(budget):
        evaluate(EvalConfig(model=str(tiny_model_dir), dataset=[str(tiny_data[0])], max_length=64, use_cpu=True,
                            scoring_batch_tokens=budget, output_dir=str(tmp_path / f"e{budget}")))

    for run in (dynamics_with, eval_with):
        assert forwards(run, 100) > forwards(run, 100_000) == 1


def test_existing_checkpoints_are_scored_without_training(tiny_model_dir, tiny_data, tmp_path):
    config = dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], checkpoints=[str(tiny_model_dir)] * 2)
    output_dir = dynamics(config)
    assert not (output_dir / "reference").exists()
    rows = read(output_dir / "confidence.jsonl")
    assert all(row["perplexities"][0] == row["perplexities"][1] for row in rows)


def test_weak_to_strong_split_transfers_across_tokenizers(tiny_model_dir, tiny_data, tmp_path):
    """The split of a small reference model (one tokenizer) trains a target with another tokenizer."""
    split = dynamics(dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], num_train_epochs=1))
    from transformers import LlamaConfig, LlamaForCausalLM

    other_tokenizer = make_tokenizer(vocab_size=400, seed=9)
    target_dir = tmp_path / "target"
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(other_tokenizer), hidden_size=24, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, pad_token_id=other_tokenizer.pad_token_id,
    )).save_pretrained(target_dir)
    other_tokenizer.save_pretrained(target_dir)
    assert len(other_tokenizer) != 300
    config = make_config(tmp_path, output_dir=str(tmp_path / "strong"), model_name_or_path=str(target_dir),
                         dataset_path=str(tiny_data[0]), confidence_path=str(split / "confidence.jsonl"),
                         max_steps=2, max_length=64)
    assert (train(config) / "model.safetensors").exists()


def test_changed_dataset_is_refused(tiny_model_dir, tiny_data, tmp_path):
    split = dynamics(dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], num_train_epochs=1))
    rows = make_conversations(16)
    rows[3]["output"] = "changed answer"  # same ids, other content
    changed = write_jsonl(tmp_path / "changed.jsonl", rows)
    config = make_config(tmp_path, model_name_or_path=str(tiny_model_dir), dataset_path=str(changed),
                         confidence_path=str(split / "confidence.jsonl"), max_length=64)
    with pytest.raises(ValueError, match=r"dataset changed since `sftmix dynamics`.*0 ids differ \(the same ids, "
                                         r"other content\)"):
        train(config)
    fewer = write_jsonl(tmp_path / "fewer.jsonl", make_conversations(14))
    config.dataset_path = str(fewer)
    with pytest.raises(ValueError, match="2 ids differ"):
        train(config)


def test_online_dynamics_records_every_example_each_epoch(tiny_model_dir, tiny_data, tmp_path):
    output_dir = dynamics(dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], online=True))
    meta = json.loads((output_dir / "dynamics.json").read_text())
    assert meta["online"] and meta["checkpoints"] == ["online-visit-1", "online-visit-2"]
    assert not (output_dir / "scores").exists()  # no scoring pass
    rows = read(output_dir / "confidence.jsonl")
    assert len(rows) == 16 and all(len(row["perplexities"]) == 2 for row in rows)
    # In epoch 1 the untrained model is barely better than uniform over the 300-token vocabulary.
    first_visit = [row["perplexities"][0] for row in rows]
    assert all(100 < value < 600 for value in first_visit)
    assert sum(row["group"] == "confident" for row in rows) == 8


def test_one_perplexity_per_example_makes_no_data_map(tiny_model_dir, tiny_data, tmp_path):
    output_dir = dynamics(dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], online=True, num_train_epochs=1))
    rows = read(output_dir / "confidence.jsonl")
    assert all(len(row["perplexities"]) == 1 and row["variability"] == 0 for row in rows)  # no spread to map
    assert (output_dir / "confidence.png").exists() and not (output_dir / "data_map.png").exists()


def test_online_dynamics_resume_after_kill(tiny_model_dir, tiny_data, tmp_path, caplog):
    import copy

    from test_trainer import CrashAfter

    straight = dynamics(dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], name="straight", online=True))
    config = dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], name="killed", online=True)
    with pytest.raises(KeyboardInterrupt):
        dynamics(config, callbacks=[CrashAfter(4)])  # killed after checkpoint-4, before its NLL records
    reference = tmp_path / "killed" / "reference"
    assert (reference / "checkpoint-4").exists() and not (reference / "checkpoint-4" / "online_nll.json").exists()
    assert (reference / "checkpoint-2" / "online_nll.json").exists()
    explicit = copy.deepcopy(config)
    explicit.resume_from_checkpoint = str(reference / "checkpoint-4")
    with pytest.raises(InputError, match=r"checkpoint-4: it holds no online_nll\.json"):
        dynamics(explicit)
    caplog.clear()
    dynamics(config)  # resumes from checkpoint-2, and says so
    resumes = [record.getMessage() for record in caplog.records if record.getMessage().startswith("Resuming from")]
    assert resumes == [f"Resuming from {reference / 'checkpoint-2'}"], resumes
    assert (tmp_path / "killed" / "confidence.jsonl").read_text() == (straight / "confidence.jsonl").read_text()
    with pytest.raises(ValueError, match="cannot use --checkpoints"):
        dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], online=True, checkpoints=[str(tiny_model_dir)])


def test_reference_run_keeps_only_its_checkpoints_and_only_their_weights(tiny_model_dir, tiny_data, tmp_path):
    """C = 4 over 8 steps with the user's save_steps 1: only checkpoints 2, 4, 6, 8; an older one loses its
    optimizer, scheduler and RNG states once a newer one is complete; a kill still resumes to the same split."""
    from test_trainer import CrashAfter

    resume_only = ("optimizer.pt", "scheduler.pt", "rng_state.pth")

    def config(name):
        return dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], name=name, save_strategy="steps",
                               save_steps=1)

    with pytest.raises(KeyboardInterrupt):
        dynamics(config("killed"), callbacks=[CrashAfter(6)])
    reference = tmp_path / "killed" / "reference"
    assert sorted(path.name for path in reference.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4",
                                                                            "checkpoint-6"]
    assert not any((reference / "checkpoint-2" / name).exists() for name in resume_only)
    assert all((reference / checkpoint / name).exists() for checkpoint in ("checkpoint-4", "checkpoint-6")
               for name in resume_only)  # checkpoint-4 would have been stripped after checkpoint-6: killed first
    killed = dynamics(config("killed"))  # resumes from checkpoint-6
    straight = dynamics(config("straight"))
    assert (killed / "confidence.jsonl").read_text() == (straight / "confidence.jsonl").read_text()
    for checkpoint in json.loads((killed / "dynamics.json").read_text())["checkpoints"]:
        assert (Path(checkpoint) / "model.safetensors").exists()  # what scoring read
        assert not any((Path(checkpoint) / name).exists() for name in resume_only)  # the last one too, once done


def test_a_stripped_checkpoint_keeps_what_loading_its_weights_needs(tmp_path):
    """Trainer, FSDP and DeepSpeed layouts: engine folders go only where plain weights are there to score."""
    from sftmix.files import strip_training_state

    layout = ["model.safetensors", "config.json", "tokenizer.json", "trainer_state.json", "optimizer.pt",
              "scheduler.pt", "rng_state_0.pth", "rng_state_1.pth", "latest", "optimizer_0/__0_0.distcp",
              "pytorch_model_fsdp_0/__0_0.distcp", "global_step8/zero_pp_rank_0_mp_rank_00_model_states.pt",
              "global_step8/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"]

    def checkpoint(name, files):
        for file in files:
            (tmp_path / name / file).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / file).write_text("x")
        strip_training_state(tmp_path / name)
        return sorted(str(path.relative_to(tmp_path / name)) for path in (tmp_path / name).rglob("*")
                      if path.is_file())

    assert checkpoint("full", layout) == ["config.json", "model.safetensors", "tokenizer.json", "trainer_state.json"]
    engine_only = [file for file in layout if file != "model.safetensors"]
    assert checkpoint("engine-only", engine_only) == [  # the shards are the weights: kept, optimizer states not
        "config.json", "global_step8/zero_pp_rank_0_mp_rank_00_model_states.pt", "latest",
        "pytorch_model_fsdp_0/__0_0.distcp", "tokenizer.json", "trainer_state.json"]
