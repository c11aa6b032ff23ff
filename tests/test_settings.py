"""Every setting does what it says: the audit of all fields, their effect on a real training, start-up checks."""

import dataclasses
import json
import math
import types
from pathlib import Path

import pytest
import torch
import yaml
from transformers import TrainerCallback, TrainingArguments
from trl import ModelConfig, ScriptArguments, SFTConfig
from trl.scripts.utils import DatasetMixtureConfig

from sftmix import cli, settings
from sftmix.config import DynamicsConfig, EvalConfig, RunConfig, SelectConfig, SFTMixConfig
from sftmix.errors import InputError
from sftmix.recipes.dynamics import dynamics
from sftmix.recipes.train import train

REPOSITORY = Path(__file__).resolve().parents[1]
UPSTREAM = (TrainingArguments, SFTConfig, ModelConfig, ScriptArguments, DatasetMixtureConfig)
OURS = (SFTMixConfig, DynamicsConfig, RunConfig, EvalConfig, SelectConfig)


def init_fields(cls) -> set[str]:
    return {field.name for field in dataclasses.fields(cls) if field.init}


# ------------------------------------------------------------------------------------------- the audit


def test_every_field_is_in_exactly_one_class():
    """A field that a transformers or TRL release adds lands in no class and fails here; one it removes leaves a
    stale entry in a table and fails here too."""
    honoured = [name for names in settings.HONOURED.values() for name in names]
    assert len(honoured) == len(set(honoured)), "a field is listed twice among the honoured"
    tables = {"honoured": set(honoured), "refused": set(settings.REFUSED), "no effect": set(settings.NO_EFFECT)}
    ours = set().union(*(settings.declared_by_sftmix(cls) for cls in OURS))
    upstream = set().union(*(init_fields(cls) for cls in UPSTREAM))
    every = upstream | set().union(*(init_fields(cls) for cls in OURS))
    for name in sorted(every):
        classes = [title for title, names in tables.items() if name in names]
        if name in ours and not classes:
            classes = ["honoured (sftmix's own)"]
        assert len(classes) == 1, f"{name}: in {classes or 'no class'} (sftmix/settings.py)"
    stale = set().union(*tables.values()) - every
    assert not stale, f"fields no installed class has any more: {sorted(stale)}"
    assert not set(settings.RENAMED) & every  # an old spelling that exists again is no longer renamed


def test_docs_settings_is_made_from_the_tables():
    assert (REPOSITORY / "docs" / "settings.md").read_text() == settings.markdown(), \
        "regenerate it: python -m sftmix.settings > docs/settings.md"


# ------------------------------------------------------------------------------------------- effects


class Recorder(TrainerCallback):
    """The learning rate each optimisation step uses, per training (output_dir)."""

    def __init__(self):
        self.lrs: dict[str, list[float]] = {}

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.lrs.setdefault(Path(args.output_dir).name, []).append(optimizer.param_groups[0]["lr"])


def tiny(tiny_model_dir, tiny_data, tmp_path, config_class=SFTMixConfig, name="out", **overrides):
    values = dict(output_dir=str(tmp_path / name), model_name_or_path=str(tiny_model_dir),
                  dataset_path=str(tiny_data[0]), confidence_path=str(tiny_data[1]), use_cpu=True,
                  per_device_train_batch_size=4, learning_rate=1e-2, max_steps=10, save_strategy="no",
                  logging_steps=1, disable_tqdm=True, activation_checkpointing=False)
    values.update(overrides)
    if config_class is DynamicsConfig:
        values.pop("confidence_path")
    return config_class(**values)


def test_default_warm_up_reaches_the_scheduler(tiny_model_dir, tiny_data, tmp_path):
    """No warm-up setting: the paper's 0.1 of the steps (1 of 10), then transformers' cosine decay from the peak,
    lr * (1 + cos(pi * progress)) / 2, as read from the optimizer each step."""
    recorder = Recorder()
    train(tiny(tiny_model_dir, tiny_data, tmp_path), callbacks=[recorder])
    lrs = recorder.lrs["out"]
    assert len(lrs) == 10 and lrs[0] == 0.0
    assert lrs[1:] == pytest.approx([1e-2 * (1 + math.cos(math.pi * (step - 1) / 9)) / 2 for step in range(1, 10)])


