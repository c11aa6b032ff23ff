"""Hostile-input battery, configuration: every numeric option is checked when the config is made.

That is at start-up, before any data or model is loaded, so a bad value costs nothing.
"""

import math

import pytest
from conftest import write_jsonl

from sftmix.config import DynamicsConfig, EvalConfig, RunConfig, SelectConfig, SFTMixConfig
from sftmix.errors import InputError
from sftmix.recipes.common import check_at_start
from sftmix.recipes.evaluate import evaluate
from sftmix.recipes.run import run


@pytest.mark.parametrize("field, value", [
    ("mixup_weight", -0.5),  # would maximise the Mixup loss
    ("mixup_weight", math.inf),
    ("max_length", -5),
    ("max_length", 0),
    ("max_examples", -1),
    ("max_examples", 0),
    ("mixup_alpha", math.nan),
    ("mixup_alpha", 0.0),
    ("learning_rate", math.nan),
    ("learning_rate", -1e-5),
    ("warmup_steps", -0.5),
    ("lora_r", 0),
    ("max_steps", 0),
    ("num_train_epochs", 0.0),
    ("per_device_train_batch_size", 0),
    ("lora_dropout", 1.0),  # drops every LoRA input
    ("lora_dropout", -0.1),
    ("test_split_size", -0.25),
    ("test_split_size", 2.5),  # neither a share nor a count of records
])
def test_train_refuses_out_of_range_numbers(field, value, tmp_path):
    with pytest.raises(InputError, match=rf"--{field} must be"):
        SFTMixConfig(output_dir=str(tmp_path), loss_type="ntp", **{field: value})


@pytest.mark.parametrize("field, value", [
    ("split_ratio", 0.0), ("split_ratio", 1.0), ("split_ratio", math.nan), ("num_checkpoints", 0),
    ("scoring_batch_tokens", 0),
])
def test_dynamics_refuses_out_of_range_numbers(field, value, tmp_path):
    with pytest.raises(InputError, match=rf"--{field} must be"):
        DynamicsConfig(output_dir=str(tmp_path), **{field: value})


@pytest.mark.parametrize("overrides, message", [
    ({"seeds": [42, 42]}, "--seeds must be distinct"),  # would report "± 0" over one model
    ({"seeds": []}, "--seeds must be distinct"),
    ({"eval_fraction": 1.0}, "--eval_fraction must be"),
    ({"num_generations": 0}, "--num_generations must be"),
    ({"max_new_tokens": -1}, "--max_new_tokens must be"),
    ({"dynamics_epochs": math.nan}, "--dynamics_epochs must be"),
    ({"eval_max_examples": -1}, "--eval_max_examples must be"),  # records[:-1] silently dropped the last
    ({"eval_max_examples": 0}, "--eval_max_examples must be"),
])
def test_run_refuses_bad_values(overrides, message, tmp_path):
    with pytest.raises(InputError, match=message):
        RunConfig(output_dir=str(tmp_path), **overrides)


@pytest.mark.parametrize("overrides, message", [
    ({"dataset": ["d.jsonl"], "max_length": -5}, "--max_length must be"),
    ({"dataset": ["d.jsonl"], "batch_size": 0}, "--batch_size must be"),
    ({"prompts": "p.jsonl", "num_generations": 0}, "--num_generations must be"),
    ({}, "nothing to evaluate"),
])
def test_eval_refuses_bad_values(overrides, message):
    with pytest.raises(InputError, match=message):
        EvalConfig(model="m", **overrides)


def test_valid_values_pass(tmp_path):
    config = RunConfig(output_dir=str(tmp_path), seeds=[1, 2], max_examples=10, mixup_weight=0.0, split_ratio=0.3)
    assert config.seeds == [1, 2] and config.mixup_weight == 0.0


@pytest.mark.parametrize("max_examples", [-1, 0])
def test_select_refuses_bad_max_examples(max_examples, tmp_path):
    with pytest.raises(InputError, match="--max_examples must be"):
        SelectConfig(output=str(tmp_path / "o.jsonl"), by="length", k=1, max_examples=max_examples)


# Evaluation inputs are read when the config is made: `sftmix run` stops before its reference run and trainings,
# not at its first evaluation, hours later.

def eval_inputs(tmp_path) -> dict[str, str]:
    """A good file of each kind, and bad ones."""
    good = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "name a cat", "output": "Tom"}])
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", \n')
    no_reply = write_jsonl(tmp_path / "no_reply.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    questions = write_jsonl(tmp_path / "questions.jsonl", [{"question_id": 1, "turns": []}])
    return {"good": str(good), "broken": str(broken), "no_reply": str(no_reply), "questions": str(questions),
            "missing": str(tmp_path / "missing.jsonl")}


@pytest.mark.parametrize("overrides, message", [
    ({"generation_prompts": "missing"}, r"--generation_prompts .*missing\.jsonl: no such file"),
    ({"eval_datasets": ["good", "missing"]}, r"--eval_datasets .*missing\.jsonl: no such file"),
    ({"eval_datasets": ["broken"]}, r"broken\.jsonl:2: invalid JSON"),
    ({"eval_datasets": ["no_reply"]}, r"no_reply\.jsonl: no example to score"),
    ({"generation_prompts": "broken"}, r"broken\.jsonl:2: invalid JSON"),
    ({"mt_bench_questions": "missing"}, r"--mt_bench_questions .*missing\.jsonl: no such file"),
    ({"mt_bench_questions": "questions"}, r"questions\.jsonl:1: 'turns' must be a non-empty list"),
])
def test_run_reads_its_evaluation_inputs_before_any_work(overrides, message, tmp_path):
    files = eval_inputs(tmp_path)
    resolved = {name: [files[v] for v in value] if isinstance(value, list) else files[value]
                for name, value in overrides.items()}
    config = RunConfig(output_dir=str(tmp_path / "run"), **resolved)  # the config itself reads no file
    with pytest.raises(InputError, match=message):
        run(config)
    assert not (tmp_path / "run").exists()


def test_eval_reads_its_inputs_at_its_start(tmp_path):
    files = eval_inputs(tmp_path)
    with pytest.raises(InputError, match=r"--prompts .*missing\.jsonl: no such file"):
        evaluate(EvalConfig(model="m", prompts=files["missing"], output_dir=str(tmp_path / "eval")))
    with pytest.raises(InputError, match=r"--dataset .*missing\.jsonl: no such file"):
        evaluate(EvalConfig(model="m", dataset=[files["good"], files["missing"]], output_dir=str(tmp_path / "eval")))
    with pytest.raises(InputError, match=r"--confidence_dataset .*missing\.jsonl: no such file"):
        evaluate(EvalConfig(model="m", confidence_dataset=files["missing"], output_dir=str(tmp_path / "eval")))
    with pytest.raises(InputError, match=r"broken\.jsonl:2: invalid JSON"):
        evaluate(EvalConfig(model="m", dataset=[files["broken"]], output_dir=str(tmp_path / "eval")))
    assert not (tmp_path / "eval").exists()
    config = EvalConfig(model="m", dataset=[files["good"]], prompts=files["good"], alpaca_eval_scorer="off")
    check_at_start(config)
    assert config.dataset == [files["good"]] and not config.official_scorer
