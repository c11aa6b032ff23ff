"""Recipes: the explicit sequence of steps behind each CLI command.

    train(config):     model + tokenizer -> dataset -> confidence split -> SFTMixTrainer -> saved model
    dynamics(config):  dataset -> NTP reference run with C checkpoints (or given checkpoints)
                       -> response NLL per example and checkpoint -> confidence -> split -> files
    evaluate(config):  held-out / reference NLL -> generations -> confidence spread -> metrics.json
    run(config):       held-out split -> dynamics -> each variant x seed (ntp, sftmix, neftune, ...) -> eval
                       -> judge -> report with intervals against NTP,
                       each stage in its own folder, skipped when its inputs and config are unchanged
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers.trainer_utils import SaveStrategy

from . import distributed, keys
from . import dynamics as dyn
from .confidence import CheckpointScores, confidence_rows, summarise
from .config import (
    VARIANT_LOSS_TYPES,
    DynamicsConfig,
    EvalConfig,
    RunConfig,
    SFTMixConfig,
)
from .data import (
    DataReport,
    DatasetSpec,
    build_dataset,
    load_prompts,
    mix_records,
    read_confidence,
    spec_records,
    write_records,
)
from .errors import InputError
from .files import (
    OutputLock,
    checkpoint_damage,
    file_hash,
    jsonl_text,
    model_identity,
    newest_complete_checkpoint,
    out_of_space,
    refuse_writing_over_inputs,
    strip_training_state,
    write_atomic,
    write_jsonl,
)
from .hub import push_output_dir
from .model import (
    check_loadable,
    check_model_path,
    check_vocabulary,
    convert_saved_dtype,
    device_memory,
    inference_dtype,
    load_model,
    load_tokenizer,
    loadable_checkpoint,
    merge_adapter,
    model_revision,
    resolve_model_path,
    whole_copy_bytes,
)
from .trainer import SFTMixTrainer, check_ids_match, training_cost, write_model_card

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Everything a stage needs before a trainer exists."""

    model_path: str
    tokenizer: Any
    dataset: Any  # datasets.Dataset with id, input_ids, labels
    report: DataReport


def resolve_datasets(config: SFTMixConfig, with_test: bool = True) -> None:
    """Turn `trl sft`'s dataset arguments into paths: `config.dataset_path` (and `eval_dataset_path`).

    A local file stays as it is, and so does a hub name without a configuration (read later by
    `load_records`). A dataset directory, a hub dataset with `dataset_config`, or a `datasets:`
    mixture is read with `datasets` and written by rank 0 as one JSONL file in the cache, named by
    the arguments that made it (`data.write_records`; a mixture's test split also by its seed), so
    every stage and rank reads the same file. With `with_test`, --eval_strategy and no
    --eval_dataset_path, the test split (`dataset_test_split`, or `test_split_size` of a mixture)
    becomes the evaluation set, as in `trl sft`; `sftmix run` passes with_test=False (it holds out
    its own split).
    """
    config.dataset_path, config.eval_dataset_path = distributed.on_main(_resolved_paths, config, with_test)


def _resolved_paths(config: SFTMixConfig, with_test: bool) -> tuple[str | None, str | None]:
    train_path, eval_path = config.dataset_path, config.eval_dataset_path
    wants_eval = with_test and config.eval_strategy != "no" and eval_path is None
    if config.datasets:
        try:
            specs = [DatasetSpec(**entry) for entry in config.datasets]
        except TypeError as err:
            raise InputError(f"datasets: each entry takes the keys of TRL's DatasetConfig ({err})") from err
        records = mix_records([spec_records(spec) for spec in specs], [spec.fraction for spec in specs])
        train_part, test_part = _split_off_test(records, config.test_split_size, config.seed)
        # the test split is drawn with the seed: jobs with other seeds sharing the cache need their own files
        made_by = [config.datasets, config.test_split_size, config.seed if test_part else None]
        train_path = str(write_records(train_part, [*made_by, "train"]))
        if test_part and wants_eval:
            eval_path = str(write_records(test_part, [*made_by, "test"]))
        return train_path, eval_path
    if train_path is None or (Path(train_path).is_file() and config.dataset_config is None):
        return train_path, eval_path
    source = train_path
    if Path(source).is_dir() or config.dataset_config is not None:
        spec = DatasetSpec(source, name=config.dataset_config, split=config.dataset_split)
        train_path = str(write_records(spec_records(spec), vars(spec)))
    if wants_eval:
        test = DatasetSpec(source, name=config.dataset_config, split=config.dataset_test_split)
        eval_path = str(write_records(spec_records(test), vars(test)))
    return train_path, eval_path


def _split_off_test(records: list, size: float | None, seed: int) -> tuple[list, list]:
    """(train, test): `size` records (a share if < 1) drawn with `seed`, file order kept in both."""
    if not size:
        return records, []
    count = round(size * len(records)) if size < 1 else int(size)
    if count >= len(records):
        raise InputError(f"test_split_size {size} takes {count} of the mixture's {len(records)} records for the test "
                         "split, leaving none to train on: use a smaller share or count")
    chosen = set(random.Random(seed).sample(range(len(records)), count))
    return ([r for i, r in enumerate(records) if i not in chosen], [r for i, r in enumerate(records) if i in chosen])


def prepare(config: SFTMixConfig) -> Prepared:
    # Rank 0 converts the default model and fills the tokenisation cache; the other ranks then read them.
    model_path = distributed.main_first(resolve_model_path, config.model_name_or_path)
    tokenizer = load_tokenizer(model_path, config.trust_remote_code, config.chat_template_path, config.eos_token,
                               model_revision(config))
    dataset, report = distributed.main_first(
        build_dataset, config.dataset_path, tokenizer, config.max_length, config.max_examples, config.dataset_split,
        config.truncation,
    )
    logger.warning("Data: %s", report.summary())
    return Prepared(model_path, tokenizer, dataset, report)


def build_trainer(
    config: SFTMixConfig, prepared: Prepared, groups=None, callbacks=None, record_nll=False, eval_dataset=None
):
    return SFTMixTrainer(
        prepared.model_path,
        args=config,
        train_dataset=prepared.dataset,
        eval_dataset=eval_dataset,
        processing_class=prepared.tokenizer,
        groups=groups,
        callbacks=callbacks,
        record_nll=record_nll,
    )


