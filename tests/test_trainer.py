import json

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from sftmix import trainer as trainer_module
from sftmix.config import SFTMixConfig
from sftmix.data import build_dataset, read_groups
from sftmix.losses import mixed_positions, sftmix_loss_reference
from sftmix.recipes.train import train
from sftmix.sampler import BalancedBatchSampler
from sftmix.trainer import SFTMixTrainer


def make_config(tmp_path, **overrides) -> SFTMixConfig:
    settings = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
        learning_rate=1e-3, use_cpu=True, save_strategy="no", seed=7, activation_checkpointing=False,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return SFTMixConfig(**settings)


def make_trainer(tiny_model_dir, tiny_data, tokenizer, tmp_path, **overrides):
    data_path, confidence_path = tiny_data
    dataset, _ = build_dataset(data_path, tokenizer, max_length=64)
    config = make_config(tmp_path, **overrides)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    groups = read_groups(confidence_path) if config.loss_type != "ntp" else None
    return SFTMixTrainer(model, args=config, train_dataset=dataset, processing_class=tokenizer, groups=groups)


def test_balanced_sampler_halves_and_epochs():
    confident, unconfident = list(range(10)), list(range(10, 16))
    sampler = BalancedBatchSampler(confident, unconfident, batch_size=4, seed=3)
    assert len(sampler) == 5  # ceil(max(10, 6) / 2)
    epoch0 = list(sampler)
    for batch in epoch0:
        assert len(batch) == 4
        assert all(i in confident for i in batch[:2]) and all(i in unconfident for i in batch[2:])
    assert sorted(i for batch in epoch0 for i in batch[:2]) == confident  # larger group: each once
    assert set(i for batch in epoch0 for i in batch[2:]) == set(unconfident)  # smaller group cycled
    assert list(sampler) == epoch0  # same epoch, same order
    sampler.set_epoch(1)
    assert list(sampler) != epoch0  # reshuffled every epoch
    sampler.set_epoch(0)
    assert list(sampler) == epoch0
    with pytest.raises(ValueError, match="even"):
        BalancedBatchSampler(confident, unconfident, batch_size=3)


