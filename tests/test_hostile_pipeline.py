"""Fault battery, the recipes: output directories in use or unwritable, run directories spelled in
another way, stages whose settings changed, folders sftmix did not make."""

import importlib
import json
import logging
import os
import subprocess
import sys

import pytest
from conftest import write_jsonl
from test_pipeline import run_config

from sftmix import keys
from sftmix.config import DynamicsConfig, EvalConfig, RunConfig, SFTMixConfig
from sftmix.errors import InputError
from sftmix.recipes.dynamics import dynamics
from sftmix.recipes.evaluate import evaluate
from sftmix.recipes.run import run
from sftmix.recipes.train import train

pytestmark = pytest.mark.integration  # launches, CLI subprocesses, end-to-end runs

HOLDER = "import sys, time; from sftmix.files import OutputLock; lock = OutputLock(sys.argv[1]); lock.acquire(); " \
         "print('held', flush=True); time.sleep(600)"


def command_config(command: str, output_dir, model_dir, data_path):
    """The config of one command writing to `output_dir`."""
    if command == "train":
        return SFTMixConfig(output_dir=str(output_dir), model_name_or_path=str(model_dir), loss_type="ntp",
                            dataset_path=str(data_path), use_cpu=True, max_steps=1)
    if command == "dynamics":
        return DynamicsConfig(output_dir=str(output_dir), model_name_or_path=str(model_dir),
                              dataset_path=str(data_path), use_cpu=True)
    if command == "eval":
        return EvalConfig(model=str(model_dir), dataset=[str(data_path)], output_dir=str(output_dir), use_cpu=True)
    return RunConfig(output_dir=str(output_dir), model_name_or_path=str(model_dir), dataset_path=str(data_path),
                     use_cpu=True)


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a recipe gets as far as reading data or loading a model."""
    def refuse(*args, **kwargs):
        pytest.fail("work started before the output directory was checked")

    for name in ("prepare", "load_tokenizer", "load_model", "hold_out"):
        for module in RECIPE_MODULES:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, refuse)


RECIPE_MODULES = [importlib.import_module(f"sftmix.recipes.{name}")
                  for name in ("common", "train", "dynamics", "evaluate", "run")]
run_recipe = RECIPE_MODULES[-1]
RECIPES = {"train": train, "dynamics": dynamics, "eval": evaluate, "run": run}

# --------------------------------------------------------------------------- 7. one run per output directory


@pytest.mark.parametrize("command", list(RECIPES))
def test_second_run_into_a_held_directory_is_refused_naming_the_holder(command, tiny_model_dir, tiny_data, tmp_path,
                                                                      no_work):
    output_dir = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(output_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError, match=rf"out is in use by another sftmix run \(pid {holder.pid} on host"):
            RECIPES[command](command_config(command, output_dir, tiny_model_dir, tiny_data[0]))
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_run_leaves_no_stuck_lock(tiny_model_dir, tiny_data, tmp_path):
    output_dir = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(output_dir)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()  # SIGKILL: no clean-up code runs
    holder.wait()
    assert (output_dir / ".sftmix.lock").exists()
    result = train(command_config("train", output_dir, tiny_model_dir, tiny_data[0]))
    assert (result / "model.safetensors").exists()
    assert not (output_dir / ".sftmix.lock").exists()  # a run that ends normally removes its lock file


# --------------------------------------------------------------------------- 9. unwritable output directories


@pytest.mark.parametrize("command", list(RECIPES))
def test_unwritable_output_directory_is_refused_before_any_work(command, tiny_model_dir, tiny_data, no_work):
    """/proc/self exists and refuses new files even to root (the suite may run as root, where chmod does not bite)."""
    with pytest.raises(InputError, match=r"/proc/self: cannot write to the output directory"):
        RECIPES[command](command_config(command, "/proc/self", tiny_model_dir, tiny_data[0]))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory_is_refused_before_any_work(tiny_model_dir, tiny_data, tmp_path, no_work):
    output_dir = tmp_path / "read-only"
    output_dir.mkdir()
    output_dir.chmod(0o555)
    try:
        with pytest.raises(InputError, match=r"read-only: cannot write to the output directory"):
            train(command_config("train", output_dir, tiny_model_dir, tiny_data[0]))
    finally:
        output_dir.chmod(0o755)


# --------------------------------------------------------------------------- 2. stage keys and stage folders


def test_run_directory_spelled_another_way_redoes_nothing(tiny_model_dir, tmp_path, monkeypatch, caplog):
    """`o/R`, its absolute path, then `o/R` again: the finished stages are all kept."""
    from conftest import make_conversations

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data.jsonl", make_conversations(20, seed=4))
    relative = run_config(tmp_path, tiny_model_dir, "data.jsonl", variants=["sftmix"], output_dir="o/R",
                          num_generations=1)
    run(relative)
    model = tmp_path / "o" / "R" / "sftmix-seed5" / "model.safetensors"
    stamp = model.stat().st_mtime_ns
    for spelling in (str(tmp_path / "o" / "R"), "o/R", "./o/../o/R"):
        caplog.clear()
        run(run_config(tmp_path, tiny_model_dir, str(tmp_path / "data.jsonl"), variants=["sftmix"],
                                output_dir=spelling, num_generations=1))
        skipped = [r.getMessage() for r in caplog.records if "up to date" in r.getMessage()]
        assert len(skipped) == 4, (spelling, [r.getMessage() for r in caplog.records])
        assert model.stat().st_mtime_ns == stamp


def test_stage_with_changed_settings_is_redone_naming_the_change(tmp_path, caplog):
    stage = tmp_path / "sftmix-seed1"
    run_recipe._stage(stage, {"mixup_weight": 0.2, "seed": 1}, lambda: (stage / "model.txt").write_text("0.2"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run_recipe._stage(stage, {"mixup_weight": 0.5, "seed": 1}, lambda: (stage / "model.txt").write_text("0.5"))
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "sftmix-seed1" in message and "mixup_weight: 0.2 -> 0.5" in message and "seed:" not in message
    assert (stage / "model.txt").read_text() == "0.5"


def test_folder_not_made_by_sftmix_is_never_deleted(tmp_path):
    stage = tmp_path / "eval"
    stage.mkdir()
    (stage / "my-notes.txt").write_text("results of last week")
    with pytest.raises(InputError, match=r"eval holds files that `sftmix run` did not make.*my-notes\.txt"):
        run_recipe._stage(stage, {"k": 1}, lambda: None)
    assert (stage / "my-notes.txt").read_text() == "results of last week"


def test_stage_keys_hold_resolved_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text("{}\n")
    spelled = [keys.stage_key({"dataset_path": path, "eval_dataset_path": path, "datasets": [{"path": path}],
                                   "seed": 1}, tmp_path / "R")
               for path in ("d.jsonl", str(tmp_path / "d.jsonl"), "./sub/../d.jsonl")]
    assert spelled[0] == spelled[1] == spelled[2]
    (tmp_path / "R" / "m").mkdir(parents=True)
    inside = [keys.stage_key({"model": path}, run_dir)
              for path, run_dir in (("R/m", tmp_path / "R"), (str(tmp_path / "R" / "m"), "R"))]
    assert inside[0] == inside[1] and json.dumps(inside[0]).count(str(tmp_path)) == 0  # moves with the run folder


@pytest.mark.parametrize("weight_files", [
    ["model.safetensors"],
    # a sharded save has no model.safetensors: the stage once keyed it as None whatever the weights
    ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"],
])
def test_eval_stage_is_redone_when_its_model_was_retrained(tmp_path, monkeypatch, weight_files):
    """The eval stage key once lost the model's weight hash (a config field of the same name overwrote it)."""
    run_dir = tmp_path / "run"
    (run_dir / "data").mkdir(parents=True)
    for name in ("heldout.jsonl", "train.jsonl"):
        write_jsonl(run_dir / "data" / name, [{"instruction": "q", "output": "a"}])
    model_dir = run_dir / "sftmix-seed1"
    model_dir.mkdir()
    evaluated = []
    monkeypatch.setattr(run_recipe, "evaluate", lambda config: evaluated.append(config.model))
    config = RunConfig(output_dir=str(run_dir), use_cpu=True)
    for weights in (b"first training", b"first training", b"retrained"):
        for name in weight_files:
            (model_dir / name).write_bytes(weights)
        run_recipe._eval_stage(config, run_dir, model_dir)
    assert len(evaluated) == 2  # skipped when unchanged, redone after the retrain


def test_held_out_split_copies_values_json_has_no_type_for(tmp_path):
    """Parquet (and hub) rows may hold dates or bytes: `run`'s split copies them as text, never a traceback."""
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"id": f"e{i}", "instruction": f"question {i}", "output": "an answer",
             "added": datetime.date(2024, 1, i + 1)} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    config = RunConfig(output_dir=str(tmp_path / "run"), dataset_path=str(tmp_path / "d.parquet"), eval_fraction=0.2)
    data_dir = tmp_path / "run" / "data"
    run_recipe.hold_out(config, data_dir)
    copied = [json.loads(line) for name in ("train.jsonl", "heldout.jsonl")
              for line in (data_dir / name).read_text().splitlines()]
    assert sorted(row["added"] for row in copied) == [f"2024-01-{day:02d}" for day in range(1, 11)]