TRAINING_KEY = "training_key.json"  # in output_dir: what made its checkpoints (see `training_key`)


def resume_checkpoint(config: SFTMixConfig, key: dict | None = None, also_needs: tuple[str, ...] = ()) -> str | None:
    """The checkpoint to resume from: the one asked for, else the newest complete one in output_dir
    (that also holds the `also_needs` files).

    With `key` (`training_key`), checkpoints found in output_dir are resumed only when the key
    recorded beside them is this one (bookkeeping settings may change); else the command is refused,
    naming what changed. The key is then recorded for the next resume. An explicit
    --resume_from_checkpoint is the user's choice: the key is not checked, the `also_needs` files are.
    """
    checkpoint = config.resume_from_checkpoint
    if checkpoint is not None:
        damage = checkpoint_damage(Path(checkpoint))
        if damage:
            raise InputError(f"--resume_from_checkpoint {checkpoint}: damaged ({damage}); resume from an older "
                             "checkpoint, or leave the option out to resume from the newest undamaged one")
        missing = [name for name in also_needs if not (Path(checkpoint) / name).exists()]
        if missing:
            raise InputError(f"--resume_from_checkpoint {checkpoint}: it holds no {', '.join(missing)}, which this "
                             "run needs to resume; leave the option out to resume from the newest checkpoint that "
                             "has it")
    else:
        checkpoint = newest_complete_checkpoint(config.output_dir, also_needs)
        if checkpoint and key is not None:
            check_same_training(Path(config.output_dir), key)
        if checkpoint:
            logger.warning("Resuming from %s", checkpoint)
    if key is not None:
        write_atomic(Path(config.output_dir) / TRAINING_KEY, json.dumps(key, indent=1))
    return checkpoint


def check_same_training(output_dir: Path, key: dict) -> None:
    """Refuse to resume checkpoints that a training with other settings (or an unrecorded one) wrote."""
    recorded_file = output_dir / TRAINING_KEY
    recorded = json.loads(recorded_file.read_text()) if recorded_file.exists() else None
    if recorded == key:
        return
    changes = (keys.key_changes(recorded, key) if recorded is not None
               else f"no {TRAINING_KEY}: written by an older sftmix or another tool")
    raise InputError(
        f"{output_dir} holds checkpoints of a training with other settings ({changes}); they are not resumed: "
        f"use another --output_dir, or delete {output_dir}/checkpoint-* to train afresh there (or pass "
        "--resume_from_checkpoint to resume one of them anyway)"
    )


def claims_output_dir(recipe):
    """Run `recipe(config, ...)` holding `config.output_dir`: refused at once when it cannot be written, or when
    another sftmix run holds it (rank 0 takes the lock; the OS frees it when the process ends, however)."""

    @functools.wraps(recipe)
    def claimed(config, *args, **kwargs):
        refuse_writing_over_inputs(_outputs(config), {f"--{name}": getattr(config, name) for name in INPUT_PATHS
                                                      if hasattr(config, name)})
        lock = OutputLock(config.output_dir)
        distributed.on_main(lock.acquire)
        try:
            return recipe(config, *args, **kwargs)
        except Exception as err:
            reason = None if isinstance(err, InputError) else out_of_space(err, config.output_dir)
            if reason is None:
                raise
            # Every write is atomic and incomplete checkpoints are never resumed, so a rerun loses nothing.
            raise InputError(f"{config.output_dir}: the disk is full ({reason}); free space and rerun the same "
                             "command: it resumes from the last complete checkpoint and keeps finished "
                             "results") from err
        finally:
            lock.release()

    return claimed


# Config fields that name files or folders a command reads: no output may be one of them.
INPUT_PATHS = ("model_name_or_path", "model", "dataset_path", "dataset", "confidence_path", "confidence_dataset",
               "eval_dataset_path", "eval_datasets", "checkpoints", "prompts", "generation_prompts",
               "mt_bench_questions", "chat_template_path", "alpaca_eval_reference")


def _outputs(config) -> dict[str, Path]:
    """What a command writes that could be one of its inputs: its folder, and the files it makes there that a user
    may pass back to it (a run's data split, a dynamics run's confidence file)."""
    output_dir = Path(config.output_dir)
    files = {RunConfig: ["data/train.jsonl", "data/heldout.jsonl"], DynamicsConfig: ["confidence.jsonl"]}
    return {"--output_dir": output_dir, **{f"--output_dir's {name}": output_dir / name
                                           for name in files.get(type(config), [])}}


# --------------------------------------------------------------------------- train


@claims_output_dir
def train(config: SFTMixConfig, callbacks: list | None = None) -> Path:
    """Train with `config.loss_type` and save a `from_pretrained`-loadable model in `config.output_dir`.

    Resumes from the newest checkpoint in `output_dir` when there is one, made with the same settings
    (`resume_checkpoint`). The model is saved before the final evaluation.
    """
    if config.loss_type != "ntp" and config.confidence_path is None:
        raise InputError(
            f"--loss_type {config.loss_type} needs --confidence_path: first run `sftmix dynamics "
            "--output_dir dyn` on the same model and data, then pass --confidence_path dyn/confidence.jsonl "
            "(or train the plain baseline with --loss_type ntp)"
        )
    resolve_datasets(config)
    prepared = prepare(config)
    eval_dataset = prepare_eval(config, prepared.tokenizer)
    groups = None
    if config.loss_type != "ntp":
        groups = read_confidence(config.confidence_path)
        check_same_data(config.confidence_path, prepared, groups)
    checkpoint = distributed.on_main(resume_checkpoint, config, keys.training_key(config, prepared))
    trainer = build_trainer(config, prepared, groups=groups, callbacks=callbacks, eval_dataset=eval_dataset)
    trainer.train(resume_from_checkpoint=checkpoint)
    output_dir = Path(config.output_dir)
    _save(trainer, config, output_dir, prepared.model_path)  # first: a kill or a NaN in the evaluation loses nothing
    if eval_dataset is not None and config.eval_strategy == "no":
        trainer.evaluate()  # no evaluation during training was asked for: once, at the end
    trainer.save_state()  # trainer_state.json: the loss curves of the report
    distributed.on_main(write_atomic, output_dir / "data_report.json",
                        json.dumps(vars(prepared.report), indent=2, default=str))
    launch = distributed.describe_launch(trainer.model_wrapped, trainer.model)
    distributed.on_main(write_atomic, output_dir / "launch.json", json.dumps(launch, indent=2))
    trainer.accelerator.free_memory()  # `run` trains several models in one process
    if config.push_to_hub:  # last: the directory is final (merged, cast, with its card and tokenizer)
        distributed.on_main(push_output_dir, output_dir, config)
    return output_dir


