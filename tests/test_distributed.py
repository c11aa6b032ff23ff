"""Several processes give what one process gives: training, LoRA, dynamics and `run` under DDP, ZeRO-3, FSDP2.

The launches are real `accelerate launch` jobs of 2 processes on this CPU (gloo), with the
configs shipped in configs/accelerate/. DeepSpeed runs on CPU with DS_ACCELERATOR=cpu.
accelerate 1.15 runs FSDP as plain DDP when there is no GPU; tests/cpu_launch/sitecustomize.py
(test-only) lets it take its real FSDP2 path on CPU processes. Every launch asserts from
launch.json / dynamics.json that 2 processes ran, in one process group, under the named engine.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_conversations, write_jsonl
from test_trainer import make_config, make_trainer
from transformers import AutoModelForCausalLM

from sftmix import callbacks, distributed
from sftmix.config import DynamicsConfig, RunConfig
from sftmix.errors import InputError
from sftmix.files import read_jsonl
from sftmix.model import loadable_checkpoint
from sftmix.recipes.dynamics import dynamics
from sftmix.recipes.run import run
from sftmix.recipes.train import train

pytestmark = pytest.mark.integration  # launches, CLI subprocesses, end-to-end runs

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = ROOT / "configs" / "accelerate"
CPU_LAUNCH = Path(__file__).resolve().parent / "cpu_launch"


def launch(config: str, command: list[str], cwd: Path, *launch_flags: str, env: dict | None = None, check=True,
           processes: int = 2):
    """`accelerate launch --config_file configs/accelerate/<config>.yaml --num_processes N -m sftmix.cli ...`;
    asserts that `processes` processes started (ranks 0 to N-1 of a world of N), whatever the command's outcome,
    and after a success that each had destroyed its process group before exiting."""
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    ranks = Path(tempfile.mkdtemp(prefix="sftmix-ranks-"))  # outside cwd: tests list what the command wrote
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu",
                   "PYTHONPATH": str(CPU_LAUNCH), "SFTMIX_TEST_FSDP2_ON_CPU": "1" if config == "fsdp2" else "0",
                   "SFTMIX_TEST_RANKS_DIR": str(ranks), **(env or {})}
    args = [accelerate, "launch", "--config_file", str(ACCELERATE_CONFIGS / f"{config}.yaml"),
            "--num_processes", str(processes), "--mixed_precision", "no", "--main_process_port", str(free_port()),
            *launch_flags, "-m", "sftmix.cli", *command]
    result = subprocess.run(args, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600)
    records = sorted(path.name for path in ranks.iterdir())
    shutil.rmtree(ranks)
    started = [name for name in records if name.startswith("rank-")]
    assert started == sorted(f"rank-{rank}-of-{processes}" for rank in range(processes)), result.stderr[-3000:]
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-5000:]}")
    if result.returncode == 0:  # every rank left its process group before Python's shutdown (cli.main's `leave`)
        assert [name for name in records if name.startswith("exit-")] == [], records
    return result


def free_port() -> int:
    """A port no other job on this machine listens on (the default 29500 collides with concurrent launches)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_flags(tiny_model_dir, tiny_data, per_device_batch: int, output_dir: str, *more: str) -> list[str]:
    return ["train", "--model_name_or_path", str(tiny_model_dir), "--dataset_path", str(tiny_data[0]),
            "--confidence_path", str(tiny_data[1]), "--per_device_train_batch_size", str(per_device_batch),
            "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no", "--learning_rate", "1e-3",
            "--gradient_checkpointing", "false", "--seed", "3", "--max_length", "64", "--output_dir", output_dir,
            *more]


def one_process(tiny_model_dir, tiny_data, tmp_path, name: str, **overrides) -> Path:
    """The same training in this process, with the whole global batch (8) on one device."""
    settings = dict(output_dir=str(tmp_path / name), model_name_or_path=str(tiny_model_dir),
                    dataset_path=str(tiny_data[0]), confidence_path=str(tiny_data[1]), per_device_train_batch_size=8,
                    max_steps=2, learning_rate=1e-3, seed=3, max_length=64)
    config = make_config(tmp_path, **{**settings, **overrides})
    return train(config)