def test_each_process_gets_whole_balanced_batches():
    from accelerate.data_loader import BatchSamplerShard

    sampler = BalancedBatchSampler(list(range(8)), list(range(8, 15)), batch_size=4, seed=0)
    per_rank = [list(BatchSamplerShard(sampler, num_processes=2, process_index=rank)) for rank in (0, 1)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    for batches in per_rank:
        for batch in batches:
            assert all(i < 8 for i in batch[:2]) and all(i >= 8 for i in batch[2:])
    assert per_rank[0] != per_rank[1]


def test_train_batches_are_balanced_and_paired(tiny_model_dir, tiny_data, tokenizer, tmp_path):
    trainer = make_trainer(tiny_model_dir, tiny_data, tokenizer, tmp_path)
    groups = read_groups(tiny_data[1])
    ids = trainer.train_dataset["id"]
    sampler = trainer.get_train_dataloader().batch_sampler
    for batch in sampler:
        assert [groups[ids[i]] for i in batch] == ["confident"] * 2 + ["unconfident"] * 2


def test_compute_loss_equals_independent_computation(tiny_model_dir, tiny_data, tokenizer, tmp_path, monkeypatch):
    trainer = make_trainer(tiny_model_dir, tiny_data, tokenizer, tmp_path)
    fixed_lambda = torch.tensor([0.3, 0.9])
    monkeypatch.setattr(trainer_module, "sample_lambda", lambda alpha, n, per, seed: fixed_lambda)
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model.train()
    loss = trainer.compute_loss(model, dict(batch))
    # Independent: hidden states from the model's own output, head applied by the reference loss.
    with torch.no_grad():
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    labels = batch["labels"]
    tokens = int((labels[:, 1:] != -100).sum())
    terms = sftmix_loss_reference(
        outputs.hidden_states[-1], labels, model.lm_head.weight, torch.tensor([[0, 2], [1, 3]]), fixed_lambda, 1.0, 1.0
    )
    expected = terms.ntp_sum / tokens + 0.2 * terms.mixup_sum / terms.mixup_count
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert trainer._metrics["train"]["ntp_loss"][-1] == pytest.approx((terms.ntp_sum / tokens).item(), rel=1e-5)
    # TRL's logs: top-1 accuracy and entropy over the supervised tokens, input tokens seen (padding excluded)
    logits = outputs.logits[:, :-1][labels[:, 1:] != -100].double()  # [N, V], from the model's own head
    targets = labels[:, 1:][labels[:, 1:] != -100]
    accuracy = (logits.argmax(-1) == targets).double().mean().item()
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean().item()
    assert trainer._metrics["train"]["mean_token_accuracy"][-1] == pytest.approx(accuracy)
    assert trainer._metrics["train"]["entropy"][-1] == pytest.approx(entropy, rel=1e-5)
    assert trainer._metrics["train"]["num_tokens"] == [int(batch["attention_mask"].sum())]


@pytest.mark.parametrize("loss_type, weights", [("ntp", (1.0, 0.0)), ("equal", (0.5, 0.5)), ("mixup_only", (0, 1))])
def test_loss_type_weights(loss_type, weights, tmp_path):
    assert make_config(tmp_path, loss_type=loss_type).loss_weights == weights


def test_training_logs_both_terms_and_gradient_accumulation(tiny_model_dir, tiny_data, tokenizer, tmp_path):
    trainer = make_trainer(tiny_model_dir, tiny_data, tokenizer, tmp_path, gradient_accumulation_steps=2)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "ntp_loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert entry["mixup_loss"] > 0 and 0 <= entry["mixup_lambda"] <= 1
        # the logged loss of one optimisation step is NTP + 0.2 * Mixup
        assert entry["loss"] == pytest.approx(entry["ntp_loss"] + 0.2 * entry["mixup_loss"], rel=1e-3)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_ntp_trainer_needs_no_confidence(tiny_model_dir, tiny_data, tokenizer, tmp_path):
    trainer = make_trainer(tiny_model_dir, tiny_data, tokenizer, tmp_path, loss_type="ntp", max_steps=2)
    trainer.train()
    assert all("mixup_loss" not in entry for entry in trainer.state.log_history)


def test_id_mismatch_is_a_clear_error(tiny_model_dir, tiny_data, tokenizer, tmp_path):
    data_path, _ = tiny_data
    dataset, _ = build_dataset(data_path, tokenizer)
    groups = {f"e{i}": "confident" if i < 8 else "unconfident" for i in range(2, 18)}
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match=r"2 of 16 dataset ids have no confidence.*2 of 16 confidence ids"):
        SFTMixTrainer(model, args=make_config(tmp_path), train_dataset=dataset, processing_class=tokenizer,
                      groups=groups)


def test_missing_confidence_says_how_to_make_it(tiny_model_dir, tiny_data, tmp_path):
    config = make_config(tmp_path, model_name_or_path=str(tiny_model_dir), dataset_path=str(tiny_data[0]))
    with pytest.raises(ValueError, match="sftmix dynamics"):
        train(config)


class CrashAfter(TrainerCallback):
    """Simulates a killed process right after the checkpoint of `step` is written."""

    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")