def prepare_eval(config: SFTMixConfig, tokenizer):
    """The tokenised --eval_dataset_path, or None; evaluation asked for without a set is an error."""
    if config.eval_dataset_path is None:
        if config.eval_strategy != "no":
            raise InputError(f"--eval_strategy {config.eval_strategy} needs an evaluation set: --eval_dataset_path "
                             "FILE (any supported format)")
        return None
    dataset, report = distributed.main_first(build_dataset, config.eval_dataset_path, tokenizer, config.max_length,
                                             split=config.dataset_split, truncation=config.truncation)
    logger.warning("Eval data: %s", report.summary())
    return dataset


def check_same_data(confidence_path: str, prepared: Prepared, groups: dict[str, str]) -> None:
    """Refuse a confidence file made from other data: its dynamics.json records the data's fingerprint.

    The records' fingerprint (ids and messages of every record read, before any tokenizer drops
    an example) is compared when dynamics.json has it, so a reference model with another
    tokenizer or max_length (weak-to-strong) passes; older files record only the kept examples'.
    Confidence ids with no example here are then ignored and counted in data_report.json.
    """
    produced_by = Path(confidence_path).with_name("dynamics.json")
    if produced_by.exists():
        try:
            recorded_run = json.loads(produced_by.read_text(encoding="utf-8"))
            dataset = recorded_run.get("dataset", {}) if isinstance(recorded_run, dict) else None
            if not isinstance(dataset, dict):
                raise ValueError("not the mapping sftmix writes")
        except ValueError as err:  # not JSON, not UTF-8, or not the mapping sftmix writes
            raise InputError(f"{produced_by}: damaged ({type(err).__name__}); it records which data "
                             f"{Path(confidence_path).name} was made from: re-run `sftmix dynamics`, or move it away "
                             "to train without that check") from None
        # the records in any order (reordering changes no example), else in file order (files of older sftmix)
        name = next((key for key in ("unordered_fingerprint", "source_fingerprint", "fingerprint")
                     if dataset.get(key)), None)
        recorded = dataset.get(name) if name else None
        current = getattr(prepared.report, name) if name else None
        if recorded and recorded != current:
            differing = len(set(groups) ^ set(prepared.dataset["id"]))
            raise InputError(
                f"the dataset changed since `sftmix dynamics` wrote {confidence_path} ({name} {recorded}, now "
                f"{current}): {differing} ids differ"
                + ("" if differing else " (the same ids, other content)")
                + ". Re-run `sftmix dynamics` on this dataset (with the same max_examples)."
            )
    unused = check_ids_match(prepared.dataset["id"], groups)
    prepared.report.unused_confidence_ids = unused
    if unused:
        logger.warning("%d ids of %s have no example in this dataset (dropped by this tokenizer or max_length): "
                       "ignored", unused, confidence_path)


def _save(trainer: SFTMixTrainer, config: SFTMixConfig, output_dir: Path, base_model_path: str) -> None:
    """Full weights (LoRA merged in) that `AutoModelForCausalLM.from_pretrained(output_dir)` loads, checked.

    The weights are saved as trained (float32 master weights by default, as TRL saves them; a LoRA
    adapter is merged into the base loaded in float32, quantised or not); `--save_dtype` casts the
    saved files afterwards.
    """
    if config.use_peft:
        trainer.save_model(str(output_dir / "adapter"))  # every rank: gathers the adapter under sharded engines
        distributed.on_main(merge_adapter, base_model_path, output_dir / "adapter", output_dir,
                            config.trust_remote_code, model_revision(config))
        distributed.on_main(trainer.processing_class.save_pretrained, str(output_dir))
    else:
        trainer.save_model(str(output_dir))
    distributed.on_main(check_loadable, output_dir)
    if config.save_dtype is not None:
        distributed.on_main(convert_saved_dtype, output_dir, config.save_dtype)
    distributed.on_main(write_model_card, output_dir, config)


# --------------------------------------------------------------------------- dynamics


@claims_output_dir
def dynamics(config: DynamicsConfig, callbacks: list | None = None) -> Path:
    """Write confidence.jsonl, dynamics.json and confidence.png to `config.output_dir`.

    Every finished piece is on disk (reference checkpoints, one scores file per
    checkpoint), so re-running the same command after a kill resumes where it stopped.
    Under a launcher every rank trains, every rank scores its share of the examples at
    each checkpoint, and rank 0 writes the files.
    """
    output_dir = Path(config.output_dir)
    for checkpoint in config.checkpoints or []:
        check_model_path(checkpoint, "--checkpoints")
    if config.checkpoints and config.model_name_or_path is None:
        # the checkpoints' own tokenizer (Trainer saves it in each one), not the embedded default's
        config.model_name_or_path = config.checkpoints[0]
        logger.warning("Tokenising with the tokenizer of %s (no --model_name_or_path)", config.checkpoints[0])
    resolve_datasets(config, with_test=False)  # the reference run is not evaluated
    prepared = prepare(config)
    sharded = not config.online and sharded_scoring(config, prepared.model_path)
    scoring_layout = {"sharded": sharded}
    ids = prepared.dataset["id"]
    check_split_counts(len(ids), config.split_ratio)
    key = keys.dynamics_key(config, prepared)  # what determines the results: stale ones are redone or refused
    distributed.on_main(dyn.clear_stale, output_dir, key)
    checkpoints, online_records, reference_cost = config.checkpoints, None, None
    if not checkpoints:
        checkpoints, online_records, reference_cost = _reference_run(config, prepared, callbacks)
    if config.online:
        scores = dyn.online_scores(online_records, ids)
        for score in scores:
            dyn.check_scores(score, ids)
    else:
        scores_dir = output_dir / "scores"
        scores = [
            _checkpoint_scores(config, prepared, checkpoint, scores_dir / f"{k:02d}-{Path(checkpoint).name}.json",
                               sharded, scoring_layout)
            for k, checkpoint in enumerate(checkpoints)
        ]
    rows = confidence_rows(ids, scores, config.split_ratio)
    tokens = sum(len(row) for row in prepared.dataset["input_ids"])
    cost = {"reference run": reference_cost,  # None: given checkpoints (not trained here)
            "scoring": None if config.online else {"seconds": sum(score.seconds for score in scores),
                                                   "tokens": tokens * len(scores), "passes": len(scores),
                                                   **scoring_layout}}
    distributed.on_main(_write_dynamics_outputs, config, prepared, scores, rows, key, cost)
    return output_dir


