"""`sftmix run` end to end on the tiny model: outputs, stage skipping, kill-and-resume."""

import json

import pytest
from conftest import make_conversations, write_jsonl
from transformers import TrainerCallback

from sftmix.config import RunConfig
from sftmix.pipeline import run


def run_config(tmp_path, tiny_model_dir, data_path, name="run", **overrides):
    settings = dict(
        output_dir=str(tmp_path / name), model_name_or_path=str(tiny_model_dir), dataset_path=str(data_path),
        per_device_train_batch_size=4, learning_rate=1e-3, use_cpu=True, num_train_epochs=1, max_length=64,
        gradient_checkpointing=False, disable_tqdm=True, eval_fraction=0.2, num_generations=3, max_new_tokens=4,
        save_strategy="steps", save_steps=2, logging_steps=1, scoring_batch_tokens=200, seeds=[5],
    )
    settings.update(overrides)
    return RunConfig(**settings)


@pytest.fixture(scope="module")
def run_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("run-data") / "data.jsonl", make_conversations(30, seed=4))


class KillAt(TrainerCallback):
    """Kills the first training stage whose checkpoint for `step` has been written."""

    def __init__(self, step, output_dir_suffix):
        self.step, self.suffix = step, output_dir_suffix

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step and args.output_dir.endswith(self.suffix):
            raise KeyboardInterrupt("simulated kill")


def comparable(metrics):
    """metrics.json minus wall-clock numbers."""
    metrics = json.loads(json.dumps(metrics))
    for run_metrics in metrics["runs"].values():
        run_metrics.pop("train runtime (s)", None)
    metrics["table"] = [row for row in metrics["table"] if row["metric"] != "train runtime (s)"]
    return metrics


def test_run_writes_report_and_resumes_after_kill(tiny_model_dir, run_data, tmp_path):
    straight = run(run_config(tmp_path, tiny_model_dir, run_data, name="straight"))
    metrics = json.loads((straight / "metrics.json").read_text())
    report = (straight / "report.md").read_text()
    for png in ("loss_curves.png", "confidence.png"):
        assert (straight / png).stat().st_size > 5000
    assert metrics["data"] == {**metrics["data"], "train": 24, "heldout": 6}
    assert set(metrics["runs"]) == {"sftmix-seed5", "ntp-seed5"}
    rows = {row["metric"]: row for row in metrics["table"]}
    heldout = rows["heldout response NLL"]
    assert heldout["diff"] == pytest.approx(heldout["sftmix"] - heldout["ntp"])
    # the report's table shows the numbers of metrics.json
    row = f"| heldout response NLL | {heldout['sftmix']:.4g} | {heldout['ntp']:.4g} | {heldout['diff']:.4g} |"
    assert row in report
    assert "![loss curves](loss_curves.png)" in report and "Prompt 1." in report
    # the held-out examples were never trained on
    held_ids = {json.loads(line)["id"] for line in (straight / "data" / "heldout.jsonl").read_text().splitlines()}
    confidence_lines = (straight / "dynamics" / "confidence.jsonl").read_text().splitlines()
    trained_ids = {json.loads(line)["id"] for line in confidence_lines}
    assert held_ids and not held_ids & trained_ids
    # each training evaluates the held-out split (once at the end: eval_strategy is "no")
    history = json.loads((straight / "sftmix-seed5" / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "eval_loss" in entry] == [history[-1]["step"]]
    outputs = json.loads((straight / "eval" / "sftmix-seed5" / "model_outputs.json").read_text())
    assert len(outputs) == 3 and outputs[0]["generator"] == "sftmix-seed5"

    config = run_config(tmp_path, tiny_model_dir, run_data, name="killed")
    with pytest.raises(KeyboardInterrupt):
        run(config, callbacks=[KillAt(4, "sftmix-seed5")])
    killed = tmp_path / "killed"
    assert (killed / "dynamics" / "stage.json").exists()
    assert (killed / "sftmix-seed5" / "checkpoint-4").exists() and not (killed / "sftmix-seed5" / "stage.json").exists()
    run(config)  # the same command again
    assert comparable(json.loads((killed / "metrics.json").read_text())) == comparable(metrics)


def test_unchanged_stages_are_skipped_and_changed_ones_rerun(tiny_model_dir, run_data, tmp_path, caplog):
    config = run_config(tmp_path, tiny_model_dir, run_data, no_baseline=True)
    run(config)
    stamp = (tmp_path / "run" / "sftmix-seed5" / "model.safetensors").stat().st_mtime_ns
    caplog.clear()
    run(config)
    skipped = [r.getMessage() for r in caplog.records if "up to date" in r.getMessage()]
    assert len(skipped) == 4  # data, dynamics, sftmix training, eval
    assert (tmp_path / "run" / "sftmix-seed5" / "model.safetensors").stat().st_mtime_ns == stamp
    changed = run_config(tmp_path, tiny_model_dir, run_data, no_baseline=True, mixup_weight=0.5)
    caplog.clear()
    run(changed)
    skipped = [r.getMessage() for r in caplog.records if "up to date" in r.getMessage()]
    assert len(skipped) == 2  # data and dynamics do not depend on mu; training and eval rerun
    assert (tmp_path / "run" / "sftmix-seed5" / "model.safetensors").stat().st_mtime_ns != stamp
    report = (tmp_path / "run" / "report.md").read_text()
    assert "mu = 0.5" in report and "SFTMix - NTP" not in report


def test_several_seeds_report_mean_and_spread(tiny_model_dir, run_data, tmp_path):
    directory = run(run_config(tmp_path, tiny_model_dir, run_data, seeds=[1, 2], num_generations=1))
    metrics = json.loads((directory / "metrics.json").read_text())
    assert set(metrics["runs"]) == {"sftmix-seed1", "sftmix-seed2", "ntp-seed1", "ntp-seed2"}
    row = next(r for r in metrics["table"] if r["metric"] == "heldout response NLL")
    values = [metrics["runs"][f"sftmix-seed{s}"]["heldout response NLL"] for s in (1, 2)]
    assert row["sftmix"] == pytest.approx(sum(values) / 2)
    assert row["sftmix_std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    assert " ± " in (directory / "report.md").read_text()