def test_resume_after_crash_matches_uninterrupted_run(tiny_model_dir, tiny_data, tmp_path):
    def config(name):
        return make_config(
            tmp_path, output_dir=str(tmp_path / name), model_name_or_path=str(tiny_model_dir),
            dataset_path=str(tiny_data[0]), confidence_path=str(tiny_data[1]), max_steps=6,
            save_strategy="steps", save_steps=2, max_length=64,
        )

    train(config("straight"))
    with pytest.raises(KeyboardInterrupt):
        train(config("crashed"), callbacks=[CrashAfter(4)])
    assert not (tmp_path / "crashed" / "model.safetensors").exists()
    train(config("crashed"))  # same command again: resumes from checkpoint-4
    straight = AutoModelForCausalLM.from_pretrained(tmp_path / "straight")
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "crashed")
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_lora_output_loads_as_full_model(tiny_model_dir, tiny_data, tmp_path):
    config = make_config(
        tmp_path, model_name_or_path=str(tiny_model_dir), dataset_path=str(tiny_data[0]),
        confidence_path=str(tiny_data[1]), use_peft=True, lora_r=4, lora_target_modules="q_proj,v_proj",
    )
    output_dir = train(config)
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert (output_dir / "adapter" / "adapter_config.json").exists()


def test_softcapped_head_falls_back_to_mixing_states():
    """With a non-linearity after the head, mixing logits != mixing states: the reference path must run."""
    from sftmix.forward import SFTMixRequest, _loss_terms

    torch.manual_seed(0)
    head = torch.nn.Linear(6, 11, bias=False)
    hidden = torch.randn(2, 7, 6)
    labels = torch.randint(0, 11, (2, 7))
    labels[:, :2] = -100
    request = SFTMixRequest(labels, torch.tensor([[0, 1]]), torch.tensor([0.3]), 0.1, 0.5, fused=True)
    softcap = 2.0
    terms = _loss_terms(hidden, head, request, linear_head=False, softcap=softcap)

    def capped(states):
        return torch.tanh(head(states) / softcap) * softcap

    expected = sftmix_loss_reference(hidden, labels, head.weight, request.pair_index, request.lam, 0.1, 0.5,
                                     head=capped)
    mixing_logits = sftmix_loss_reference(hidden, labels, head.weight, request.pair_index, request.lam, 0.1, 0.5)
    torch.testing.assert_close(terms.total, expected.total)
    assert abs(terms.total.item() - mixing_logits.total.item()) > 1e-3


def tiny_moe(kind: str, vocab_size: int):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    shared = dict(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, router_aux_loss_coef=0.5)
    if kind == "mixtral":
        return MixtralForCausalLM(MixtralConfig(**shared, intermediate_size=16, num_local_experts=4))
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(**shared, intermediate_size=16, moe_intermediate_size=8,
                                              shared_expert_intermediate_size=8, num_experts=4))


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_moe_router_aux_loss_is_kept(kind, tiny_data, tokenizer, tmp_path):
    """The patched forward calls the base model; the router load-balancing loss must still be added, weighted by
    router_aux_loss_coef, as the model's own forward does (independent: HF's loss with labels)."""
    dataset, _ = build_dataset(tiny_data[0], tokenizer, max_length=64)
    model = tiny_moe(kind, len(tokenizer))
    trainer = SFTMixTrainer(model, args=make_config(tmp_path, loss_type="ntp"), train_dataset=dataset,
                            processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model.train()
    torch.manual_seed(1)
    loss = trainer.compute_loss(model, dict(batch))
    torch.manual_seed(1)
    expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                     output_router_logits=True)
    assert expected.aux_loss > 0
    assert loss.item() == pytest.approx(expected.loss.item(), rel=1e-5)
    assert trainer._metrics["train"]["aux_loss"][-1] == pytest.approx(expected.aux_loss.item(), rel=1e-5)