def check_split_counts(count: int, split_ratio: float) -> None:
    """Both groups must be non-empty for this many examples, or SFTMix has nothing to pair (refused before training)."""
    confident = int(count * split_ratio)
    if count < 2:
        raise InputError(f"the data has {count} usable example(s); the confidence split needs at least 2 (one "
                         "confident, one unconfident): use more data (check max_examples and max_length)")
    if confident < 1 or confident >= count:
        raise InputError(
            f"split_ratio {split_ratio} over {count} examples gives {confident} confident and {count - confident} "
            f"unconfident examples; both groups need at least one: use a split_ratio in "
            f"[{1 / count:.3g}, {(count - 1) / count:.3g}] (0.5 is the paper's median split)"
        )


def _write_dynamics_outputs(config: DynamicsConfig, prepared: Prepared, scores: list, rows: list[dict],
                            key: dict, cost: dict) -> None:
    """confidence.jsonl, dynamics.json (what produced it + distribution summary) and confidence.png."""
    output_dir = Path(config.output_dir)
    write_jsonl(output_dir / "confidence.jsonl", rows)
    write_atomic(output_dir / "dynamics.json", json.dumps({
        "model": prepared.model_path,
        "tokenizer": getattr(prepared.tokenizer, "name_or_path", None),
        "checkpoints": [score.checkpoint for score in scores],
        "online": config.online,
        "dataset": {"path": config.dataset_path or "embedded ShareGPT V3", "fingerprint": prepared.report.fingerprint,
                    "source_fingerprint": prepared.report.source_fingerprint,
                    "unordered_fingerprint": prepared.report.unordered_fingerprint,
                    "max_length": config.max_length, "max_examples": config.max_examples,
                    "report": vars(prepared.report) | {"dropped_no_supervised_tokens":
                                                        len(prepared.report.dropped_no_supervised_tokens)}},
        "split_ratio": config.split_ratio,
        "processes": distributed.world_size(),
        "summary": summarise(rows),
        "cost": cost,  # wall time and tokens of the reference run and the scoring passes
        "key": key,
    }, indent=2))
    dyn.plot_confidence(rows, output_dir / "confidence.png", title=f"SFTMix confidence ({len(rows)} examples)")
    if len(scores) > 1:  # variability needs two perplexities per example (online over one epoch has one)
        dyn.plot_data_map(rows, output_dir / "data_map.png",
                          title=f"Data map ({len(rows)} examples, {len(scores)} checkpoints)")
    else:
        (output_dir / "data_map.png").unlink(missing_ok=True)  # a stale one from an earlier run would mislead


def _reference_run(config: DynamicsConfig, prepared: Prepared, callbacks) -> tuple[list[str], dict | None, dict]:
    """NTP-train the reference model for C evenly spaced checkpoints (skipped when already done).

    Only those C checkpoints are saved (not every `save_steps`), and each keeps only its weights (what
    scoring reads) once a newer one can be resumed from: optimizer, scheduler and engine states (for an
    8B model, 64 GB of Adam states per checkpoint) go, the last one's when the run is done.
    """
    reference = copy.deepcopy(config)
    reference.output_dir = str(Path(config.output_dir) / "reference")
    reference.eval_strategy = "no"  # the reference run only provides training dynamics
    reference.save_strategy = SaveStrategy.NO  # SaveEvenlySpaced saves the C checkpoints
    reference.save_total_limit = None  # all C checkpoints are scored
    done = Path(reference.output_dir) / "reference.json"
    finished = distributed.on_main(lambda: json.loads(done.read_text()) if done.exists() else None)
    if finished is not None:
        distributed.on_main(_keep_weights_only, finished["checkpoints"])  # a kill may have come before
        return finished["checkpoints"], finished.get("online_nll"), finished.get("cost")
    spacing = dyn.SaveEvenlySpaced(config.num_checkpoints)
    trainer = build_trainer(reference, prepared, callbacks=[spacing, *(callbacks or [])], record_nll=config.online)
    # Online: a kill between a checkpoint and its NLL records; resume from the newest checkpoint that has them.
    resumable_needs = (dyn.SaveOnlineNLL.FILE,) if config.online else ()
    checkpoint = distributed.on_main(resume_checkpoint, reference, also_needs=resumable_needs)
    if config.online:
        trainer.add_callback(dyn.SaveOnlineNLL(trainer))
        trainer.online_nll.update(distributed.on_main(dyn.SaveOnlineNLL.load, checkpoint))
    trainer.add_callback(dyn.KeepWeightsOnly(resumable_needs))  # last: after the checkpoint is whole
    trainer.train(resume_from_checkpoint=checkpoint)
    online = dyn.gather_online_nll(trainer) if config.online else None
    checkpoints = [str(Path(reference.output_dir) / f"checkpoint-{step}") for step in sorted(spacing.steps)]
    trainer.accelerator.free_memory()  # the scoring passes load each checkpoint afresh
    cost = training_cost(trainer.state.log_history)
    distributed.on_main(write_atomic, done, json.dumps({"checkpoints": checkpoints, "online_nll": online,
                                                        "cost": cost}))
    distributed.on_main(_keep_weights_only, checkpoints)  # after reference.json: never resumed from again
    return checkpoints, online, cost


def _keep_weights_only(checkpoints: list[str]) -> None:
    for checkpoint in checkpoints:
        if Path(checkpoint).is_dir():
            strip_training_state(Path(checkpoint))


