"""Hostile-input battery, training dynamics: diverged, mismatched or missing checkpoints, degenerate
splits. A confidence split is never made from NaN, and NaN is never written into a JSON file."""

import json

import pytest
import torch
from conftest import model_variant
from test_dynamics import dynamics_config

from sftmix import scoring
from sftmix.confidence import CheckpointScores, confidence_rows
from sftmix.errors import InputError
from sftmix.recipes.dynamics import dynamics


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
    written = "".join(path.read_text() for path in (tmp_path / "dyn").rglob("*.json"))
    assert "NaN" not in written and "Infinity" not in written


def test_diverged_checkpoint_overflowing_perplexity_is_refused(tiny_model_dir, tiny_data, tmp_path):
    diverged = model_variant(tiny_model_dir, tmp_path / "huge-ckpt", huge_head)
    config = dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], checkpoints=[str(diverged)])
    with pytest.raises(InputError, match=r"huge-ckpt: .*too large for a perplexity"):
        dynamics(config)


def test_confidence_overflow_over_checkpoints_is_refused():
    scores = [CheckpointScores(f"c{k}", [709.0, 1.0], [1, 1]) for k in range(3)]  # each e^709, their sum inf
    with pytest.raises(InputError, match=r"overflows a float \(e\.g\. ids \['a'\]"):
        confidence_rows(["a", "b"], scores, 0.5)


def test_checkpoint_with_fewer_embeddings_than_tokens_is_refused(tiny_model_dir, tiny_data, tmp_path):
    small = model_variant(tiny_model_dir, tmp_path / "small-vocab", vocab_size=200)
    config = dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], checkpoints=[str(small)])
    with pytest.raises(InputError, match=r"small-vocab: the model has 200 token embeddings"):
        dynamics(config)


def test_missing_checkpoint_directory_is_named_before_any_work(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr("sftmix.recipes.dynamics.prepare", lambda config: pytest.fail("data prepared before the check"))
    config = dynamics_config(tmp_path, tiny_model_dir, tiny_data[0],
                             checkpoints=[str(tiny_model_dir), str(tmp_path / "ref" / "checkpoint-9")])
    with pytest.raises(InputError, match=r"--checkpoints .*ref/checkpoint-9: no such directory"):
        dynamics(config)


def test_split_ratio_leaving_a_group_empty_is_refused_before_training(tiny_model_dir, tiny_data, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr("sftmix.recipes.dynamics.build_trainer", lambda *a, **k: pytest.fail("training started"))
    config = dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], split_ratio=0.01)
    with pytest.raises(InputError, match=r"split_ratio 0.01 over 16 examples gives 0 confident and 16 unconfident"):
        dynamics(config)


def test_a_model_no_device_can_hold_is_refused_before_training_naming_the_launch_that_can(tiny_model_dir, tiny_data,
                                                                                         tmp_path, monkeypatch):
    """Whole copies on every rank need the model to fit one device; outside ZeRO-3 nothing else can score it."""
    from sftmix.model import whole_copy_bytes

    monkeypatch.setattr("sftmix.recipes.dynamics.build_trainer", lambda *a, **k: pytest.fail("training started"))
    weights = whole_copy_bytes(str(tiny_model_dir), "float32")
    assert weights > 0  # counted from the safetensors headers
    monkeypatch.setattr("sftmix.recipes.dynamics.device_memory", lambda device: weights)  # > 80% of the device
    with pytest.raises(InputError, match=r"a whole copy of the model \(0\.0 GiB in float32\) does not fit one device "
                                         r".*configs/accelerate/zero3\.yaml"):
        dynamics(dynamics_config(tmp_path, tiny_model_dir, tiny_data[0]))
    monkeypatch.undo()
    monkeypatch.setattr("sftmix.recipes.dynamics.device_memory", lambda device: 2 * weights)  # fits: whole copies
    meta = json.loads((dynamics(dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], name="fits",
                                                num_checkpoints=1)) / "dynamics.json").read_text())
    assert meta["cost"]["scoring"]["sharded"] is False