def test_eval_dataset_is_evaluated_during_training(tiny_model_dir, tiny_data, tmp_path):
    """--eval_dataset_path (a JSON array here) with --eval_strategy steps: eval loss every eval_steps, equal to the
    token-mean NLL of the trained model on that set (independent: the model's own loss on one padded batch)."""
    from conftest import make_conversations

    rows = make_conversations(6, seed=9)
    (tmp_path / "eval.json").write_text(json.dumps(rows))
    config = make_config(
        tmp_path, model_name_or_path=str(tiny_model_dir), dataset_path=str(tiny_data[0]),
        confidence_path=str(tiny_data[1]), eval_dataset_path=str(tmp_path / "eval.json"), eval_strategy="steps",
        eval_steps=1, per_device_eval_batch_size=6, max_steps=2, max_length=64,
    )
    output_dir = train(config)
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    evals = [entry for entry in history if "eval_loss" in entry]
    assert [entry["step"] for entry in evals] == [1, 2]
    assert all(0 <= entry["eval_mean_token_accuracy"] <= 1 and entry["eval_entropy"] > 0 for entry in evals)
    assert "eval_mixup_loss" not in evals[0]  # evaluation is plain NTP
    from sftmix.model import load_tokenizer
    from sftmix.scoring import pad_batch

    tokenizer = load_tokenizer(str(output_dir))
    eval_set, _ = build_dataset(tmp_path / "eval.json", tokenizer, max_length=64)
    batch = pad_batch(eval_set, list(range(6)), tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(output_dir)(**batch).loss.item()
    assert evals[-1]["eval_loss"] == pytest.approx(expected, rel=1e-5)


def test_eval_strategy_without_eval_set_says_what_to_give(tiny_model_dir, tiny_data, tmp_path):
    from sftmix.errors import InputError

    config = make_config(tmp_path, model_name_or_path=str(tiny_model_dir), dataset_path=str(tiny_data[0]),
                         loss_type="ntp", eval_strategy="steps", eval_steps=1)
    with pytest.raises(InputError, match="--eval_dataset_path"):
        train(config)


# --------------------------------------------------------------------------- padding-free


@pytest.mark.parametrize("attention", ["sdpa", "eager", "varlen"])
def test_padding_free_sequences_do_not_attend_to_each_other(tiny_model_dir, attention):
    """Concatenated sequences with restarting position_ids (and TRL's cu_seq_lens): each one's states equal
    those it has alone, with transformers' block-causal mask (sdpa, eager) or sftmix's per-sequence SDPA."""
    from sftmix.model import register_varlen_attention

    implementation = register_varlen_attention() if attention == "varlen" else attention
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=implementation).eval()
    first, second = torch.randint(3, 200, (1, 7)), torch.randint(3, 200, (1, 5))
    packed = torch.cat([first, second], dim=1)
    boundaries = dict(position_ids=torch.cat([torch.arange(7), torch.arange(5)])[None], use_cache=False,
                      cu_seq_lens_q=torch.tensor([0, 7, 12], dtype=torch.int32))
    with torch.no_grad():  # no cache: as in training (a cache turns the packed-sequence mask off)
        together = model.model(input_ids=packed, **boundaries).last_hidden_state
        alone = [model.model(input_ids=ids, use_cache=False).last_hidden_state for ids in (first, second)]
        other_first = torch.cat([torch.randint(3, 200, (1, 7)), second], dim=1)
        changed = model.model(input_ids=other_first, **boundaries).last_hidden_state
    torch.testing.assert_close(together[:, :7], alone[0])
    torch.testing.assert_close(together[:, 7:], alone[1])
    torch.testing.assert_close(changed[:, 7:], together[:, 7:])  # the first sequence does not leak into the second
    padded = torch.cat([second, torch.zeros(1, 2, dtype=torch.long)], dim=1)  # a padded batch: plain SDPA + mask
    with torch.no_grad():
        masked = model.model(input_ids=padded, attention_mask=torch.tensor([[1] * 5 + [0] * 2]), use_cache=False)
    torch.testing.assert_close(masked.last_hidden_state[:, :5], alone[1])