def _inference_model(path: str, config, dtype: str, device, sharded: bool):
    """(model, engine) for scoring and evaluation: a whole copy on this rank (engine None), or, `sharded`, the model
    partitioned over the ZeRO-3 job as it loads (each rank keeps 1/N of every weight) and its inference engine."""
    if not sharded:
        with distributed.unpartitioned_loading():
            return load_model(path, config.trust_remote_code, dtype=dtype,
                              attn_implementation=config.attn_implementation).to(device), None
    with distributed.partitioned_loading(path, dtype):
        model = load_model(path, config.trust_remote_code, dtype=dtype, attn_implementation=config.attn_implementation)
    engine = distributed.zero3_inference(model)
    return engine.module, engine


def sharded_scoring(config, model_path: str) -> bool:
    """Whether to score with the parameters partitioned over a ZeRO-3 job: as asked, else only when a whole copy
    would not fit one device; a model that fits no way is refused before any work."""
    if config.sharded_scoring and not distributed.zero3_launch():
        raise InputError("--sharded_scoring true needs a DeepSpeed ZeRO-3 launch, which partitions the model over "
                         "the processes: accelerate launch --config_file configs/accelerate/zero3.yaml ...")
    if config.sharded_scoring is not None:
        return config.sharded_scoring
    device = distributed.device(config.use_cpu)
    needed, available = whole_copy_bytes(model_path, inference_dtype(device)), device_memory(device)
    if needed is None or needed <= 0.8 * available:  # room left for activations
        return False
    if distributed.zero3_launch():
        distributed.on_main(logger.warning, "Scoring with sharded parameters: a whole copy of %s (%.1f GiB) would "
                            "not fit one device (%.1f GiB)", model_path, needed / 2**30, available / 2**30)
        return True
    raise InputError(
        f"{model_path}: a whole copy of the model ({needed / 2**30:.1f} GiB in {inference_dtype(device)}) does not "
        f"fit one device ({available / 2**30:.1f} GiB) to be scored: launch with a DeepSpeed ZeRO-3 config "
        "(configs/accelerate/zero3.yaml), which scores it with its parameters sharded over the processes")


def _checkpoint_scores(config: DynamicsConfig, prepared: Prepared, checkpoint: str, path: Path,
                       sharded: bool = False, scoring_layout: dict | None = None):
    """One checkpoint's response NLL of every example: each rank scores its share, rank 0 saves the whole."""
    key = keys.scores_key(checkpoint, config, prepared)
    saved = distributed.on_main(dyn.load_scores, path, key)
    if saved is not None:
        return saved
    # Sharded checkpoints (FSDP's default, ZeRO without 16-bit gathering) are merged once, by rank 0.
    weights = distributed.on_main(loadable_checkpoint, checkpoint, prepared.model_path,
                                  Path(config.output_dir) / "consolidated")
    device = distributed.device(config.use_cpu)
    model, engine = _inference_model(weights, config, inference_dtype(device), device, sharded)
    check_vocabulary(model, prepared.tokenizer, checkpoint)
    # The largest share of the weights one rank holds (1 for whole copies; 1/N when partitioned), for dynamics.json
    held = max(distributed.gather(sum(getattr(p, "ds_tensor", p).numel() for p in model.parameters())))
    if scoring_layout is not None:
        scoring_layout["share_of_weights_per_rank"] = held / sum(getattr(p, "ds_numel", p.numel())
                                                                 for p in model.parameters())
    started = time.perf_counter()
    nll_sum, num_tokens = dyn.score_model(
        model, prepared.dataset, config.scoring_batch_tokens, prepared.tokenizer.pad_token_id,
        desc=f"Scoring {Path(checkpoint).name}", sharded=sharded,
    )
    scores = CheckpointScores(str(checkpoint), nll_sum, num_tokens, time.perf_counter() - started)
    distributed.on_main(dyn.check_scores, scores, prepared.dataset["id"])
    distributed.on_main(dyn.save_scores, path, scores, key)
    return scores


# --------------------------------------------------------------------------- eval


@claims_output_dir
def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Score, generate and diagnose one model; writes metrics.json (+ outputs) to `config.output_dir`.

    Under a launcher every rank scores and answers its share; rank 0 writes the files.
    """
    from . import evaluation as ev

    started, scored_tokens = time.perf_counter(), 0
    tokenizer = load_tokenizer(config.model, config.trust_remote_code, config.chat_template_path, option="--model")
    device = distributed.device(config.use_cpu)
    sharded = sharded_scoring(config, config.model)
    model, engine = _inference_model(config.model, config, config.dtype or inference_dtype(device), device, sharded)
    check_vocabulary(model, tokenizer, config.model)
    metrics: dict[str, Any] = {"model": config.model, "likelihood": {}}
    files: dict[str, Any] = {}  # file name -> rows, written by rank 0 at the end
    for path, name in zip(config.dataset or [], ev.set_names(config.dataset or [])):
        dataset, _ = distributed.main_first(build_dataset, path, tokenizer, config.max_length, config.max_examples)
        scored_tokens += sum(len(row) for row in dataset["input_ids"])
        result = ev.response_perplexity(model, dataset, tokenizer.pad_token_id, config.scoring_batch_tokens,
                                        desc=f"NLL {name}", sharded=sharded)
        files[f"nll-{name}.jsonl"] = result.pop("per_example")
        metrics["likelihood"][name] = result | {"path": str(path)}
    if config.prompts:
        metrics["generation"] = _generate(config, model, tokenizer, files, sharded)
    if config.mt_bench_questions:
        metrics["mt_bench"] = _answer_mt_bench(config, model, tokenizer, files, sharded)
    if config.confidence_dataset:
        dataset, _ = distributed.main_first(build_dataset, config.confidence_dataset, tokenizer, config.max_length,
                                            config.confidence_max_examples)
        scored_tokens += sum(len(row) for row in dataset["input_ids"])
        spread = ev.confidence_spread(model, dataset, tokenizer.pad_token_id, config.scoring_batch_tokens,
                                      sharded=sharded)
        files["confidence_spread.jsonl"] = spread.pop("per_example")
        metrics["confidence"] = spread
    # what the evaluation cost (the official scorer, a remote judge, is not counted)
    metrics["cost"] = {"seconds": round(time.perf_counter() - started, 3), "tokens": scored_tokens,
                       "sharded": sharded}
    del engine  # the partitioned model's engine lives as long as the model is used
    output_dir = Path(config.output_dir)
    distributed.on_main(_write_eval_outputs, output_dir, metrics, files)
    if config.official_scorer:  # decided by the config; the answers and every other number are on disk first
        metrics["alpaca_eval"] = distributed.on_main(_official_score, config, output_dir / "model_outputs.json",
                                                     output_dir / "alpaca_eval", _generator(config))
        distributed.on_main(write_atomic, output_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def _official_score(config: EvalConfig | RunConfig, model_outputs: Path, output_dir: Path, name: str) -> dict[str, Any]:
    """The official AlpacaEval 2 score of `model_outputs` with the config's annotator, reference and judge."""
    from . import evaluation as ev

    return ev.run_alpaca_eval(model_outputs, output_dir, name, config.alpaca_eval_annotator,
                              config.alpaca_eval_reference, config.judge_base_url, config.judge_api_key_env)