def step_logs(output_dir: Path) -> list[dict]:
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry for entry in history if "ntp_loss" in entry]


def assert_ran_as(output_dir: Path, engine: str) -> None:
    launch_info = json.loads((output_dir / "launch.json").read_text())
    assert launch_info == {"processes": 2, "process_group_size": 2, "engine": engine}


def assert_same_steps(two: Path, one: Path) -> None:
    for logged_two, logged_one in zip(step_logs(two), step_logs(one), strict=True):
        keys = [key for key in ("ntp_loss", "mixup_loss", "mixup_lambda", "loss") if key in logged_one]
        assert set(keys) <= set(logged_two) and "ntp_loss" in keys
        for key in keys:
            assert logged_two[key] == pytest.approx(logged_one[key], rel=1e-5), key


def assert_same_weights(first: Path, second: Path, tolerance: float = 1e-5) -> None:
    model_a, model_b = AutoModelForCausalLM.from_pretrained(first), AutoModelForCausalLM.from_pretrained(second)
    for (name, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=tolerance, rtol=tolerance, msg=name)


# --------------------------------------------------------------------------- in one process


def test_lambdas_are_slices_of_one_draw_per_step(tiny_model_dir, tiny_data, tokenizer, tmp_path, monkeypatch):
    """Two ranks draw different lambdas, and together the ones one process draws for the whole batch."""
    trainer = make_trainer(tiny_model_dir, tiny_data, tokenizer, tmp_path)
    single = trainer._lambdas(4)
    slices = []
    for rank in (0, 1):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        slices.append(trainer._lambdas(2))
    assert not torch.equal(slices[0], slices[1])
    assert torch.equal(torch.cat(slices), single)


def test_accumulated_micro_batches_equal_one_batch(tiny_model_dir, tiny_data, tmp_path):
    """Batch 4 x 2 accumulated micro-batches optimise what batch 8 does: same lambdas, same normalisers."""
    whole = one_process(tiny_model_dir, tiny_data, tmp_path, "whole")
    accumulated = one_process(tiny_model_dir, tiny_data, tmp_path, "accumulated", per_device_train_batch_size=4,
                              gradient_accumulation_steps=2)
    assert_same_steps(accumulated, whole)
    assert_same_weights(accumulated, whole)


def test_online_nll_visits_follow_epochs_not_rank_order():
    """Records arrive rank by rank; the last batch of an epoch repeats examples to even out the ranks."""
    records = {
        "a": [(1, 6, 9.0, 3), (0, 1, 1.0, 3)],  # rank 0 sent its epoch-1 record first
        "b": [(0, 2, 2.0, 4), (0, 4, 2.5, 4), (1, 5, 8.0, 4)],  # a repeat in epoch 0, at a later step
    }
    visits = callbacks.online_scores(records, ["a", "b"])
    assert [visit.nll_sum for visit in visits] == [[1.0, 2.0], [9.0, 8.0]]
    assert [visit.num_tokens for visit in visits] == [[3, 4], [3, 4]]


def test_unservable_launches_are_refused_before_any_work(monkeypatch):
    config = SimpleNamespace(world_size=1, loss_type="sftmix", accelerator_config=SimpleNamespace(split_batches=False))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match="independent copies"):
        distributed.check_launch(config)
    config.world_size = 2
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(InputError, match="fsdp_version: 2"):
        distributed.check_launch(config)
    monkeypatch.setenv("FSDP_VERSION", "2")
    distributed.check_launch(config)
    monkeypatch.setenv("PARALLELISM_CONFIG_TP_SIZE", "2")
    with pytest.raises(InputError, match="tensor / context / sequence parallelism"):
        distributed.check_launch(config)


# --------------------------------------------------------------------------- 2 processes


