"""Hostile-input and fault battery, training: confidence files that do not match the data one to one,
diverging runs, missing models, and the numbers a resumed run reports."""

import json
import time
from pathlib import Path

import pytest
from conftest import model_variant, write_groups, write_jsonl
from test_dynamics import dynamics_config
from test_trainer import CrashAfter, make_config
from transformers import AutoModelForCausalLM, TrainerCallback

from sftmix.data import build_dataset
from sftmix.errors import InputError
from sftmix.recipes.dynamics import dynamics
from sftmix.recipes.train import train
from sftmix.trainer import SFTMixTrainer

# --------------------------------------------------------------------------- 15. confidence covering more examples


def test_confidence_ids_without_an_example_are_ignored_and_counted(tiny_model_dir, tiny_data, tmp_path):
    rows = [json.loads(line) for line in tiny_data[0].read_text().splitlines()]
    fewer = write_jsonl(tmp_path / "fewer.jsonl", rows[:14])  # the confidence file covers 16
    config = make_config(tmp_path, model_name_or_path=str(tiny_model_dir), dataset_path=str(fewer),
                         confidence_path=str(tiny_data[1]), max_length=64, max_steps=2)
    output_dir = train(config)
    assert json.loads((output_dir / "data_report.json").read_text())["unused_confidence_ids"] == 2


def test_examples_without_a_confidence_are_still_an_error(tiny_model_dir, tiny_data, tmp_path):
    groups = write_groups(tmp_path / "c.jsonl", [f"e{i}" for i in range(2, 16)])
    config = make_config(tmp_path, model_name_or_path=str(tiny_model_dir), dataset_path=str(tiny_data[0]),
                         confidence_path=str(groups), max_length=64)
    with pytest.raises(InputError, match=r"2 of 16 dataset ids have no confidence"):
        train(config)


def test_weak_to_strong_reference_with_longer_max_length_drops_fewer_examples(tiny_model_dir, tmp_path):
    """The reference keeps 12 examples (max_length 256), the target only 10 (max_length 24): accepted."""
    rows = [{"id": f"w{i}", "instruction": "tell me", "output": "blue sky " * (1 + i % 3)} for i in range(10)]
    rows += [{"id": f"long{i}", "instruction": " ".join(["why is the sky"] * 12), "output": "red"} for i in range(2)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    split = dynamics(dynamics_config(tmp_path, tiny_model_dir, data, max_length=256,
                                     checkpoints=[str(tiny_model_dir)]))
    assert len((split / "confidence.jsonl").read_text().splitlines()) == 12
    config = make_config(tmp_path, model_name_or_path=str(tiny_model_dir), dataset_path=str(data), max_length=24,
                         confidence_path=str(split / "confidence.jsonl"), max_steps=2)
    report = json.loads((train(config) / "data_report.json").read_text())
    assert report["num_examples"] == 10 and report["unused_confidence_ids"] == 2


# --------------------------------------------------------------------------- 6. NaN in training


def test_nan_loss_stops_training_naming_the_step_and_saves_nothing(tiny_model_dir, tiny_data, tmp_path):
    def nan_head(model):
        model.lm_head.weight.fill_(float("nan"))

    broken = model_variant(tiny_model_dir, tmp_path / "nan-model", nan_head)
    config = make_config(tmp_path, model_name_or_path=str(broken), dataset_path=str(tiny_data[0]),
                         confidence_path=str(tiny_data[1]), max_length=64)
    with pytest.raises(InputError, match=r"training diverged at step 1: the NTP loss is nan"):
        train(config)
    assert not (tmp_path / "out" / "model.safetensors").exists()


# --------------------------------------------------------------------------- 13. missing model


def test_missing_model_directory_names_the_path_not_the_hub(tiny_data, tmp_path):
    config = make_config(tmp_path, model_name_or_path=str(tmp_path / "models" / "mine"), loss_type="ntp",
                         dataset_path=str(tiny_data[0]))
    with pytest.raises(InputError, match=r"models/mine: no such directory") as error:
        train(config)
    assert "huggingface.co" not in str(error.value)


def test_directory_that_is_not_a_model_is_named(tiny_data, tmp_path):
    (tmp_path / "empty").mkdir()
    config = make_config(tmp_path, model_name_or_path=str(tmp_path / "empty"), loss_type="ntp",
                         dataset_path=str(tiny_data[0]))
    with pytest.raises(InputError, match=r"empty: the directory holds no config.json"):
        train(config)


# --------------------------------------------------------------------------- 16. reports after a resume


class SlowSteps(TrainerCallback):
    """Every optimisation step takes at least 0.5 s, so run times are far above noise."""

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(0.5)


def final_log(output_dir):
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry for entry in history if "train_runtime" in entry][-1]


