"""The `sftmix` command as a user runs it: subprocesses, YAML config (accelerate launches: test_distributed.py)."""

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.integration  # launches, CLI subprocesses, end-to-end runs

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(args, cwd, check=True, timeout=600):
    result = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def sftmix(*args):
    return [sys.executable, "-m", "sftmix.cli", *args]


def tiny_flags(tiny_model_dir, tiny_data):
    return [
        "--model_name_or_path", str(tiny_model_dir), "--dataset_path", str(tiny_data[0]),
        "--confidence_path", str(tiny_data[1]), "--use_cpu", "true", "--per_device_train_batch_size", "4",
        "--logging_steps", "1", "--save_strategy", "no",
    ]


def test_train_command_saves_loadable_model_with_card(tiny_model_dir, tiny_data, tmp_path):
    result = run(sftmix("train", *tiny_flags(tiny_model_dir, tiny_data), "--output_dir", "out", "--max_steps", "3"),
                 cwd=tmp_path)
    log = result.stdout + result.stderr
    assert "'ntp_loss'" in log and "'mixup_loss'" in log
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.hidden_size == 16
    card = (tmp_path / "out" / "README.md").read_text()
    assert "SFTMix" in card and "2410.05248" in card and "`sftmix`" in card
    assert (tmp_path / "out" / "tokenizer_config.json").exists()


def test_yaml_config_with_flag_override(tiny_model_dir, tiny_data, tmp_path):
    (tmp_path / "run.yaml").write_text(
        f"model_name_or_path: {tiny_model_dir}\ndataset_path: {tiny_data[0]}\nloss_type: ntp\n"
        "max_steps: 2\nuse_cpu: true\noutput_dir: from_yaml\nsave_strategy: 'no'\nlogging_steps: 1\n"
    )
    result = run(sftmix("train", "--config", "run.yaml", "--output_dir", "from_flag"), cwd=tmp_path)
    assert (tmp_path / "from_flag" / "model.safetensors").exists()
    assert not (tmp_path / "from_yaml").exists()
    assert "mixup_loss" not in result.stdout + result.stderr


def test_sftmix_without_confidence_explains_next_step(tiny_model_dir, tiny_data, tmp_path):
    result = run(sftmix("train", "--model_name_or_path", str(tiny_model_dir), "--dataset_path", str(tiny_data[0]),
                        "--use_cpu", "true"), cwd=tmp_path, check=False)
    assert result.returncode != 0
    assert "needs --confidence_path" in result.stderr and "sftmix dynamics" in result.stderr


def test_eval_command_with_yaml(tiny_model_dir, tiny_data, tmp_path):
    (tmp_path / "eval.yaml").write_text(f"model: {tiny_model_dir}\ndataset: [{tiny_data[0]}]\nuse_cpu: true\n")
    result = run(sftmix("eval", "--config", "eval.yaml", "--output_dir", "ev", "--max_length", "64"), cwd=tmp_path)
    assert "Metrics: ev/metrics.json" in result.stdout
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["likelihood"]["data"]["num_examples"] == 16


def test_help_lists_commands(tmp_path):
    result = run(sftmix("--help"), cwd=tmp_path, check=False)
    for command in ("train", "dynamics", "run", "eval", "compare-splits"):
        assert command in result.stdout


@pytest.mark.slow
def test_embedded_default_ntp_five_steps(tmp_path):
    """SmolLM2-135M + ShareGPT from the pip packages; ~2 min on 2 CPU cores."""
    result = run(sftmix("train", "--loss_type", "ntp", "--max_steps", "5", "--max_examples", "200",
                        "--per_device_train_batch_size", "2", "--max_length", "256", "--output_dir", "out",
                        "--save_strategy", "no"), cwd=tmp_path, timeout=3600)
    assert "ShareGPT" in result.stderr
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.hidden_size == 576


@pytest.mark.slow
def test_embedded_default_dynamics_256_examples(tmp_path):
    """Issue check: `sftmix dynamics` on 256 ShareGPT examples finishes on CPU (~15 min on 2 cores)."""
    run(sftmix("dynamics", "--max_examples", "256", "--max_length", "512", "--gradient_checkpointing", "false",
               "--output_dir", "dyn"), cwd=tmp_path, timeout=3600)
    rows = (tmp_path / "dyn" / "confidence.jsonl").read_text().splitlines()
    assert len(rows) > 100 and (tmp_path / "dyn" / "confidence.png").exists()


@pytest.mark.slow
def test_quickstart_run(tmp_path):
    """Issue check: `sftmix run` with no arguments on the embedded default (~3 min on 2 cores)."""
    result = run(sftmix("run"), cwd=tmp_path, timeout=3600)
    assert "Report: runs/quickstart/report.md" in result.stdout
    assert "sftmix run [5/5] evaluate sftmix-seed42" in result.stderr  # each stage announced
    metrics = json.loads((tmp_path / "runs" / "quickstart" / "metrics.json").read_text())
    assert [row["variant"] for row in metrics["comparisons"]][:1] == ["sftmix"]  # SFTMix against NTP
    assert "SFTMix costs" in (tmp_path / "runs" / "quickstart" / "report.md").read_text()


def trl_sft_yaml(model_dir, dataset: str, extra: str = "") -> str:
    """A `trl sft` config as TRL's docs write them (ScriptArguments, ModelConfig and SFTConfig names)."""
    return (
        f"model_name_or_path: {model_dir}\nmodel_revision: main\ndtype: float32\nattn_implementation: eager\n"
        "model_init_kwargs:\n  low_cpu_mem_usage: true\n"
        f"{dataset}"
        "use_peft: true\nlora_r: 4\nlora_alpha: 8\nlora_dropout: 0.1\nlora_target_modules: [q_proj, v_proj]\n"
        "learning_rate: 1.0e-3\nmax_steps: 2\nper_device_train_batch_size: 4\nmax_length: 64\nlogging_steps: 1\n"
        "save_strategy: 'no'\nuse_cpu: true\nreport_to: none\noutput_dir: out\n"
        "packing: false\nassistant_only_loss: true\nignore_bias_buffers: false\n" + extra
    )


def test_trl_sft_yaml_with_a_local_dataset_directory(tiny_model_dir, tiny_data, tmp_path):
    """dataset_name as a `save_to_disk` directory with train/test splits; eval on dataset_test_split."""
    import datasets
    from conftest import make_conversations

    rows = make_conversations(16)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(make_conversations(4, seed=3))}).save_to_disk(
        tmp_path / "dataset")
    (tmp_path / "trl.yaml").write_text(trl_sft_yaml(
        tiny_model_dir, f"dataset_name: {tmp_path / 'dataset'}\ndataset_train_split: train\ndataset_test_split: test\n",
        "eval_strategy: steps\neval_steps: 1\n"))
    run(sftmix("train", "--config", "trl.yaml", "--confidence_path", str(tiny_data[1])), cwd=tmp_path)
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "eval_loss" in entry] == [1, 2]
    assert any("mixup_loss" in entry for entry in history)  # SFTMix with the YAML of a trl sft run
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").exists()
    adapter = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"] and adapter["lora_dropout"] == 0.1


def test_trl_sft_yaml_unknown_key_is_one_clear_line(tiny_model_dir, tmp_path):
    (tmp_path / "trl.yaml").write_text(trl_sft_yaml(tiny_model_dir, "dataset_name: x.jsonl\n", "not_an_option: 3\n"))
    result = run(sftmix("train", "--config", "trl.yaml"), cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "does not take: ['--not_an_option', '3']" in result.stderr and "Traceback" not in result.stderr