@pytest.mark.parametrize("loss_type, per_device, accumulation, engine", [("sftmix", 2, 2, "zero3")])
def test_uneven_data_two_processes_equal_one_process(loss_type, per_device, accumulation, engine, tiny_model_dir,
                                                     tmp_path):
    """2 processes x batch 2 x 2 accumulated micro-batches (sftmix, ZeRO-3) optimise what 1 process x batch 8 does,
    on 20 examples, one epoch of global batches of 8: 3 steps, the last one not a multiple of the data. Each step's
    losses and the final weights equal one process's (accelerate used to give rank 1 a repeat of batch 0). Both
    losses under DDP on uneven data: test_run_two_processes_equals_one_process."""
    from conftest import write_groups

    rows = make_conversations(20, seed=5)
    data = (write_jsonl(tmp_path / "twenty.jsonl", rows),
            write_groups(tmp_path / "twenty-confidence.jsonl", [row["id"] for row in rows]))
    flags = train_flags(tiny_model_dir, data, per_device, "two", "--gradient_accumulation_steps", str(accumulation),
                        "--loss_type", loss_type, "--max_steps", "-1", "--num_train_epochs", "1")
    launch(engine, flags, tmp_path)
    assert_ran_as(tmp_path / "two", {"ddp": "ddp", "zero3": "deepspeed-zero3"}[engine])
    one = one_process(tiny_model_dir, data, tmp_path, "one", loss_type=loss_type, max_steps=-1, num_train_epochs=1)
    assert len(step_logs(one)) == 3
    assert_same_steps(tmp_path / "two", one)
    assert_same_weights(tmp_path / "two", one)


