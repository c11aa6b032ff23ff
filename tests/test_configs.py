"""The shipped configs: the paper's GPU recipe and the CPU replication parse, and say what they claim."""

import os
import re
from pathlib import Path

import pytest
import yaml
from conftest import make_tokenizer, write_jsonl
from trl import TrlParser

from sftmix.config import VARIANTS, RunConfig
from sftmix.data import tokenize_conversation
from sftmix.errors import InputError
from sftmix.recipes.common import check_at_start

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ACCELERATE_CONFIGS = {"ddp", "fsdp2", "zero3", "zero3_offload"}  # configs/accelerate/*.yaml (issue 8)


def parse(path: Path, *overrides: str) -> RunConfig:
    """The config `sftmix run --config path` starts with, after its start-up checks (which read the files)."""
    (config,) = TrlParser((RunConfig,)).parse_args_and_config(["--config", str(path), *overrides])
    check_at_start(config)
    return config


@pytest.fixture
def cluster_inputs(tmp_path, monkeypatch):
    """What the paper configs read at start-up and the user supplies: AlpacaEval and MT-Bench files, the
    `alpaca_eval` command and a judge key (a stand-in script; nothing is scored here)."""
    alpaca_eval = write_jsonl(tmp_path / "alpaca_eval.jsonl", [{"instruction": "name a cat", "output": "Tom"}])
    questions = write_jsonl(tmp_path / "question.jsonl", [{"question_id": 81, "turns": ["a", "b"]}])
    command = tmp_path / "bin" / "alpaca_eval"
    command.parent.mkdir()
    command.write_text("#!/bin/sh\nexit 1\n")
    command.chmod(0o755)
    monkeypatch.setenv("PATH", f"{command.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("SFTMIX_JUDGE_API_KEY", "test-key")
    return ["--eval_datasets", str(alpaca_eval), "--generation_prompts", str(alpaca_eval),
            "--mt_bench_questions", str(questions)]


@pytest.mark.parametrize("name", ["llama-3.1-8b-alpaca", "mistral-7b-alpaca"])
def test_paper_recipe(name, cluster_inputs):
    path = CONFIGS / "paper" / f"{name}.yaml"
    header = path.read_text().splitlines()[0]
    command = re.fullmatch(r"# accelerate launch --config_file configs/accelerate/(\w+)\.yaml --num_processes 8 "
                           r"-m sftmix\.cli run --config (\S+)", header)
    assert command and command.group(1) in ACCELERATE_CONFIGS and command.group(2) == f"configs/paper/{name}.yaml"
    # The header's launch must start 8 processes: a multi-process engine on GPUs, never `use_cpu` (accelerate
    # then starts ONE); test_paper_recipe_launch_starts_eight_processes runs it and counts them.
    launch_config = yaml.safe_load((CONFIGS / "accelerate" / f"{command.group(1)}.yaml").read_text())
    assert launch_config["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED") and not launch_config["use_cpu"]
    with pytest.raises(InputError, match=r"--eval_datasets data/alpaca_eval/gpt4_1106_preview.json: no such file"):
        parse(path, "--bf16", "false")  # the AlpacaEval file is the user's to supply: refused at start-up without it
    config = parse(path, "--bf16", "false", *cluster_inputs)  # bf16 needs a GPU; everything else as on the cluster
    assert config.official_scorer  # alpaca_eval_scorer: "on", with the command and the key there
    # the paper: AdamW, lr 2e-6, cosine, warm-up 0.1, weight decay 0.1, 3 epochs, global batch 32 on 8 GPUs
    assert (config.learning_rate, config.lr_scheduler_type.value, config.warmup_steps, config.weight_decay) == (
        2e-6, "cosine", 0.1, 0.1)
    assert config.num_train_epochs == 3 and config.dynamics_epochs == 1
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps * 8 == 32
    assert (config.mixup_alpha, config.mixup_weight, config.variants) == (0.5, 0.2, ["ntp", "sftmix"])
    assert config.dataset_path == "tatsu-lab/alpaca" and "bf16: true" in path.read_text()
    text = path.read_text()
    expected = {"llama-3.1-8b-alpaca": ["4.36", "4.58", "8.65", "10.32", "8.29", "7.30"],
                "mistral-7b-alpaca": ["4.62", "4.91", "9.18", "9.50"]}[name]
    assert all(number in text.split("\n\n")[0] for number in expected)  # the paper's numbers in the header


@pytest.mark.integration
@pytest.mark.slow  # 8 processes: opt-in (-m slow) to keep the suite under 8 minutes on 2 cores
@pytest.mark.parametrize("name", ["llama-3.1-8b-alpaca", "mistral-7b-alpaca"])
def test_paper_recipe_launch_starts_eight_processes(name, tmp_path):
    """The header's `accelerate launch`, run here: 8 processes start, each in a world of 8 (`launch` counts them),
    and every rank stops at start-up at the same clear error (no AlpacaEval file beside it; bf16 off: no GPU)."""
    from test_distributed import launch

    path = CONFIGS / "paper" / f"{name}.yaml"
    engine = re.search(r"configs/accelerate/(\w+)\.yaml --num_processes (\d+) ", path.read_text().splitlines()[0])
    assert engine.group(2) == "8"
    result = launch(engine.group(1), ["run", "--config", str(path), "--bf16", "false"], tmp_path, check=False,
                    processes=8)
    assert result.returncode != 0
    assert "--eval_datasets data/alpaca_eval/gpt4_1106_preview.json: no such file" in result.stderr


def test_paper_prompt_template_supervises_the_response_and_its_end():
    tokenizer = make_tokenizer()  # a fresh one: the session's tokenizer keeps its ChatML template
    tokenizer.chat_template = (CONFIGS / "paper" / "alpaca.jinja").read_text()
    messages = [{"role": "user", "content": "tell me about the cat"}, {"role": "assistant", "content": "the cat sat"}]
    tokens = tokenize_conversation(messages, tokenizer, max_length=None)
    supervised = tokenizer.decode([t for t in tokens["labels"] if t != -100])
    assert supervised == "the cat sat" + tokenizer.eos_token
    prompt = tokenizer.decode([t for t, label in zip(tokens["input_ids"], tokens["labels"]) if label == -100])
    assert prompt.endswith("### Instruction:\ntell me about the cat\n\n### Response:\n")


def test_cpu_replication_config():
    path = CONFIGS / "replicate-cpu.yaml"
    assert path.read_text().splitlines()[0] == "# sftmix run --config configs/replicate-cpu.yaml"
    if not (CONFIGS.parents[1] / "shared" / "data" / "alpaca_eval").is_dir():  # read at start-up
        pytest.skip("needs ../shared/data/alpaca_eval beside the checkout")
    config = parse(path)
    assert config.variants == list(VARIANTS) and len(config.seeds) >= 3
    assert config.model_name_or_path is None and config.dataset_path is None  # the embedded defaults
    assert config.neftune_noise_alpha == 5 and (config.mixup_alpha, config.mixup_weight) == (0.5, 0.2)
    assert config.num_train_epochs == 3 and config.per_device_train_batch_size % 2 == 0
    repository = CONFIGS.parent
    for reference in [*config.eval_datasets, config.generation_prompts]:
        assert (repository / reference).exists()


def test_documented_run_config_uses_variants(cluster_inputs, caplog):
    """configs/run.yaml is the README's first `sftmix run`: no deprecated field, so no deprecation warning."""
    path = CONFIGS / "run.yaml"
    assert path.read_text().splitlines()[0] == "# sftmix run --config configs/run.yaml"
    config = parse(path, *cluster_inputs[:4])
    assert config.variants == ["ntp", "sftmix"] and config.seeds == [1, 2, 3]
    assert not [record for record in caplog.records if "deprecated" in record.getMessage()]