@pytest.mark.parametrize("warmup, expected_first", [(0.3, [0.0, 1 / 3, 2 / 3, 1.0]), (2, [0.0, 0.5, 1.0])])
def test_warm_up_as_a_share_or_a_step_count(tiny_model_dir, tiny_data, tmp_path, warmup, expected_first):
    recorder = Recorder()
    train(tiny(tiny_model_dir, tiny_data, tmp_path, loss_type="ntp", warmup_steps=warmup,
               lr_scheduler_type="constant_with_warmup"), callbacks=[recorder])
    lrs = recorder.lrs["out"]
    assert lrs[:len(expected_first)] == pytest.approx([1e-2 * share for share in expected_first])
    assert lrs[len(expected_first):] == pytest.approx([1e-2] * (10 - len(expected_first)))  # constant afterwards


def test_reference_run_warms_up(tiny_model_dir, tiny_data, tmp_path):
    recorder = Recorder()
    dynamics(tiny(tiny_model_dir, tiny_data, tmp_path, DynamicsConfig, name="dyn", max_steps=-1,
                  num_train_epochs=2, num_checkpoints=2), callbacks=[recorder])
    (lrs,) = recorder.lrs.values()  # the reference run: 16 examples / 4 x 2 epochs = 8 steps, 1 of warm-up
    assert len(lrs) == 8 and lrs[0] == 0.0 and lrs[1] == pytest.approx(1e-2)


SHIPPED = sorted([*REPOSITORY.glob("configs/*.yaml"), *REPOSITORY.glob("configs/paper/*.yaml"),
                  REPOSITORY / "sftmix" / "quickstart.yaml"])


def test_every_shipped_config_warms_up(tiny_model_dir, tiny_data, tmp_path):
    """Each config's schedule settings (learning rate, scheduler, warm-up) on a real 10-step training (one training
    per distinct schedule): the first step at 0, the peak the config's learning rate, reached after the warm-up."""
    schedules = {}
    for path in SHIPPED:
        values = yaml.safe_load(path.read_text())
        schedule = {key: values[key] for key in ("learning_rate", "lr_scheduler_type", "warmup_steps") if key in values}
        schedules.setdefault(json.dumps(schedule, sort_keys=True), []).append(path.name)
    assert len(SHIPPED) == 6 and len(schedules) < len(SHIPPED)
    for number, (schedule, names) in enumerate(schedules.items()):
        recorder, schedule = Recorder(), json.loads(schedule)
        train(tiny(tiny_model_dir, tiny_data, tmp_path, name=f"s{number}", loss_type="ntp", max_steps=4, **schedule),
              callbacks=[recorder])
        lrs, peak = recorder.lrs[f"s{number}"], schedule.get("learning_rate", SFTMixConfig.learning_rate)
        assert lrs[0] == 0.0 and lrs[1] == pytest.approx(peak) and max(lrs) == lrs[1], names


def final_weights(config) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(Path(train(config)) / "model.safetensors")


def test_weight_decay_shrinks_the_weights(tiny_model_dir, tiny_data, tmp_path):
    # Adam's step size hardly depends on the gradient; decoupled decay pulls every weight towards 0 on top of it
    plain = final_weights(tiny(tiny_model_dir, tiny_data, tmp_path, name="wd0", loss_type="ntp", weight_decay=0.0,
                               max_steps=4))
    decayed = final_weights(tiny(tiny_model_dir, tiny_data, tmp_path, name="wd20", loss_type="ntp", weight_decay=20.0,
                                 max_steps=4))
    norm = lambda weights: sum(float(w.float().norm()) for name, w in weights.items() if "proj" in name)  # noqa: E731
    assert norm(decayed) < 0.9 * norm(plain)