def _generator(config: EvalConfig) -> str:
    """The name the answers are filed under (model_outputs.json, MT-Bench answers, the leaderboard)."""
    return config.generator or Path(config.model).name


def _answer_mt_bench(config: EvalConfig, model, tokenizer, files: dict[str, Any], sharded: bool) -> dict[str, Any]:
    """FastChat MT-Bench answers (model_answer format), every turn answered greedily in order."""
    from . import evaluation as ev

    questions = load_prompts(config.mt_bench_questions)
    answers = ev.generate_answers(model, tokenizer, [q["turns"] for q in questions], config.max_new_tokens,
                                  config.batch_size, desc="MT-Bench", sharded=sharded)
    files["mt_bench_answers.jsonl"] = ev.mt_bench_answers(questions, answers, _generator(config))
    return {"questions": len(questions), "turns": sum(len(q["turns"]) for q in questions)}


def _generate(config: EvalConfig, model, tokenizer, files: dict[str, Any], sharded: bool) -> dict[str, Any]:
    """Answers in AlpacaEval format, and in MT-Bench format when a prompt has several turns."""
    from . import evaluation as ev

    prompts = load_prompts(config.prompts, config.num_generations)
    answers = ev.generate_answers(model, tokenizer, [p["turns"] for p in prompts], config.max_new_tokens,
                                  config.batch_size, sharded=sharded)
    generator = _generator(config)
    files["model_outputs.json"] = ev.alpaca_eval_outputs(prompts, answers, generator)
    if any(len(p["turns"]) > 1 for p in prompts) and not config.mt_bench_questions:
        files["mt_bench_answers.jsonl"] = ev.mt_bench_answers(prompts, answers, generator)
    return {"prompts": len(prompts), "mean_answer_words": sum(len(a[0].split()) for a in answers) / len(answers)}


def _write_eval_outputs(output_dir: Path, metrics: dict[str, Any], files: dict[str, Any]) -> None:
    for name, rows in files.items():
        if name.endswith(".jsonl"):
            write_jsonl(output_dir / name, rows)
        else:
            write_atomic(output_dir / name, json.dumps(rows, indent=2))
    write_atomic(output_dir / "metrics.json", json.dumps(metrics, indent=2))


# --------------------------------------------------------------------------- run


@claims_output_dir
def run(config: RunConfig, callbacks: list | None = None) -> Path:
    """The whole recipe; re-running the same command resumes where it stopped.

    Every file the evaluation reads was read when the config was made (RunConfig), so a missing or
    malformed one stops the run here, before any work.
    """
    from . import report

    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolve_datasets(config, with_test=False)  # the run evaluates on its own held-out split
    data_dir = run_dir / "data"
    source = config.dataset_path
    _stage(data_dir, {"dataset": source, "content": _file_hash(source) if source else "embedded",
                      "max_examples": config.max_examples, "eval_fraction": config.eval_fraction,
                      "seed": config.seeds[0]},
           lambda: distributed.on_main(split_heldout, config, data_dir))
    if config.resume_from_checkpoint:
        distributed.on_main(logger.warning, "--resume_from_checkpoint is ignored by `sftmix run`: each stage "
                            "resumes from its own checkpoints")
    train_path = str(data_dir / "train.jsonl")
    # The base model's weights, not only its path: a model retrained in place makes these stages stale.
    weights = model_identity(distributed.main_first(resolve_model_path, config.model_name_or_path))
    variants = config.variants
    runs = [f"{variant}-seed{seed}" for seed in config.seeds for variant in variants]
    progress = RunProgress((["reference run and confidence split"] if config.mixing_variants else [])
                           + [f"{stage} {name}" for name in runs for stage in ("train", "evaluate")])
    if config.mixing_variants:  # Stage 1 only for the variants that read the confidence split
        progress.start("reference run and confidence split")
        _dynamics_stage(config, run_dir, train_path, weights)
    references = distributed.on_main(_reference_sets, config, data_dir)
    for seed in config.seeds:
        for variant in variants:
            progress.start(f"train {variant}-seed{seed}")
            model_dir = _train_stage(config, run_dir, variant, seed, callbacks, weights)
            progress.start(f"evaluate {variant}-seed{seed}")
            _eval_stage(config, run_dir, model_dir, references)
            _alpaca_eval_stage(config, run_dir, model_dir.name)
    progress.finish()
    # the official AlpacaEval 2 scorer, when it runs, replaces our pairwise judge
    if config.judge_base_url and {"sftmix", "ntp"} <= set(variants) and not config.official_scorer:
        answers = [run_dir / "eval" / f"{v}-seed{s}" / "model_outputs.json" for s in config.seeds
                   for v in ("sftmix", "ntp")]  # the judge compares these two
        _stage(run_dir / "judge", {"url": config.judge_base_url, "model": config.judge_model,
                                   "answers": [_file_hash(str(path)) for path in answers]},
               lambda: distributed.on_main(report.judge_stage, config, run_dir))
    distributed.on_main(report.write_report, run_dir, config)
    return run_dir