def test_zero3_bf16_saves_the_float32_master_weights_without_16bit_gathering(tiny_model_dir, tiny_data, tmp_path):
    """With bf16 mixed precision ZeRO-3's module holds bf16 copies of the weights; the saved folder holds the float32
    weights the optimizer updated (DeepSpeed's own 16-bit gathering would have saved the copies). accelerate's
    default `--zero3_save_16bit_model false` used to save no weights, with exit 0; a checkpoint's engine shards
    alone are merged and scored like its weights."""
    from safetensors.torch import load_file

    flags = train_flags(tiny_model_dir, tiny_data, 4, "two", "--bf16", "true", "--use_cpu", "true",
                        "--save_strategy", "steps", "--save_steps", "2")
    launch("zero3", flags, tmp_path, "--mixed_precision", "bf16", "--zero3_save_16bit_model", "false")
    assert_ran_as(tmp_path / "two", "deepspeed-zero3")
    saved = load_file(tmp_path / "two" / "model.safetensors")
    assert saved and all(tensor.dtype == torch.float32 for tensor in saved.values())
    trained = saved["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(trained, trained.to(torch.bfloat16).float())  # not a bf16 copy cast up
    base = load_file(tiny_model_dir / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(trained, base)  # trained
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "two", dtype="auto")  # config.json names the saved dtype
    assert loaded.dtype == torch.float32 and torch.equal(loaded.model.layers[0].mlp.up_proj.weight.data, trained)
    assert_sharded_checkpoint_is_scored(tmp_path / "two" / "checkpoint-2", "global_step2", tiny_model_dir, tiny_data,
                                        tmp_path)


def test_fsdp2_two_processes_equal_one_process(tiny_model_dir, tiny_data, tmp_path):
    """fsdp2.yaml keeps SHARDED_STATE_DICT: the saved folder must still hold full weights."""
    flags = train_flags(tiny_model_dir, tiny_data, 4, "two", "--save_strategy", "steps", "--save_steps", "2")
    launch("fsdp2", flags, tmp_path)
    assert_ran_as(tmp_path / "two", "fsdp2")
    assert_same_steps(tmp_path / "two", one_process(tiny_model_dir, tiny_data, tmp_path, "one"))
    assert_same_weights(tmp_path / "two", tmp_path / "one")
    assert_sharded_checkpoint_is_scored(tmp_path / "two" / "checkpoint-2", "pytorch_model_fsdp_0", tiny_model_dir,
                                        tiny_data, tmp_path)


def assert_sharded_checkpoint_is_scored(checkpoint: Path, shards: str, tiny_model_dir, tiny_data, tmp_path) -> None:
    """A checkpoint holding only the engine's shards (as other tools save them) is merged once, then scored."""
    stripped = tmp_path / "shards-only"
    shutil.copytree(checkpoint, stripped, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    assert (stripped / shards).is_dir()
    merged = loadable_checkpoint(str(stripped), str(tiny_model_dir), tmp_path / "consolidated")
    assert_same_weights(Path(merged), checkpoint.parent)  # checkpoint-2 is the final step
    settings = dict(model_name_or_path=str(tiny_model_dir), dataset_path=str(tiny_data[0]), max_length=64,
                    use_cpu=True, disable_tqdm=True)
    from_shards = dynamics(DynamicsConfig(**settings, checkpoints=[str(stripped)], output_dir=str(tmp_path / "a")))
    from_model = dynamics(DynamicsConfig(**settings, checkpoints=[str(checkpoint.parent)],
                                         output_dir=str(tmp_path / "b")))
    perplexities = [[row["perplexities"][0] for row in read_jsonl(directory / "confidence.jsonl")]
                    for directory in (from_shards, from_model)]
    assert perplexities[0] == pytest.approx(perplexities[1], rel=1e-5)


@pytest.mark.parametrize("engine, config", [
    ("deepspeed-zero3", "zero3"),
    # DeepSpeed compiles its CPU Adam op the first time offloading runs (4 minutes here): opt-in.
    pytest.param("deepspeed-zero3", "zero3_offload", marks=pytest.mark.slow),
    ("fsdp2", "fsdp2"),
])
def test_lora_is_merged_from_the_whole_adapter(engine, config, tiny_model_dir, tiny_data, tmp_path):
    """The merge used to run on rank 0's shards: [0]-shaped tensors under ZeRO-3, a crash under FSDP2."""
    # No LoRA dropout (TRL's default is 0.05): its masks are drawn per process, so 1 and 2 processes would differ.
    lora = ["--use_peft", "true", "--lora_r", "4", "--lora_dropout", "0", "--learning_rate", "1e-2"]
    launch(config, train_flags(tiny_model_dir, tiny_data, 4, "two", *lora), tmp_path)
    assert_ran_as(tmp_path / "two", engine)
    one = one_process(tiny_model_dir, tiny_data, tmp_path, "one", use_peft=True, lora_r=4, lora_dropout=0.0,
                      learning_rate=1e-2)
    assert_same_weights(tmp_path / "two", one)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "two")
    changed = [name for name, weight in merged.named_parameters()
               if not torch.equal(weight, base.get_parameter(name))]
    assert changed and all("proj" in name for name in changed)  # the LoRA targets moved, nothing else


def test_dynamics_reference_run_under_zero3_equals_one_process(tiny_model_dir, tmp_path):
    """Under ZeRO-3 the other ranks used to exit after training, and loading a checkpoint on rank 0 crashed.
    18 examples in global batches of 4: the epoch's last step is not a multiple of the data."""
    data = write_jsonl(tmp_path / "eighteen.jsonl", make_conversations(18, seed=6))
    settings = dict(model_name_or_path=str(tiny_model_dir), dataset_path=str(data), max_length=64,
                    learning_rate=1e-3, num_train_epochs=1, activation_checkpointing=False, seed=3,
                    scoring_batch_tokens=100, num_checkpoints=2)
    launch("zero3", ["dynamics", *cli_flags(settings), "--per_device_train_batch_size", "2", "--output_dir", "two"],
           tmp_path)
    meta = json.loads((tmp_path / "two" / "dynamics.json").read_text())
    assert meta["processes"] == 2 and len(meta["checkpoints"]) == 2
    dynamics(DynamicsConfig(**settings, per_device_train_batch_size=4, output_dir=str(tmp_path / "one"),
                            use_cpu=True, disable_tqdm=True))
    two_rows, one_rows = (read_jsonl(tmp_path / name / "confidence.jsonl") for name in ("two", "one"))
    assert [row["group"] for row in two_rows] == [row["group"] for row in one_rows]
    for row_two, row_one in zip(two_rows, one_rows):
        assert row_two["confidence"] == pytest.approx(row_one["confidence"], rel=1e-5)


def test_dynamics_checkpoints_crash_on_one_rank_then_resume(tiny_model_dir, tiny_data, tmp_path):
    """A crash on one rank ends both, fast; the rerun reuses the finished scores and writes the one-process file."""
    settings = dict(model_name_or_path=str(tiny_model_dir), dataset_path=str(tiny_data[0]), max_length=64,
                    scoring_batch_tokens=100, checkpoints=[str(tiny_model_dir)] * 2)
    flags = ["dynamics", *cli_flags(settings), "--output_dir", "two"]
    started = time.monotonic()
    crashed = launch("ddp", flags, tmp_path, env={"SFTMIX_TEST_FAIL_SCORING": "1:2"}, check=False)
    assert crashed.returncode != 0 and time.monotonic() - started < 300
    assert "injected crash on rank 1 in scoring pass 2" in crashed.stderr
    assert [path.name for path in (tmp_path / "two" / "scores").iterdir()] == [f"00-{tiny_model_dir.name}.json"]
    assert not (tmp_path / "two" / "confidence.jsonl").exists()
    resumed = launch("ddp", flags, tmp_path)
    assert resumed.stdout.count("Confidence split written") == 1  # one rank reports, once
    assert json.loads((tmp_path / "two" / "dynamics.json").read_text())["processes"] == 2
    dynamics(DynamicsConfig(**settings, output_dir=str(tmp_path / "one"), use_cpu=True, disable_tqdm=True))
    assert (tmp_path / "two" / "confidence.jsonl").read_text() == (tmp_path / "one" / "confidence.jsonl").read_text()


def test_dynamics_under_fsdp2_scores_with_whole_models_on_every_rank(tiny_model_dir, tiny_data, tmp_path):
    """fsdp2.yaml loads CPU-RAM-efficiently: ranks other than the first used to score with placeholder weights."""
    settings = dict(model_name_or_path=str(tiny_model_dir), dataset_path=str(tiny_data[0]), max_length=64,
                    scoring_batch_tokens=100, checkpoints=[str(tiny_model_dir)])
    launch("fsdp2", ["dynamics", *cli_flags(settings), "--output_dir", "two"], tmp_path)
    assert json.loads((tmp_path / "two" / "dynamics.json").read_text())["processes"] == 2
    dynamics(DynamicsConfig(**settings, output_dir=str(tmp_path / "one"), use_cpu=True, disable_tqdm=True))
    two_rows, one_rows = (read_jsonl(tmp_path / name / "confidence.jsonl") for name in ("two", "one"))
    assert [row["perplexities"] for row in two_rows] == [row["perplexities"] for row in one_rows]


@pytest.mark.parametrize("engine", ["ddp", "zero3"])
def test_run_two_processes_equals_one_process(engine, tiny_model_dir, tmp_path):
    """The same steps, confidence split and metrics as one process. Rank 1 used to run ahead into training while
    rank 0 scored. 28 records, a fifth held out: every stage's last step is uneven. Under ZeRO-3 the scoring and
    the evaluation run with the parameters sharded (--sharded_scoring): each rank holds half of the weights, every
    forward gathers them, and the confidences (rel 1e-5) and metrics equal one process's whole-copy scoring. 5 answers
    in batches of 2: rank 0 makes 2 generate calls, rank 1 one and a spare one."""
    data = write_jsonl(tmp_path / "data.jsonl", make_conversations(28, seed=4))
    settings = dict(model_name_or_path=str(tiny_model_dir), dataset_path=str(data), learning_rate=1e-3,
                    num_train_epochs=1, max_length=64, activation_checkpointing=False, eval_fraction=0.2,
                    num_generations=5, max_new_tokens=4, save_strategy="no", logging_steps=1,
                    scoring_batch_tokens=200, seeds=[5])
    sharded = ["--sharded_scoring", "true"] if engine == "zero3" else []
    result = launch(engine, ["run", *cli_flags(settings), "--per_device_train_batch_size", "2", *sharded,
                             "--output_dir", "two"], tmp_path)
    assert result.stdout.count("Report:") == 1
    scoring = json.loads((tmp_path / "two" / "dynamics" / "dynamics.json").read_text())["cost"]["scoring"]
    assert scoring["sharded"] == bool(sharded)
    assert scoring["share_of_weights_per_rank"] <= (0.55 if sharded else 1)  # half each (plus padding), or whole
    assert json.loads((tmp_path / "two" / "eval" / "sftmix-seed5" / "metrics.json").read_text())["cost"]["sharded"] \
        == bool(sharded)
    run(RunConfig(**settings, per_device_train_batch_size=4, output_dir=str(tmp_path / "one"), use_cpu=True,
                  disable_tqdm=True))
    split = json.loads((tmp_path / "one" / "metrics.json").read_text())["split"]
    assert (split["confident"]["count"] + split["unconfident"]["count"]) % 4 != 0  # global batches of 4: uneven
    two_split, one_split = (read_jsonl(tmp_path / name / "dynamics" / "confidence.jsonl") for name in ("two", "one"))
    assert [row["group"] for row in two_split] == [row["group"] for row in one_split]
    for row_two, row_one in zip(two_split, one_split, strict=True):
        assert row_two["confidence"] == pytest.approx(row_one["confidence"], rel=1e-5)
    for model in ("sftmix-seed5", "ntp-seed5"):
        assert_ran_as(tmp_path / "two" / model, {"ddp": "ddp", "zero3": "deepspeed-zero3"}[engine])
        assert_same_steps(tmp_path / "two" / model, tmp_path / "one" / model)
        assert_same_weights(tmp_path / "two" / model, tmp_path / "one" / model)
    two_runs = json.loads((tmp_path / "two" / "metrics.json").read_text())["runs"]
    one_runs = json.loads((tmp_path / "one" / "metrics.json").read_text())["runs"]
    assert set(two_runs) == set(one_runs) == {"sftmix-seed5", "ntp-seed5"}
    for name, metrics in one_runs.items():
        for metric, value in metrics.items():
            if "runtime" not in metric:
                assert two_runs[name][metric] == pytest.approx(value, rel=1e-5), (name, metric)


def cli_flags(settings: dict) -> list[str]:
    """Keyword settings as the command-line flags that set them."""
    flags = []
    for key, value in settings.items():
        flags += [f"--{key}", *(map(str, value) if isinstance(value, list) else [str(value)])]
    return flags


def test_eval_two_processes_equals_one_process(tiny_model_dir, tiny_data, tmp_path):
    """`sftmix eval` alone (no trainer sets up the process group): each rank scores and answers its share."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"question_id": 1, "turns": ["tell me about the cat", "why"]},
        {"question_id": 2, "turns": ["one two"]},
        {"question_id": 3, "turns": ["the red dog"]},
    ])
    flags = ["eval", "--model", str(tiny_model_dir), "--dataset", str(tiny_data[0]), "--prompts", str(prompts),
             "--confidence_dataset", str(tiny_data[0]), "--max_new_tokens", "5", "--max_length", "64",
             "--batch_size", "2", "--scoring_batch_tokens", "100"]
    result = launch("ddp", [*flags, "--output_dir", "two"], tmp_path)
    assert result.stdout.count("Metrics:") == 1
    one = subprocess.run([sys.executable, "-m", "sftmix.cli", *flags, "--output_dir", "one"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    for name in ("model_outputs.json", "nll-data.jsonl"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text()
    two_answers, one_answers = (read_jsonl(tmp_path / name / "mt_bench_answers.jsonl") for name in ("two", "one"))
    assert [row["choices"] for row in two_answers] == [row["choices"] for row in one_answers]
    two_metrics, one_metrics = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("two", "one"))
    assert two_metrics["likelihood"] == one_metrics["likelihood"]
    assert two_metrics["confidence"]["confidence_std"] == pytest.approx(one_metrics["confidence"]["confidence_std"])


def test_sharded_scoring_needs_a_zero3_launch(tiny_model_dir, tiny_data, tmp_path):
    config = DynamicsConfig(model_name_or_path=str(tiny_model_dir), dataset_path=str(tiny_data[0]), max_length=64,
                            checkpoints=[str(tiny_model_dir)], sharded_scoring=True, output_dir=str(tmp_path / "d"),
                            use_cpu=True)
    with pytest.raises(InputError, match="--sharded_scoring true needs a DeepSpeed ZeRO-3 launch"):
        dynamics(config)
    assert not (tmp_path / "d" / "scores").exists()
    # refused at the start, also where Stage 1 scores nothing (online) and only the evaluation would have used it
    online = RunConfig(model_name_or_path=str(tiny_model_dir), dataset_path=str(tiny_data[0]), max_length=64,
                       online=True, sharded_scoring=True, output_dir=str(tmp_path / "r"), use_cpu=True)
    with pytest.raises(InputError, match="--sharded_scoring true needs a DeepSpeed ZeRO-3 launch"):
        run(online)
    assert not (tmp_path / "r").exists()