def test_runtime_and_train_loss_after_a_resume_cover_the_whole_run(tiny_model_dir, tiny_data, tmp_path):
    def config(name):
        return make_config(tmp_path, output_dir=str(tmp_path / name), model_name_or_path=str(tiny_model_dir),
                           dataset_path=str(tiny_data[0]), confidence_path=str(tiny_data[1]), max_steps=6,
                           save_strategy="steps", save_steps=2, max_length=64)

    straight = final_log(train(config("straight"), callbacks=[SlowSteps()]))
    with pytest.raises(KeyboardInterrupt):
        train(config("crashed"), callbacks=[SlowSteps(), CrashAfter(4)])
    resumed = final_log(train(config("crashed"), callbacks=[SlowSteps()]))  # steps 5 and 6 only
    assert resumed["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-5)
    assert resumed["train_runtime"] >= 6 * 0.5  # the 2 steps after the resume alone take 1 s


# --------------------------------------------------------------------------- 4 / 5. checkpoints and max_steps


def resumable(tmp_path, tiny_model_dir, tiny_data, name):
    return make_config(tmp_path, output_dir=str(tmp_path / name), model_name_or_path=str(tiny_model_dir),
                       dataset_path=str(tiny_data[0]), confidence_path=str(tiny_data[1]), max_steps=6,
                       save_strategy="steps", save_steps=2, max_length=64)


def weights(output_dir):
    from safetensors.torch import load_file

    return load_file(output_dir / "model.safetensors")


def assert_same_weights(first, second):
    import torch

    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], msg=name)


def final_step(output_dir):
    return json.loads((output_dir / "trainer_state.json").read_text())["global_step"]