def test_padding_free_loss_equals_padded_computation(tiny_model_dir, tiny_data, tokenizer, tmp_path, monkeypatch):
    """One padding-free micro-batch (B sequences in one row): pairs per sequence, Mixup aligned per sequence.
    Independent: the same examples padded, the model's own hidden states, the reference loss over rows."""
    from sftmix.scoring import pad_batch

    trainer = make_trainer(tiny_model_dir, tiny_data, tokenizer, tmp_path, padding_free=True)
    fixed_lambda = torch.tensor([0.3, 0.9])
    monkeypatch.setattr(trainer_module, "sample_lambda", lambda alpha, n, per, seed: fixed_lambda)
    indices = next(iter(trainer.get_train_dataloader().batch_sampler))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in indices])
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # really padding-free
    model = trainer.model.train()
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    packed_grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    padded = pad_batch(trainer.train_dataset, indices, tokenizer.pad_token_id, "cpu")
    outputs = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"], output_hidden_states=True)
    labels, pairs = padded["labels"], torch.tensor([[0, 2], [1, 3]])  # rows: confident first, as sampled
    tokens, mixed = int((labels[:, 1:] != -100).sum()), len(mixed_positions(labels[:, 1:], pairs, fixed_lambda).lam)
    expected = sftmix_loss_reference(outputs.hidden_states[-1], labels, model.lm_head.weight, pairs, fixed_lambda,
                                     1.0 / tokens, 0.2 / mixed).total
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(packed_grad, model.model.layers[0].self_attn.q_proj.weight.grad, rtol=1e-4, atol=1e-7)


def test_padding_free_training_logs_the_padded_step_losses(tiny_model_dir, tiny_data, tmp_path):
    """`sftmix train --padding_free true` (per-sequence SDPA) vs padded: three optimisation steps of 2 accumulated
    micro-batches log the same losses, and the saved model loads with the standard attention."""
    def logged(padding_free):
        config = make_config(tmp_path, output_dir=str(tmp_path / str(padding_free)), padding_free=padding_free,
                             gradient_accumulation_steps=2, model_name_or_path=str(tiny_model_dir),
                             dataset_path=str(tiny_data[0]), confidence_path=str(tiny_data[1]), max_length=64)
        history = json.loads((train(config) / "trainer_state.json").read_text())["log_history"]
        return [(e["loss"], e["ntp_loss"], e["mixup_loss"]) for e in history if "ntp_loss" in e]

    padded, packed = logged(False), logged(True)
    assert len(padded) == 3
    for padded_step, packed_step in zip(padded, packed):
        assert packed_step == pytest.approx(padded_step, rel=1e-4)
    assert "sftmix" not in (tmp_path / "True" / "config.json").read_text()
    AutoModelForCausalLM.from_pretrained(tmp_path / "True")


def test_packing_is_refused_with_the_alternative(tmp_path):
    from sftmix.errors import InputError

    with pytest.raises(InputError, match="--padding_free true"):
        make_config(tmp_path, packing=True)


def test_padding_free_online_nll_is_recorded_per_example(tiny_model_dir, tiny_data, tokenizer, tmp_path):
    """Online dynamics: each example's response NLL and token count, padding-free as padded."""
    def records(padding_free):
        dataset, _ = build_dataset(tiny_data[0], tokenizer, max_length=64)
        config = make_config(tmp_path / str(padding_free), loss_type="ntp", padding_free=padding_free, max_steps=2)
        trainer = SFTMixTrainer(AutoModelForCausalLM.from_pretrained(tiny_model_dir), args=config,
                                train_dataset=dataset, processing_class=tokenizer, record_nll=True)
        trainer.train()
        return trainer.online_nll

    padded, packed = records(False), records(True)
    assert sorted(packed) == sorted(padded) and len(padded) == 8  # 2 steps x 4 examples
    for example_id, visits in padded.items():
        (epoch, step, nll, count), = visits
        assert packed[example_id][0][:2] == (epoch, step) and packed[example_id][0][3] == count
        assert packed[example_id][0][2] == pytest.approx(nll, rel=1e-4)