class RunProgress:
    """One line per stage of `sftmix run` (rank 0, stderr): where the run is, the time so far, the time left.

    The time left is the mean time of the finished stages of the same kind (train, evaluate; a training is
    first estimated by the reference run, which trains as long) over the stages still to come; stages that
    were up to date (under 2 s) do not count.
    """

    def __init__(self, stages: list[str], clock=time.monotonic):
        self.stages, self.clock, self.current, self.took = stages, clock, None, {}
        self.began = clock()

    def start(self, stage: str) -> None:
        now = self.clock()
        if self.current is not None and now - self.current[1] >= 2:
            self.took.setdefault(self._kind(self.current[0]), []).append(now - self.current[1])
        self.current = (stage, now)
        index = self.stages.index(stage)
        left = [self._estimate(remaining) for remaining in self.stages[index:]]
        eta = f", about {_clock(sum(left))} left" if all(value is not None for value in left) else ""
        distributed.on_main(_say, f"sftmix run [{index + 1}/{len(self.stages)}] {stage} "
                                  f"({_clock(now - self.began)} so far{eta})")

    def finish(self) -> None:
        distributed.on_main(_say, f"sftmix run: all {len(self.stages)} stages done in "
                                  f"{_clock(self.clock() - self.began)}; writing the report")

    def _estimate(self, stage: str) -> float | None:
        kind = self._kind(stage)
        seen = self.took.get(kind) or (self.took.get("reference") if kind == "train" else None)
        return sum(seen) / len(seen) if seen else None

    @staticmethod
    def _kind(stage: str) -> str:
        return stage.split()[0]


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _dynamics_stage(config: RunConfig, run_dir: Path, train_path: str, weights: dict) -> None:
    """`dynamics/`: Stage 1 on the training part, keyed like `sftmix dynamics`' own results (`result_settings`)."""
    dyn_config = _stage_config(DynamicsConfig, config, output_dir=str(run_dir / "dynamics"),
                               num_train_epochs=config.dynamics_epochs, seed=config.seeds[0],
                               dataset_path=train_path, max_examples=None, neftune_noise_alpha=None)
    inputs = {"data": _file_hash(train_path), "model_weights": weights,
              "checkpoints": [model_identity(path) for path in dyn_config.checkpoints or []]}
    _stage(run_dir / "dynamics", {**inputs, **keys.result_settings(dyn_config)}, lambda: dynamics(dyn_config))


def _train_stage(config: RunConfig, run_dir: Path, variant: str, seed: int, callbacks,
                 weights: dict) -> Path:
    """`<variant>-seed<S>`: the variant's loss (VARIANT_LOSS_TYPES) with every other setting of the run.

    Only `neftune` adds NEFTune's embedding noise; the mixing variants read the confidence split.
    """
    train_path, confidence_path = run_dir / "data" / "train.jsonl", run_dir / "dynamics" / "confidence.jsonl"
    loss_type = VARIANT_LOSS_TYPES[variant]
    mixing = loss_type != "ntp"
    train_config = _stage_config(
        SFTMixConfig, config, output_dir=str(run_dir / f"{variant}-seed{seed}"), seed=seed,
        loss_type=loss_type, confidence_path=str(confidence_path) if mixing else None,
        neftune_noise_alpha=config.neftune_noise_alpha if variant == "neftune" else None,
        dataset_path=str(train_path), max_examples=None, eval_dataset_path=str(run_dir / "data" / "heldout.jsonl"),
    )
    inputs = {"data": _file_hash(str(train_path)), "confidence": _file_hash(str(confidence_path)) if mixing else None,
              "model_weights": weights}
    _stage(Path(train_config.output_dir), {**inputs, **keys.result_settings(train_config)},
           lambda: train(train_config, callbacks=callbacks))
    return Path(train_config.output_dir)


def _reference_sets(config: RunConfig, data_dir: Path) -> list[str]:
    """The eval_datasets to score: as given, or their first `eval_max_examples` records (data/references/).

    The held-out split is always scored whole; the cut copies keep their file stem (the set's name in
    the report) and are rewritten only when their content changes.
    """
    if config.eval_max_examples is None:
        return list(config.eval_datasets or [])
    from .data import load_records

    paths = []
    for source in config.eval_datasets or []:
        records, _ = load_records(source)
        text = jsonl_text((record.data for record in records[: config.eval_max_examples]), user_data=True)
        target = data_dir / "references" / f"{Path(source).stem}.jsonl"
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            write_atomic(target, text)
        paths.append(str(target))
    return paths


def _eval_stage(config: RunConfig, run_dir: Path, model_dir: Path, references: list[str] | None = None) -> None:
    """`eval/<variant>-seed<S>`: held-out split + reference sets (`_reference_sets`), answers, confidence spread.

    No judge setting enters this stage (or its key): the official scorer is a stage of its own
    (`_alpaca_eval_stage`), so scoring again never generates the answers again.
    """
    heldout, train_path = str(run_dir / "data" / "heldout.jsonl"), str(run_dir / "data" / "train.jsonl")
    references = list(config.eval_datasets or []) if references is None else references
    eval_config = EvalConfig(
        model=str(model_dir), dataset=[heldout, *references],
        prompts=config.generation_prompts or heldout, confidence_dataset=train_path,
        confidence_max_examples=config.num_confidence_examples,
        output_dir=str(run_dir / "eval" / model_dir.name), generator=model_dir.name, max_length=config.max_length,
        num_generations=config.num_generations, max_new_tokens=config.max_new_tokens,
        batch_size=config.per_device_train_batch_size, scoring_batch_tokens=config.scoring_batch_tokens,
        sharded_scoring=config.sharded_scoring, use_cpu=config.use_cpu, trust_remote_code=config.trust_remote_code,
        attn_implementation=config.attn_implementation,
        mt_bench_questions=config.mt_bench_questions, alpaca_eval_scorer="off",
    )
    settings = {name: value for name, value in vars(eval_config).items() if not keys.is_bookkeeping(name)}
    inputs = {"model_weights": model_identity(model_dir),
              "file_contents": [_file_hash(path) for path in [*eval_config.dataset, eval_config.prompts, train_path]]}
    _stage(Path(eval_config.output_dir), {**settings, **inputs}, lambda: evaluate(eval_config), run_dir=run_dir)