@pytest.fixture(scope="module")
def straight_run(tiny_model_dir, tiny_data, tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints every 2 steps): what every resumed run must equal."""
    tmp_path = tmp_path_factory.mktemp("straight")
    output_dir = train(resumable(tmp_path, tiny_model_dir, tiny_data, "straight"))
    return output_dir, weights(output_dir), final_log(output_dir)


@pytest.mark.parametrize("damage", ["no_trainer_state", "half_trainer_state"])
def test_kill_while_a_checkpoint_is_written_does_not_block_resume(straight_run, tiny_model_dir, tiny_data,
                                                                  tmp_path, damage):
    import shutil

    config = resumable(tmp_path, tiny_model_dir, tiny_data, "killed")
    with pytest.raises(KeyboardInterrupt):
        train(config, callbacks=[CrashAfter(4)])
    # the kill hit while checkpoint-6 was being written: weights cut short, trainer_state.json missing or cut short
    partial = tmp_path / "killed" / "checkpoint-6"
    shutil.copytree(tmp_path / "killed" / "checkpoint-4", partial)
    model_file = partial / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    state = partial / "trainer_state.json"
    state.unlink() if damage == "no_trainer_state" else state.write_text(state.read_text()[:100])
    output_dir = train(config)  # resumes from checkpoint-4, the newest complete one
    assert_same_weights(weights(output_dir), straight_run[1])
    assert final_step(output_dir) == 6


def test_rerunning_a_finished_train_trains_no_step_past_max_steps(straight_run, tiny_model_dir, tiny_data,
                                                                  tmp_path):
    config = resumable(tmp_path, tiny_model_dir, tiny_data, "done")
    first = weights(train(config))
    output_dir = train(config)  # the same command again: checkpoint-6 is the final step
    assert final_step(output_dir) == 6
    assert_same_weights(weights(output_dir), first)
    assert_same_weights(first, straight_run[1])


def test_kill_between_last_checkpoint_and_final_save_adds_no_step(straight_run, tiny_model_dir, tiny_data,
                                                                  tmp_path):
    config = resumable(tmp_path, tiny_model_dir, tiny_data, "killed")
    with pytest.raises(KeyboardInterrupt):
        train(config, callbacks=[CrashAfter(6)])  # checkpoint-6 written, the final model not
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    output_dir = train(config)
    assert final_step(output_dir) == 6
    assert_same_weights(weights(output_dir), straight_run[1])
    assert final_log(output_dir)["train_loss"] == pytest.approx(straight_run[2]["train_loss"], rel=1e-5)


def test_full_disk_while_a_checkpoint_is_written_is_one_clear_error_and_resumes(straight_run, tiny_model_dir,
                                                                                tiny_data, tmp_path, monkeypatch):
    """The disk fills while checkpoint-4's optimizer state is written; torch.save then says only "unexpected pos":
    one message naming the directory and the disk, and the same command, rerun, finishes as an uninterrupted run."""
    import shutil

    import torch

    real_save, real_usage = torch.save, shutil.disk_usage

    def save_until_full(obj, path, *args, **kwargs):
        if str(path).endswith("checkpoint-4/optimizer.pt"):
            Path(path).write_bytes(b"PK\x03\x04 cut short")  # what torch leaves behind
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real_save(obj, path, *args, **kwargs)

    def full_disk(path):
        return shutil._ntuple_diskusage(2**30, 2**30 - 2**19, 2**19)  # 0.5 MiB free

    config = resumable(tmp_path, tiny_model_dir, tiny_data, "full")
    with monkeypatch.context() as patched:
        patched.setattr(torch, "save", save_until_full)
        patched.setattr(shutil, "disk_usage", full_disk)
        with pytest.raises(InputError, match=r"full: the disk is full \(0\.5 MiB left on its disk\); free space "
                                             r"and rerun the same command"):
            train(config)
    assert shutil.disk_usage is real_usage
    assert not (tmp_path / "full" / "model.safetensors").exists()
    output_dir = train(config)  # space freed: resumes from checkpoint-2, the newest complete one
    assert final_step(output_dir) == 6
    assert_same_weights(weights(output_dir), straight_run[1])


# --------------------------------------------------------------------------- 17. checkpoints of another training


def test_checkpoints_of_a_training_with_other_settings_are_not_resumed(straight_run, tiny_model_dir, tiny_data,
                                                                       tmp_path):
    """A finished SFTMix run in `out`, then NTP into the same `out`: it used to resume at max_steps, train 0 steps
    and save the SFTMix weights as the NTP model, exit 0."""
    output_dir = straight_run[0]
    before = {path.name: path.stat().st_mtime_ns for path in output_dir.iterdir()}
    ntp = resumable(tmp_path, tiny_model_dir, tiny_data, "unused")
    ntp.output_dir, ntp.loss_type, ntp.confidence_path = str(output_dir), "ntp", None
    with pytest.raises(InputError, match=r"straight holds checkpoints of a training with other settings \(.*"
                                         r"loss_type: \"sftmix\" -> \"ntp\".*another --output_dir, or delete"):
        train(ntp)
    other_lr = resumable(tmp_path, tiny_model_dir, tiny_data, "unused")
    other_lr.output_dir, other_lr.learning_rate = str(output_dir), 5e-3
    with pytest.raises(InputError, match=r"learning_rate: 0.001 -> 0.005"):
        train(other_lr)
    assert {path.name: path.stat().st_mtime_ns for path in output_dir.iterdir()} == before  # nothing touched


def test_bookkeeping_settings_may_change_on_resume(straight_run, tiny_model_dir, tiny_data, tmp_path, caplog):
    config = resumable(tmp_path, tiny_model_dir, tiny_data, "killed")
    with pytest.raises(KeyboardInterrupt):
        train(config, callbacks=[CrashAfter(4)])
    changed = resumable(tmp_path, tiny_model_dir, tiny_data, "killed")
    changed.logging_steps, changed.save_steps, changed.report_to, changed.disable_tqdm = 3, 1, [], False
    output_dir = train(changed)
    assert f"Resuming from {tmp_path / 'killed' / 'checkpoint-4'}" in caplog.text
    assert_same_weights(weights(output_dir), straight_run[1])


# --------------------------------------------------------------------------- 18. the final evaluation


class KilledWhileEvaluating(TrainerCallback):
    def on_prediction_step(self, args, state, control, **kwargs):
        raise KeyboardInterrupt("simulated kill during the final evaluation")


def test_a_kill_during_the_final_evaluation_keeps_the_trained_model(straight_run, tiny_model_dir, tiny_data,
                                                                   tmp_path):
    config = resumable(tmp_path, tiny_model_dir, tiny_data, "killed")
    config.eval_dataset_path = str(tiny_data[0])  # evaluated once, after training (eval_strategy "no")
    with pytest.raises(KeyboardInterrupt):
        train(config, callbacks=[KilledWhileEvaluating()])
    assert_same_weights(weights(tmp_path / "killed"), straight_run[1])  # saved before the evaluation started


def test_nan_in_an_evaluation_is_named_as_the_evaluation(tiny_model_dir, tiny_data, tokenizer, tmp_path):
    def nan_head(model):
        model.lm_head.weight.fill_(float("nan"))

    model = AutoModelForCausalLM.from_pretrained(model_variant(tiny_model_dir, tmp_path / "nan-model", nan_head))
    dataset, _ = build_dataset(tiny_data[0], tokenizer, max_length=64)
    config = make_config(tmp_path, loss_type="ntp", eval_dataset_path=str(tiny_data[0]))
    trainer = SFTMixTrainer(model, args=config, train_dataset=dataset, eval_dataset=dataset, processing_class=tokenizer)
    with pytest.raises(InputError, match=r"evaluation at step 0 failed: the NTP loss on the evaluation set "
                                         r"\(.*data.jsonl\) is nan: the model overflows"):
        trainer.evaluate()


@pytest.mark.parametrize("damage", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_a_damaged_dynamics_json_beside_the_confidence_file_is_one_clear_error(damage, tiny_model_dir, tiny_data,
                                                                             tmp_path):
    folder = tmp_path / "dyn"
    folder.mkdir()
    confidence = folder / "confidence.jsonl"
    confidence.write_bytes(tiny_data[1].read_bytes())
    (folder / "dynamics.json").write_bytes(damage)
    config = make_config(tmp_path, model_name_or_path=str(tiny_model_dir), dataset_path=str(tiny_data[0]),
                         confidence_path=str(confidence), max_steps=1)
    with pytest.raises(InputError, match=r"dynamics.json: damaged .*re-run `sftmix dynamics`"):
        train(config)


def test_ctrl_c_is_one_line_and_the_rerun_resumes(tiny_model_dir, tiny_data, tmp_path, capsys, caplog, monkeypatch):
    from sftmix.cli import main

    calls = {"n": 0}
    real = SFTMixTrainer.compute_loss

    def interrupted_at_step_3(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SFTMixTrainer, "compute_loss", interrupted_at_step_3)
    argv = ["train", "--model_name_or_path", str(tiny_model_dir), "--dataset_path", str(tiny_data[0]),
            "--confidence_path", str(tiny_data[1]), "--output_dir", str(tmp_path / "out"), "--use_cpu", "true",
            "--per_device_train_batch_size", "4", "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "2"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted; run the same command again to resume" in err and "Traceback" not in err
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
    monkeypatch.setattr(SFTMixTrainer, "compute_loss", real)
    assert main(argv) == 0
    assert f"Resuming from {tmp_path / 'out' / 'checkpoint-2'}" in caplog.text


@pytest.mark.parametrize("damage", ["zeroed weights", "truncated optimizer"])
def test_a_damaged_checkpoint_is_named_and_an_older_one_resumed(straight_run, tiny_model_dir, tiny_data, tmp_path,
                                                                caplog, damage):
    """Weights zeroed after saving (the safetensors header intact) or an optimizer file cut short: found by the
    digest written when the checkpoint was whole, never resumed silently, never a raw traceback."""
    import copy
    import struct

    config = resumable(tmp_path, tiny_model_dir, tiny_data, "killed")
    with pytest.raises(KeyboardInterrupt):
        train(config, callbacks=[CrashAfter(4)])
    damaged = tmp_path / "killed" / "checkpoint-4"
    if damage == "zeroed weights":
        data = (damaged / "model.safetensors").read_bytes()
        header = 8 + struct.unpack("<Q", data[:8])[0]
        (damaged / "model.safetensors").write_bytes(data[:header] + bytes(len(data) - header))
    else:
        optimizer = damaged / "optimizer.pt"
        optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    explicit = copy.deepcopy(config)
    explicit.resume_from_checkpoint = str(damaged)
    with pytest.raises(InputError, match=r"--resume_from_checkpoint .*checkpoint-4: damaged \((model.safetensors "
                                         r"changed since it was written|optimizer.pt is \d+ bytes)"):
        train(explicit)
    output_dir = train(config)  # the same command: resumes from checkpoint-2
    assert "checkpoint-4 is damaged" in caplog.text and "Resuming from" in caplog.text
    assert "checkpoint-2" in [r.getMessage() for r in caplog.records if "Resuming from" in r.getMessage()][-1]
    assert_same_weights(weights(output_dir), straight_run[1])
