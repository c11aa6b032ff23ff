"""Hostile-input battery, configuration: every numeric option is checked when the config is made.

That is at start-up, before any data or model is loaded, so a bad value costs nothing.
"""

import math

import pytest

from sftmix.config import DynamicsConfig, EvalConfig, RunConfig, SFTMixConfig
from sftmix.errors import InputError


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
    ("warmup_ratio", 1.5),
    ("lora_r", 0),
    ("max_steps", 0),
    ("num_train_epochs", 0.0),
    ("per_device_train_batch_size", 0),
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
