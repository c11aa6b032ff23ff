"""`sftmix run` end to end on the tiny model: outputs, stage skipping, kill-and-resume."""

import json

import pytest
import torch
from conftest import make_conversations, write_jsonl
from transformers import TrainerCallback

from sftmix.config import VARIANT_LOSS_TYPES, VARIANTS, RunConfig, SFTMixConfig, resolve_variants
from sftmix.errors import InputError
from sftmix.recipes.run import run
from sftmix.recipes.train import train

pytestmark = pytest.mark.integration  # launches, CLI subprocesses, end-to-end runs


def run_config(tmp_path, tiny_model_dir, data_path, name="run", **overrides):
    settings = dict(
        output_dir=str(tmp_path / name), model_name_or_path=str(tiny_model_dir), dataset_path=str(data_path),
        per_device_train_batch_size=4, learning_rate=1e-3, use_cpu=True, num_train_epochs=1, max_length=64,
        activation_checkpointing=False, disable_tqdm=True, eval_fraction=0.2, num_generations=3, max_new_tokens=4,
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
    metrics.pop("cost")
    return metrics


def test_run_writes_report_and_resumes_after_kill(tiny_model_dir, run_data, tmp_path):
    straight = run(run_config(tmp_path, tiny_model_dir, run_data, name="straight"))
    metrics = json.loads((straight / "metrics.json").read_text())
    report = (straight / "report.md").read_text()
    for png in ("loss_curves.png", "confidence.png"):
        assert (straight / png).stat().st_size > 5000
    assert metrics["data"] == {**metrics["data"], "train": 24, "heldout": 6}
    assert set(metrics["runs"]) == {"sftmix-seed5", "ntp-seed5"}
    confidence_lines = (straight / "dynamics" / "confidence.jsonl").read_text().splitlines()
    rows = {row["metric"]: row for row in metrics["table"]}
    heldout = rows["heldout response NLL"]
    assert heldout["sftmix_minus_ntp"] == pytest.approx(heldout["sftmix"] - heldout["ntp"])
    # the report's table shows the numbers of metrics.json
    diff = heldout["sftmix_minus_ntp"]
    row = f"| heldout response NLL | {heldout['ntp']:.4g} | {heldout['sftmix']:.4g} | {diff:.4g} |"
    assert row in report
    # the paired comparison uses the per-example files of the eval stage
    nll = {json.loads(line)["id"]: json.loads(line) for line in
           (straight / "eval" / "sftmix-seed5" / "nll-heldout.jsonl").read_text().splitlines()}
    comparison = next(r for r in metrics["comparisons"] if r["metric"] == "response NLL" and r["eval_set"] == "heldout")
    assert comparison["num_examples"] == len(nll) and comparison["estimate"] == pytest.approx(diff)
    assert "One seed: the intervals cover example noise only" in report
    spread = (straight / "eval" / "ntp-seed5" / "confidence_spread.jsonl").read_text().splitlines()
    assert len(spread) == len(confidence_lines)  # every training example, scored under the trained model
    assert "![loss curves](loss_curves.png)" in report and "Prompt 1." in report
    # the held-out examples were never trained on
    held_ids = {json.loads(line)["id"] for line in (straight / "data" / "heldout.jsonl").read_text().splitlines()}
    trained_ids = {json.loads(line)["id"] for line in confidence_lines}
    assert held_ids and not held_ids & trained_ids
    # each training evaluates the held-out split (once at the end: eval_strategy is "no")
    history = json.loads((straight / "sftmix-seed5" / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "eval_loss" in entry] == [history[-1]["step"]]
    outputs = json.loads((straight / "eval" / "sftmix-seed5" / "model_outputs.json").read_text())
    assert len(outputs) == 3 and outputs[0]["generator"] == "sftmix-seed5"
    # every variant warms up (warmup_steps 0.1 of 6 steps: 1): its first step runs at rate 0, its second at the peak
    for variant in ("ntp", "sftmix"):
        logged = [entry for entry in json.loads((straight / f"{variant}-seed5" / "trainer_state.json").read_text())[
            "log_history"] if "learning_rate" in entry]
        assert [entry["step"] for entry in logged[:2]] == [1, 2], variant
        assert [float(entry["learning_rate"]) for entry in logged[:2]] == pytest.approx([0.0, 1e-3]), variant
    # the recipe's cost: every stage's wall time and tokens, and SFTMix's overhead over NTP computed from them
    spent = {row["stage"]: row for row in metrics["cost"]["stages"]}
    assert set(spent) == {"Stage 1: reference run", "Stage 1: scoring", "train ntp-seed5", "train sftmix-seed5",
                          "evaluate ntp-seed5", "evaluate sftmix-seed5"}
    assert all(row["seconds"] > 0 and row["tokens"] > 0 for row in spent.values())
    reference = json.loads((straight / "dynamics" / "reference" / "reference.json").read_text())["cost"]
    assert spent["Stage 1: reference run"] == {"stage": "Stage 1: reference run", **reference}
    assert spent["Stage 1: scoring"]["passes"] == 4  # C = 4 checkpoints scored
    stage_one = spent["Stage 1: reference run"]["seconds"] + spent["Stage 1: scoring"]["seconds"]
    assert metrics["cost"]["overhead_vs_ntp_training"]["sftmix"] == pytest.approx(
        (stage_one + spent["train sftmix-seed5"]["seconds"]) / spent["train ntp-seed5"]["seconds"])
    assert "## Cost" in report and "SFTMix costs " in report

    config = run_config(tmp_path, tiny_model_dir, run_data, name="killed")
    with pytest.raises(KeyboardInterrupt):
        run(config, callbacks=[KillAt(4, "sftmix-seed5")])
    killed = tmp_path / "killed"
    assert (killed / "dynamics" / "stage.json").exists()
    assert (killed / "sftmix-seed5" / "checkpoint-4").exists() and not (killed / "sftmix-seed5" / "stage.json").exists()
    run(config)  # the same command again
    assert comparable(json.loads((killed / "metrics.json").read_text())) == comparable(metrics)


def test_unchanged_stages_are_skipped_and_changed_ones_rerun(tiny_model_dir, run_data, tmp_path, caplog, capsys):
    config = run_config(tmp_path, tiny_model_dir, run_data, variants=["sftmix"])
    run(config)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sftmix run")]
    assert [line.split(" (")[0] for line in lines[:-1]] == [
        "sftmix run [1/3] reference run and confidence split", "sftmix run [2/3] train sftmix-seed5",
        "sftmix run [3/3] evaluate sftmix-seed5"]
    assert lines[-1].startswith("sftmix run: all 3 stages done in")
    stamp = (tmp_path / "run" / "sftmix-seed5" / "model.safetensors").stat().st_mtime_ns
    caplog.clear()
    run(config)
    skipped = [r.getMessage() for r in caplog.records if "up to date" in r.getMessage()]
    assert len(skipped) == 4  # data, dynamics, sftmix training, eval
    assert (tmp_path / "run" / "sftmix-seed5" / "model.safetensors").stat().st_mtime_ns == stamp
    bookkeeping = run_config(tmp_path, tiny_model_dir, run_data, variants=["sftmix"], logging_steps=2, save_steps=3,
                             save_total_limit=1, eval_steps=5, report_to=[], run_name="again", disable_tqdm=False,
                             scoring_batch_tokens=300)
    caplog.clear()
    run(bookkeeping)  # logging, saving and reporting change no result: nothing is redone
    assert len([r for r in caplog.records if "up to date" in r.getMessage()]) == 4
    changed = run_config(tmp_path, tiny_model_dir, run_data, variants=["sftmix"], mixup_weight=0.5)
    caplog.clear()
    run(changed)
    skipped = [r.getMessage() for r in caplog.records if "up to date" in r.getMessage()]
    assert len(skipped) == 2  # data and dynamics do not depend on mu; training and eval rerun
    assert (tmp_path / "run" / "sftmix-seed5" / "model.safetensors").stat().st_mtime_ns != stamp
    report = (tmp_path / "run" / "report.md").read_text()
    assert "mu = 0.5" in report and "SFTMix - NTP" not in report and "No NTP baseline" in report


def test_without_a_mixing_variant_there_is_no_stage_1_and_mixup_settings_change_nothing(tiny_model_dir, run_data,
                                                                                         tmp_path, caplog):
    directory = run(run_config(tmp_path, tiny_model_dir, run_data, variants=["ntp"]))
    assert not (directory / "dynamics").exists()  # no reference run, no scoring pass
    metrics = json.loads((directory / "metrics.json").read_text())
    assert metrics["split"] is None and set(metrics["runs"]) == {"ntp-seed5"}
    assert "No confidence split" in (directory / "report.md").read_text()
    stamp = (directory / "ntp-seed5" / "model.safetensors").stat().st_mtime_ns
    caplog.clear()
    run(run_config(tmp_path, tiny_model_dir, run_data, variants=["ntp"], mixup_weight=0.5, mixup_alpha=0.3,
                   mixup_lambda_per="batch"))  # NTP reads no Mixup setting
    assert len([r for r in caplog.records if "up to date" in r.getMessage()]) == 3  # data, ntp, eval
    run(run_config(tmp_path, tiny_model_dir, run_data, variants=["ntp"], truncation="right"))
    assert (directory / "ntp-seed5" / "model.safetensors").stat().st_mtime_ns != stamp  # retrained


def test_run_refuses_resume_from_checkpoint(tiny_model_dir, run_data, tmp_path):
    """Every stage resumes from its own checkpoints: one checkpoint for the whole run would be the wrong one."""
    with pytest.raises(InputError, match="`sftmix run` resumes every stage from its own checkpoints"):
        run_config(tmp_path, tiny_model_dir, run_data, resume_from_checkpoint=str(tmp_path / "elsewhere"))


def test_official_scorer_is_a_stage_of_its_own(tiny_model_dir, run_data, tmp_path, monkeypatch):
    """A scorer failure, or a new judge setting, scores the same answers again: they are never generated again."""
    from test_eval import fake_alpaca_eval

    from sftmix import evaluation as ev

    call_log = fake_alpaca_eval(tmp_path, monkeypatch)
    monkeypatch.setenv("SFTMIX_JUDGE_API_KEY", "sk-test")
    prompts = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "tell me about the cat", "output": "a cat"},
                                                      {"instruction": "why is the sky blue", "output": "light"}])
    generated, generate = [], ev.generate_answers
    monkeypatch.setattr(ev, "generate_answers", lambda *args, **kw: generated.append(1) or generate(*args, **kw))
    settings = dict(variants=["ntp"], generation_prompts=str(prompts), num_generations=2, alpaca_eval_scorer="on",
                    judge_base_url="http://judge.invalid/v1")
    answers, scored = tmp_path / "run" / "eval" / "ntp-seed5" / "model_outputs.json", tmp_path / "run" / "metrics.json"
    monkeypatch.setenv("FAKE_ALPACA_EVAL_FAIL", "1")
    with pytest.raises(InputError, match="alpaca_eval failed"):
        run(run_config(tmp_path, tiny_model_dir, run_data, **settings))
    stamp = answers.stat().st_mtime_ns
    monkeypatch.delenv("FAKE_ALPACA_EVAL_FAIL")
    run(run_config(tmp_path, tiny_model_dir, run_data, **settings))  # the judge is back
    assert json.loads(scored.read_text())["runs"]["ntp-seed5"]["AlpacaEval 2 LC win rate (%)"] == 12.5
    run(run_config(tmp_path, tiny_model_dir, run_data, **settings, alpaca_eval_annotator="alpaca_eval_gpt4_turbo_fn"))
    options = dict(zip(*[iter(json.loads(call_log.read_text())["argv"][1:])] * 2))
    assert options["--annotators_config"] == "alpaca_eval_gpt4_turbo_fn"
    eval_metrics = tmp_path / "run" / "eval" / "ntp-seed5" / "metrics.json"
    assert json.loads(eval_metrics.read_text())["alpaca_eval"]["annotator"] == "alpaca_eval_gpt4_turbo_fn"
    assert generated == [1] and answers.stat().st_mtime_ns == stamp  # answered once, by the first run
    run(run_config(tmp_path, tiny_model_dir, run_data, **{**settings, "alpaca_eval_scorer": "off"}))
    assert "alpaca_eval" not in json.loads(eval_metrics.read_text())  # this run does not score: no stale score
    assert "AlpacaEval 2 LC win rate (%)" not in json.loads(scored.read_text())["runs"]["ntp-seed5"]
    assert generated == [1]