def _alpaca_eval_stage(config: RunConfig, run_dir: Path, name: str) -> None:
    """`alpaca_eval/<variant>-seed<S>`: the official AlpacaEval 2 score of `eval/<name>/model_outputs.json`.

    A stage of its own, keyed by the hash of the answers and the judge settings: a scorer failure
    leaves the answers in place (the rerun only scores), and a new annotator, reference or judge
    endpoint scores the same answers again. The score is copied into `eval/<name>/metrics.json`,
    where the report reads it, and taken out of it when this run does not score.
    """
    eval_dir, stage_dir = run_dir / "eval" / name, run_dir / "alpaca_eval" / name
    answers, score = eval_dir / "model_outputs.json", stage_dir / "score.json"
    if config.official_scorer:
        reference = config.alpaca_eval_reference
        key = {"answers": _file_hash(str(answers)), "alpaca_eval_annotator": config.alpaca_eval_annotator,
               "alpaca_eval_reference": reference, "reference_content": _file_hash(reference) if reference else None,
               "judge_base_url": config.judge_base_url}
        _stage(stage_dir, key, lambda: distributed.on_main(_write_official_score, config, answers, score, name))
    distributed.on_main(_file_official_score, eval_dir / "metrics.json", score if config.official_scorer else None)


def _write_official_score(config: RunConfig, answers: Path, score: Path, name: str) -> None:
    write_atomic(score, json.dumps(_official_score(config, answers, score.parent, name), indent=2))


def _file_official_score(metrics_path: Path, score: Path | None) -> None:
    """Put the official score (the `score` file, or none) into an eval stage's metrics.json."""
    metrics = json.loads(metrics_path.read_text())
    filed = metrics.pop("alpaca_eval", None)
    if score is not None:
        metrics["alpaca_eval"] = json.loads(score.read_text())
    if metrics.get("alpaca_eval") != filed:
        write_atomic(metrics_path, json.dumps(metrics, indent=2))


def split_heldout(config: RunConfig, data_dir: Path) -> None:
    """Write data/train.jsonl and data/heldout.jsonl: a deterministic split by hashed example id."""
    from .data import default_dataset_path, example_id, load_records, to_messages

    records, report = load_records(config.dataset_path or default_dataset_path(), config.dataset_split)
    records = records[: config.max_examples]
    seed = config.seeds[0]

    def rank(record) -> str:
        identifier = example_id(record, to_messages(record))
        return hashlib.sha256(f"{seed}:{identifier}".encode()).hexdigest()

    ordered = sorted(records, key=rank)
    num_heldout = max(1, round(len(ordered) * config.eval_fraction))
    heldout, training = ordered[:num_heldout], ordered[num_heldout:]
    if len(training) < 2:
        raise InputError(f"{report.source}: eval_fraction {config.eval_fraction} of {len(ordered)} records leaves "
                         f"{len(training)} for training; use more data or a smaller --eval_fraction")
    write_jsonl(data_dir / "heldout.jsonl", (record.data for record in heldout), user_data=True)
    write_jsonl(data_dir / "train.jsonl", (record.data for record in training), user_data=True)
    write_atomic(data_dir / "split.json", json.dumps({"source": report.source, "train": len(training),
                                                      "heldout": len(heldout), "load_report": vars(report)}, indent=2))


def _stage_config(config_class, run_config: RunConfig, **overrides):
    """A stage's config: every field it shares with the run config, plus the overrides."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_class) if f.init}
    values = {name: copy.deepcopy(getattr(run_config, name)) for name in names if hasattr(run_config, name)}
    values.update(dataset_name=None, dataset_config=None, datasets=[])  # resolve_datasets made them dataset_path
    values.update(resume_from_checkpoint=None)  # every stage resumes from its own checkpoints
    values.update(overrides)
    return config_class(**values)


def _file_hash(path: str) -> str | None:
    return file_hash(path) if Path(path).is_file() else None


def _stage(directory: Path, key: dict, work, run_dir: Path | None = None) -> None:
    """Run `work` unless `directory` holds a finished stage with the same key.

    The key is compared with its paths resolved (and relative to the run folder, `run_dir`,
    default the stage's parent), so spelling the run folder another way redoes nothing. A
    folder left by a killed stage with the same key is kept (the stage resumes from its
    checkpoints / score files); one made with another key is removed first, with a message
    naming what changed; a folder sftmix did not make is never removed. Rank 0 decides and
    keeps the books; every rank does the work (each stage coordinates its own writes).
    """
    key = keys.stage_key(key, run_dir if run_dir is not None else directory.parent)
    digest = keys.digest(key)
    if distributed.on_main(_open_stage, directory, digest, key) == "done":
        logger.warning("Stage %s: up to date, skipped", directory.name)
        return
    work()
    distributed.on_main(_close_stage, directory, digest, key)


def _open_stage(directory: Path, digest: str, key: dict) -> str:
    """'done' when the stage is finished with this key; else prepare its folder and return 'run'."""
    done, pending = directory / "stage.json", directory / "stage.pending.json"
    finished = json.loads(done.read_text()) if done.exists() else None
    if finished is not None and finished["key"] == digest:
        return "done"
    if directory.exists() and not (pending.exists() and json.loads(pending.read_text())["key"] == digest):
        made_by_us = finished is not None or pending.exists()
        others = sorted(path.name for path in directory.iterdir() if path.name != OutputLock.FILE)
        if not made_by_us and others:
            raise InputError(f"{directory} holds files that `sftmix run` did not make (e.g. {others[:3]}); move them "
                             "away or use another --output_dir: sftmix never deletes what it did not write")
        if finished is not None:
            logger.warning("Stage %s: settings changed since it finished (%s); it is redone and its results replaced",
                           directory.name, keys.key_changes(finished.get("inputs", {}), key))
        shutil.rmtree(directory)
    write_atomic(pending, json.dumps({"key": digest}))
    done.unlink(missing_ok=True)
    return "run"


def _close_stage(directory: Path, digest: str, key: dict) -> None:
    write_atomic(directory / "stage.json", json.dumps({"key": digest, "inputs": key}, indent=2, default=str))
    (directory / "stage.pending.json").unlink()