def step_losses(output_dir) -> list[float]:
    history = json.loads((Path(output_dir) / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry and "step" in entry]


def test_seed_decides_the_run(tiny_model_dir, tiny_data, tmp_path):
    runs = {name: step_losses(train(tiny(tiny_model_dir, tiny_data, tmp_path, name=name, seed=seed, max_steps=4)))
            for name, seed in [("a", 1), ("b", 1), ("c", 2)]}
    assert runs["a"] == runs["b"] and runs["a"] != runs["c"]


@pytest.mark.parametrize("overrides, steps", [({"max_steps": -1, "num_train_epochs": 2}, 8),  # 16 examples / 4
                                              ({"max_steps": 3, "num_train_epochs": 2}, 3)])  # max_steps wins
def test_epochs_or_max_steps_set_the_length(tiny_model_dir, tiny_data, tmp_path, overrides, steps):
    recorder = Recorder()
    train(tiny(tiny_model_dir, tiny_data, tmp_path, loss_type="ntp", **overrides), callbacks=[recorder])
    assert len(recorder.lrs["out"]) == steps


# ------------------------------------------------------------------------------------------- start-up checks


def sftmix(capsys, *argv) -> tuple[int, str]:
    status = cli.main(list(argv))
    err = capsys.readouterr().err
    return status, err


def refused(capsys, *argv) -> str:
    """The command stops with status 2 and one line, before any model or data is read (the model path and the
    dataset do not exist: loading either would be another error)."""
    status, err = sftmix(capsys, *argv, "--model_name_or_path", "/nowhere/model", "--dataset_path",
                         "/nowhere/data.jsonl", "--use_cpu", "true")
    lines = [line for line in err.splitlines() if line.startswith("sftmix")]
    assert status == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("flags, message", [
    (["--report_to", "wandb"], "--report_to wandb needs its package: pip install wandb"),
    (["--report_to", "tensorboard"], "--report_to tensorboard needs its package: pip install tensorboard"),
    (["--report_to", "nonsense"], "--report_to nonsense: unknown"),
    (["--use_liger_kernel", "true"], "--use_liger_kernel is not supported"),
    (["--assistant_only_loss", "false"], "--assistant_only_loss false (TRL's default) is not supported"),
    (["--completion_only_loss", "false"], "--completion_only_loss false is not supported"),
    (["--packing", "true"], "--packing is not supported"),
    (["--dataset_text_field", "text2"], "--dataset_text_field: sftmix trains on conversations"),
    (["--label_smoothing_factor", "0.1"], "--label_smoothing_factor is not supported"),
    (["--auto_find_batch_size", "true"], "--auto_find_batch_size is not supported"),
    (["--train_sampling_strategy", "group_by_length"], "--train_sampling_strategy: sftmix draws its batches"),
    (["--warmup_ratio", "0.1"], "--warmup_ratio is not an option any more: use --warmup_steps"),
])
def test_train_refuses_at_start_up(flags, message, capsys, tmp_path, monkeypatch):
    if "tensorboard" in flags or "wandb" in flags:
        from transformers.integrations import get_available_reporting_integrations

        if flags[1] in get_available_reporting_integrations():
            pytest.skip(f"{flags[1]} is installed here")
    monkeypatch.chdir(tmp_path)
    assert message in refused(capsys, "train", *flags)
    assert not (tmp_path / "out").exists()


def test_what_sftmix_does_anyway_is_accepted(tmp_path):
    config = SFTMixConfig(output_dir=str(tmp_path), assistant_only_loss=True, completion_only_loss=True,
                          loss_type="ntp")
    assert config.assistant_only_loss and config.completion_only_loss


@pytest.mark.parametrize("yaml_text, message", [
    ("max_steps: 1.5\n", "`max_steps: 1.5` must be a whole number"),
    ("per_device_train_batch_size: 2.0\n", "`per_device_train_batch_size: 2.0` must be a whole number"),
    ("learning_rate: true\n", "`learning_rate: True` must be a number"),
    ("max_steps: 2\nlogging_steps: 1\nmax_steps: 3\n", "`max_steps` is given twice (lines 1 and 3); keep one"),
    ("warmup_ratio: 0.1\n", "`warmup_ratio` is not an option any more: use warmup_steps"),
    ("- a list\n", "expected a mapping of option: value"),
])
def test_yaml_mistakes_are_one_line_naming_the_file(yaml_text, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text(yaml_text)
    line = refused(capsys, "train", "--config", "bad.yaml")
    assert "bad.yaml" in line and message in line
    assert not (tmp_path / "out").exists()  # no training_key.json left behind


def test_dynamics_yaml_checks_its_own_fields(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text("num_checkpoints: 2.0\n")
    assert "`num_checkpoints: 2.0` must be a whole number" in refused(capsys, "dynamics", "--config", "bad.yaml")
    (tmp_path / "run.yaml").write_text("seeds: [1, 2.5]\n")
    assert "`seeds: [1, 2.5]` must be a list" in refused(capsys, "run", "--config", "run.yaml")


def test_a_yaml_string_number_is_converted(tmp_path, monkeypatch):
    """PyYAML reads 1e-4 (no dot) as a string; argparse converts it, as for a flag."""
    (tmp_path / "ok.yaml").write_text("learning_rate: 1e-4\nmax_steps: 3\nloss_type: ntp\n")
    config = cli._parse(SFTMixConfig, "sftmix train", ["--config", str(tmp_path / "ok.yaml"), "--output_dir",
                                                      str(tmp_path / "o")])
    assert config.learning_rate == 1e-4 and config.max_steps == 3


class FakeHub:
    """A local stand-in for the hub API: records each upload as the files it would send."""

    def __init__(self, root: Path, accept: bool = True):
        self.root, self.accept, self.uploads = root, accept, []
        hub = self

        class Api:
            def __init__(self, token=None, **kwargs):
                self.token = token

            def whoami(self, token=None):
                if not hub.accept:
                    raise ConnectionError("hub unreachable")
                return {"name": "me"}

            def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
                return types.SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

            def upload_folder(self, repo_id, folder_path, ignore_patterns=None, **kwargs):
                from huggingface_hub.utils import filter_repo_objects

                folder = Path(folder_path)
                files = [path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()]
                sent = sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))
                target = hub.root / repo_id
                for name in sent:
                    (target / name).parent.mkdir(parents=True, exist_ok=True)
                    (target / name).write_bytes((folder / name).read_bytes())
                hub.uploads.append((repo_id, sent))
                return types.SimpleNamespace(commit_url=f"local://{repo_id}")

        self.Api = Api


def test_push_to_hub_of_a_full_training_leaves_the_token_file_out_and_a_failure_is_one_line(
        tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    import huggingface_hub

    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.Api)
    config = tiny(tiny_model_dir, tiny_data, tmp_path, max_steps=2, push_to_hub=True, hub_token="hf_secret_value")
    output_dir = train(config)
    (repo, sent), = hub.uploads
    assert repo == "me/out" and "model.safetensors" in sent
    assert (output_dir / "training_args.bin").exists() and "training_args.bin" not in sent  # it holds the token

    def unreachable(*args, **kwargs):
        raise ConnectionError("no route to the hub")

    monkeypatch.setattr(hub.Api, "upload_folder", unreachable)
    with pytest.raises(InputError, match=r"the model is saved in .*out, but pushing it to out failed"):
        train(tiny(tiny_model_dir, tiny_data, tmp_path, name="out", max_steps=3, push_to_hub=True,
                   hub_token="hf_secret_value"))


def test_push_to_hub_sends_the_finished_merged_cast_model(tiny_model_dir, tiny_data, tmp_path, monkeypatch):
    import huggingface_hub
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.Api)
    config = tiny(tiny_model_dir, tiny_data, tmp_path, max_steps=4, save_strategy="steps", save_steps=2,
                  use_peft=True, lora_r=4, save_dtype="bfloat16", push_to_hub=True, hub_model_id="me/tiny-sftmix",
                  hub_token="hf_not_a_real_token")
    output_dir = train(config)
    assert [repo for repo, _ in hub.uploads] == ["me/tiny-sftmix"]  # once, at the end: no checkpoint, no adapter
    (_, sent), pushed = hub.uploads[0], tmp_path / "hub" / "me/tiny-sftmix"
    assert not [name for name in sent if name.startswith(("checkpoint-", "adapter/", ".sftmix"))]
    assert {"model.safetensors", "config.json", "README.md", "data_report.json", "launch.json"} <= set(sent)
    assert "SFTMix" in (pushed / "README.md").read_text()  # the card, written before the push
    model = AutoModelForCausalLM.from_pretrained(pushed)  # merged: loads as a plain model, in the cast dtype
    assert model.dtype == torch.bfloat16 and not any("lora" in name for name, _ in model.named_parameters())
    AutoTokenizer.from_pretrained(pushed)
    local = AutoModelForCausalLM.from_pretrained(output_dir)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), local.state_dict().values()))


