"""Hostile-input battery, training dynamics: diverged, mismatched or missing checkpoints, degenerate
splits. A confidence split is never made from NaN, and NaN is never written into a JSON file."""

import pytest
import torch
from conftest import model_variant
from test_dynamics import dynamics_config

from sftmix import dynamics as dyn
from sftmix.errors import InputError
from sftmix.pipeline import dynamics


def nan_head(model):
    model.lm_head.weight.fill_(float("nan"))


def huge_head(model):
    torch.manual_seed(0)
    model.lm_head.weight.copy_(torch.randn_like(model.lm_head.weight) * 1e5)


def test_nan_checkpoint_is_refused_naming_checkpoint_and_ids(tiny_model_dir, tiny_data, tmp_path):
    broken = model_variant(tiny_model_dir, tmp_path / "nan-ckpt", nan_head)
    config = dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], checkpoints=[str(tiny_model_dir), str(broken)])
    with pytest.raises(InputError, match=r"checkpoint .*nan-ckpt: the response NLL of 16 of 16 examples is NaN.*'e0'"):
        dynamics(config)
    assert not (tmp_path / "dyn" / "confidence.jsonl").exists()
    assert len(list((tmp_path / "dyn" / "scores").glob("*.json"))) == 1  # the good checkpoint's scores are kept
    assert "NaN" not in "".join(path.read_text() for path in (tmp_path / "dyn").rglob("*.json"))


def test_diverged_checkpoint_overflowing_perplexity_is_refused(tiny_model_dir, tiny_data, tmp_path):
    diverged = model_variant(tiny_model_dir, tmp_path / "huge-ckpt", huge_head)
    config = dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], checkpoints=[str(diverged)])
    with pytest.raises(InputError, match=r"huge-ckpt: .*too large for a perplexity"):
        dynamics(config)


def test_confidence_overflow_over_checkpoints_is_refused():
    scores = [dyn.CheckpointScores(f"c{k}", [709.0, 1.0], [1, 1]) for k in range(3)]  # each e^709, their sum inf
    with pytest.raises(InputError, match=r"overflows a float \(e\.g\. ids \['a'\]"):
        dyn.confidence_rows(["a", "b"], scores, 0.5)


def test_checkpoint_with_fewer_embeddings_than_tokens_is_refused(tiny_model_dir, tiny_data, tmp_path):
    small = model_variant(tiny_model_dir, tmp_path / "small-vocab", vocab_size=200)
    config = dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], checkpoints=[str(small)])
    with pytest.raises(InputError, match=r"small-vocab: the model has 200 token embeddings"):
        dynamics(config)


def test_missing_checkpoint_directory_is_named_before_any_work(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr("sftmix.pipeline.prepare", lambda config: pytest.fail("data prepared before the check"))
    config = dynamics_config(tmp_path, tiny_model_dir, tiny_data[0],
                             checkpoints=[str(tiny_model_dir), str(tmp_path / "ref" / "checkpoint-9")])
    with pytest.raises(InputError, match=r"--checkpoints .*ref/checkpoint-9: no such directory"):
        dynamics(config)


def test_split_ratio_leaving_a_group_empty_is_refused_before_training(tiny_model_dir, tiny_data, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr("sftmix.pipeline.build_trainer", lambda *a, **k: pytest.fail("training started"))
    config = dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], split_ratio=0.01)
    with pytest.raises(InputError, match=r"split_ratio 0.01 over 16 examples gives 0 confident and 16 unconfident"):
        dynamics(config)