def test_eval_counts_the_whole_copy_at_the_dtype_it_loads(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    """`sftmix eval --dtype`: the copy that must fit one device is counted at that dtype ("auto": as stored)."""
    from sftmix.config import EvalConfig
    from sftmix.model import whole_copy_bytes
    from sftmix.recipes.evaluate import evaluate

    stored = whole_copy_bytes(str(tiny_model_dir), "auto")
    assert stored == whole_copy_bytes(str(tiny_model_dir), "float32") == 2 * whole_copy_bytes(str(tiny_model_dir),
                                                                                              "bfloat16")
    monkeypatch.setattr("sftmix.recipes.dynamics.device_memory", lambda device: stored)  # bf16 fits, float32 not

    def evaluated(dtype):
        return evaluate(EvalConfig(model=str(tiny_model_dir), dataset=[str(tiny_data[0])], max_length=64,
                                   use_cpu=True, dtype=dtype, output_dir=str(tmp_path / dtype)))

    for dtype in ("float32", "auto"):
        with pytest.raises(InputError, match=rf"a whole copy of the model \(0\.0 GiB in {dtype}\) does not fit"):
            evaluated(dtype)
    assert evaluated("bfloat16")["cost"]["sharded"] is False


def test_one_example_is_refused_with_advice_that_can_be_followed(tiny_model_dir, tmp_path, monkeypatch):
    from conftest import make_conversations, write_jsonl

    monkeypatch.setattr("sftmix.recipes.dynamics.build_trainer", lambda *a, **k: pytest.fail("training started"))
    one = write_jsonl(tmp_path / "one.jsonl", make_conversations(1))
    with pytest.raises(InputError, match=r"the data has 1 usable example\(s\); the confidence split needs at least 2"):
        dynamics(dynamics_config(tmp_path, tiny_model_dir, one))


# --------------------------------------------------------------------------- 3. stale results


def read_text(path):
    return path.read_text() if path.exists() else None


def test_finished_split_made_with_other_settings_is_refused_not_reused(tiny_model_dir, tiny_data, tmp_path):
    config = dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], num_train_epochs=1, num_checkpoints=2)
    dynamics(config)
    before = (tmp_path / "dyn" / "confidence.jsonl").read_text()
    changed = dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], num_train_epochs=1, num_checkpoints=2,
                              learning_rate=5e-3)
    with pytest.raises(InputError, match=r"dyn holds a finished confidence split made with other settings "
                                         r"\(.*reference.learning_rate: 0.001 -> 0.005"):
        dynamics(changed)
    assert (tmp_path / "dyn" / "confidence.jsonl").read_text() == before
    dynamics(config)  # the same settings again: accepted, same result
    assert (tmp_path / "dyn" / "confidence.jsonl").read_text() == before


def test_unfinished_reference_run_with_other_settings_is_redone(tiny_model_dir, tiny_data, tmp_path, monkeypatch,
                                                                caplog):
    """Killed while scoring with C = 4; rerun with C = 2: the reference run is redone, not reused."""
    fresh = dynamics(dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], name="fresh", num_train_epochs=1,
                                     num_checkpoints=2))
    real_score = scoring.score_model

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(scoring, "score_model", killed)
    with pytest.raises(KeyboardInterrupt):
        dynamics(dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], num_train_epochs=1, num_checkpoints=4))
    monkeypatch.setattr(scoring, "score_model", real_score)
    dynamics(dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], num_train_epochs=1, num_checkpoints=2))
    assert (tmp_path / "dyn" / "confidence.jsonl").read_text() == (fresh / "confidence.jsonl").read_text()
    assert "num_checkpoints: 4 -> 2" in caplog.text and "redone" in caplog.text


def test_scores_of_another_checkpoint_in_a_folder_of_the_same_name_are_not_reused(tiny_model_dir, tiny_data,
                                                                                  tmp_path, caplog):
    import shutil

    checkpoint = tmp_path / "ckpts" / "checkpoint-100"
    shutil.copytree(tiny_model_dir, checkpoint)
    dynamics(dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], checkpoints=[str(checkpoint)]))
    for name in ("confidence.jsonl", "dynamics.json", "confidence.png"):  # killed after scoring, before the outputs
        (tmp_path / "dyn" / name).unlink()
    shutil.rmtree(checkpoint)

    def scaled_head(model):
        model.lm_head.weight.mul_(3.0)

    model_variant(tiny_model_dir, checkpoint, scaled_head)  # another model under the same folder name
    dynamics(dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], checkpoints=[str(checkpoint)]))
    expected = dynamics(dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], name="fresh",
                                        checkpoints=[str(checkpoint)]))
    assert (tmp_path / "dyn" / "confidence.jsonl").read_text() == (expected / "confidence.jsonl").read_text()
    assert "computed with other settings" in caplog.text and "rescored" in caplog.text