def test_push_to_hub_without_a_token_or_a_hub_is_refused_at_start_up(capsys, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert "--push_to_hub needs a Hugging Face token" in refused(capsys, "train", "--push_to_hub", "true")
    hub = FakeHub(tmp_path / "hub", accept=False)
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.Api)
    line = refused(capsys, "train", "--push_to_hub", "true", "--hub_token", "hf_secret_value")
    assert "the hub did not accept the token" in line and "hf_secret_value" not in line
    assert "--push_to_hub is for `sftmix train`" in refused(capsys, "run", "--push_to_hub", "true")


# ------------------------------------------------------------------------------------------- --help


def test_help_puts_sftmix_first_and_says_what_sftmix_does(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0
    options = [line.split()[0].rstrip(",") for line in text.splitlines() if line.startswith("  --")]
    assert options.index("--confidence_path") < options.index("--adam_beta1")
    assert options.index("--mixup_alpha") < options.index("--logging_steps")
    assert "--packing" not in options and "--dataset_text_field" not in options  # refused: listed once, at the end
    assert "Refused" in text and "packing" in text.split("Refused", 1)[1]
    assistant = text.split("--assistant_only_loss", 1)[1].split("\n  --", 1)[0]
    assert "Always true in sftmix" in " ".join(assistant.split())


@pytest.mark.parametrize("overrides, message", [
    ({"loss_type": "ntp", "eval_packing": True}, "--eval_packing is not supported"),
    ({"accelerator_config": {"split_batches": True}}, "split_batches would cut each balanced"),
    ({"accelerator_config": '{"split_batches": true}'}, "split_batches would cut each balanced"),
    ({"parallelism_config": types.SimpleNamespace(tp_size=2)}, "--parallelism_config: tensor, context"),
])
def test_refusals_are_start_up_checks_of_the_config(overrides, message, tmp_path):
    with pytest.raises(InputError, match=message):
        SFTMixConfig(output_dir=str(tmp_path), **overrides)
    SFTMixConfig(output_dir=str(tmp_path), loss_type="ntp", accelerator_config={"split_batches": True})  # NTP: fine


def test_trl_command_line_spellings_still_parse(tmp_path, capsys, monkeypatch):
    """`--no_gradient_checkpointing` (TRL's parser has it), YAML merge keys, and Trainer's `--debug OPTION` beside
    sftmix's bare `--debug`."""
    config = cli._parse(SFTMixConfig, "sftmix train", ["--no_gradient_checkpointing", "--output_dir", str(tmp_path),
                                                       "--loss_type", "ntp"])
    assert config.activation_checkpointing is False
    (tmp_path / "merge.yaml").write_text("common: &common\n  split: train\ndatasets:\n"
                                         "  - {<<: *common, path: a.jsonl}\n  - {<<: *common, path: b.jsonl}\n")
    cli._check_yaml(str(tmp_path / "merge.yaml"), SFTMixConfig)
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, "train", "--debug", "underflow_overflow", "--packing", "true")
    assert "--packing is not supported" in line