def test_several_seeds_report_mean_and_spread(tiny_model_dir, run_data, tmp_path):
    directory = run(run_config(tmp_path, tiny_model_dir, run_data, seeds=[1, 2], num_generations=1))
    metrics = json.loads((directory / "metrics.json").read_text())
    assert set(metrics["runs"]) == {"sftmix-seed1", "sftmix-seed2", "ntp-seed1", "ntp-seed2"}
    row = next(r for r in metrics["table"] if r["metric"] == "heldout response NLL")
    values = [metrics["runs"][f"sftmix-seed{s}"]["heldout response NLL"] for s in (1, 2)]
    assert row["sftmix"] == pytest.approx(sum(values) / 2)
    assert row["sftmix_std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    assert " ± " in (directory / "report.md").read_text()


def test_every_variant_trains_its_loss_on_the_same_data_and_settings(tiny_model_dir, run_data, tmp_path):
    references = write_jsonl(tmp_path / "refs.jsonl", make_conversations(8, seed=9))
    directory = run(run_config(tmp_path, tiny_model_dir, run_data, variants=list(VARIANTS), num_generations=1,
                               eval_datasets=[str(references)], eval_max_examples=5))
    metrics = json.loads((directory / "metrics.json").read_text())
    assert metrics["variants"] == ["ntp", "sftmix", "neftune", "equal", "mixup_only"]
    assert set(metrics["runs"]) == {f"{variant}-seed5" for variant in VARIANTS}
    stages = {v: json.loads((directory / f"{v}-seed5" / "stage.json").read_text())["inputs"] for v in VARIANTS}
    steps = set()
    for variant, inputs in stages.items():
        assert inputs["loss_type"] == VARIANT_LOSS_TYPES[variant]
        assert inputs["neftune_noise_alpha"] == (5.0 if variant == "neftune" else None)
        assert (inputs["confidence"] is None) == (variant in ("ntp", "neftune"))
        history = json.loads((directory / f"{variant}-seed5" / "trainer_state.json").read_text())
        steps.add(history["global_step"])
        assert any("mixup_loss" in entry for entry in history["log_history"]) == (variant not in ("ntp", "neftune"))
    shared = {key: value for key, value in stages["ntp"].items() if key not in ("loss_type", "neftune_noise_alpha",
                                                                                 "confidence", "confidence_path")}
    for inputs in stages.values():  # same data, seed, steps, optimiser... everything else
        assert {key: inputs[key] for key in shared} == shared
    assert len(steps) == 1
    comparisons = {(row["variant"], row["metric"], row["eval_set"]) for row in metrics["comparisons"]}
    assert comparisons == {(v, m, s) for v in VARIANTS[1:] for m, s in (("response NLL", "heldout"),
                                                                       ("response NLL", "refs"),
                                                                       ("confidence std", "train"))}
    # eval_max_examples cuts the reference sets (here to 5 records), never the held-out split
    assert len((directory / "eval" / "neftune-seed5" / "nll-refs.jsonl").read_text().splitlines()) == 5
    assert next(row for row in metrics["comparisons"] if row["eval_set"] == "refs")["num_examples"] == 5
    assert all(row["verdict"] in ("better", "worse", "no detectable difference", "lower (as in the paper)", "higher")
               for row in metrics["comparisons"])
    assert (directory / "differences.png").stat().st_size > 5000
    assert (directory / "data_map.png").stat().st_size > 5000


def test_variants_are_checked_and_loss_type_is_for_train():
    assert resolve_variants(["sftmix", "ntp", "sftmix"]) == ["sftmix", "ntp"]
    with pytest.raises(InputError, match="unknown variant"):
        resolve_variants(["ntp", "dro"])
    with pytest.raises(InputError, match="no variant to train"):
        RunConfig(output_dir="x", variants=[])
    with pytest.raises(InputError, match=r"--loss_type is for `sftmix train`; .* --variants ntp equal"):
        RunConfig(output_dir="x", loss_type="equal")
    with pytest.raises(InputError, match="neftune_noise_alpha"):
        RunConfig(output_dir="x", variants=["ntp", "neftune"], neftune_noise_alpha=0.0)
    # an odd batch is fine when nothing mixes, refused when a variant needs balanced batches
    RunConfig(output_dir="x", variants=["ntp", "neftune"], per_device_train_batch_size=3)
    with pytest.raises(InputError, match="even"):
        RunConfig(output_dir="x", variants=["ntp", "equal"], per_device_train_batch_size=3)


class CaptureEmbeddings(TrainerCallback):
    """Records (input ids, embedding output, embedding weight) of each training forward.

    Registered at on_train_begin, i.e. after Trainer.train() attached NEFTune's hook, so it sees
    the embedding output as the layers above it receive it.
    """

    def __init__(self):
        self.captured = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        def hook(module, inputs, output):
            if module.training:
                self.captured.append((inputs[0].clone(), output.detach().clone(), module.weight.detach().clone()))

        self.handle = model.get_input_embeddings().register_forward_hook(hook)

    def on_train_end(self, args, state, control, **kwargs):
        self.handle.remove()


@pytest.mark.parametrize("loss_type", ["ntp", "sftmix"])
def test_neftune_noise_reaches_the_patched_forward(tiny_model_dir, tiny_data, tmp_path, loss_type):
    """sftmix's forward calls self.base_model(...); NEFTune's embedding hook must still fire there."""
    captured = {}
    for alpha in (None, 5.0):
        capture = CaptureEmbeddings()
        config = SFTMixConfig(
            output_dir=str(tmp_path / f"{loss_type}-{alpha}"), model_name_or_path=str(tiny_model_dir),
            dataset_path=str(tiny_data[0]), confidence_path=str(tiny_data[1]), loss_type=loss_type, max_steps=2,
            per_device_train_batch_size=4, use_cpu=True, save_strategy="no", report_to=[], disable_tqdm=True,
            neftune_noise_alpha=alpha, max_length=64,
        )
        train(config, callbacks=[capture])
        captured[alpha] = capture.captured
    for alpha, forwards in captured.items():
        assert len(forwards) == 2  # one training forward per step, through the patched forward
        for input_ids, output, weight in forwards:
            noise = output - weight[input_ids]  # minus the no-noise embedding lookup
            if alpha is None:
                assert torch.equal(noise, torch.zeros_like(noise))
            else:  # NEFTune: uniform noise in +-alpha / sqrt(L * d)
                bound = alpha / (output.size(1) * output.size(2)) ** 0.5
                assert noise.abs().max() > bound / 2 and noise.abs().max() <= bound + 1e-6