def test_reference_folder_sftmix_did_not_record_is_not_deleted(tiny_model_dir, tiny_data, tmp_path):
    mine = tmp_path / "dyn" / "reference"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"reference holds no record of the settings that made it"):
        dynamics(dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], num_train_epochs=1))
    assert (mine / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("change, named", [
    ({"truncation": "right"}, r"reference.truncation: \"turns\" -> \"right\""),  # same messages, other tokens
    ({"dtype": "bfloat16"}, r"reference.dtype: \"float32\" -> \"bfloat16\""),  # model loading (TRL's ModelConfig)
    ({"neftune_noise_alpha": 5.0}, r"reference.neftune_noise_alpha: null -> 5.0"),  # any training setting
    ({"num_checkpoints": 2}, r"reference.num_checkpoints: 1 -> 2"),
    ({"max_steps": 2}, r"reference.max_steps: -1 -> 2"),
])
def test_every_setting_of_the_reference_run_keys_its_split(tiny_model_dir, tiny_data, tmp_path, change, named):
    config = dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], num_train_epochs=1, num_checkpoints=1)
    dynamics(config)
    with pytest.raises(InputError, match=r"dyn holds a finished confidence split made with other settings \(.*"
                                         + named):
        dynamics(dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], **{"num_train_epochs": 1,
                                                                             "num_checkpoints": 1, **change}))
    # bookkeeping (logging, saving, reporting) is no setting of the result: the finished split is accepted
    dynamics(dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], num_train_epochs=1, num_checkpoints=1,
                             logging_steps=3, save_steps=7, report_to=[], scoring_batch_tokens=300))


def test_finished_split_of_another_base_model_is_refused(tiny_model_dir, tiny_data, tmp_path):
    """The same folder name, other weights (a model retrained in place): not the split's reference model."""
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = dynamics_config(tmp_path, model, tiny_data[0], num_train_epochs=1, num_checkpoints=1)
    dynamics(config)
    before = (tmp_path / "dyn" / "dynamics.json").read_text()
    weights = load_file(model / "model.safetensors")
    save_file({name: tensor + 0.01 for name, tensor in weights.items()}, model / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"other settings \(reference.model.model.safetensors: "):
        dynamics(config)
    assert (tmp_path / "dyn" / "dynamics.json").read_text() == before  # nothing names the new model


def test_truncation_keys_each_checkpoints_scores(tiny_model_dir, tiny_data, tmp_path, caplog):
    dynamics(dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], checkpoints=[str(tiny_model_dir)]))
    (tmp_path / "dyn" / "dynamics.json").unlink()  # as if killed before the outputs
    dynamics(dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], checkpoints=[str(tiny_model_dir)],
                             truncation="right"))
    assert "computed with other settings (truncation: \"turns\" -> \"right\")" in caplog.text


def test_more_checkpoints_than_steps_is_said(tiny_model_dir, tiny_data, tmp_path, caplog):
    output_dir = dynamics(dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], num_train_epochs=1,
                                          num_checkpoints=8))  # 16 examples / 4 = 4 steps
    assert "--num_checkpoints 8, but the reference run has 4 step(s): 4 checkpoint(s) are scored" in caplog.text
    assert len(__import__("json").loads((output_dir / "dynamics.json").read_text())["checkpoints"]) == 4


def test_checkpoints_without_a_model_are_tokenised_with_their_own_tokenizer(tiny_model_dir, tiny_data, tmp_path):
    """Not with the embedded default's (49,152 tokens): its ids would index past this model's 300 embeddings."""
    import json

    config = dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], checkpoints=[str(tiny_model_dir)])
    config.model_name_or_path = None
    output_dir = dynamics(config)
    assert json.loads((output_dir / "dynamics.json").read_text())["tokenizer"] == str(tiny_model_dir)


def test_reordered_data_keeps_its_confidence_split(tiny_model_dir, tiny_data, tmp_path):
    """The same records in another order are the same examples: each id keeps its group, training goes ahead."""
    from conftest import make_conversations, write_jsonl
    from test_trainer import make_config

    from sftmix.recipes.train import train

    split = dynamics(dynamics_config(tmp_path, tiny_model_dir, tiny_data[0], checkpoints=[str(tiny_model_dir)]))
    reordered = write_jsonl(tmp_path / "reordered.jsonl", make_conversations(16)[::-1])
    config = make_config(tmp_path, model_name_or_path=str(tiny_model_dir), dataset_path=str(reordered),
                         confidence_path=str(split / "confidence.jsonl"), max_length=64, max_steps=1)
    assert (train(config) / "model.safetensors").exists()
