"""What every recipe shares: the prepared model, tokenizer and data, the trainer, resuming, and the
output directory's claim (lock, never over an input)."""

from __future__ import annotations

import functools
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import distributed, keys, settings
from ..config import DynamicsConfig, RunConfig, SFTMixConfig
from ..data import DataReport, DatasetSpec, build_dataset, mix_records, spec_records, write_records
from ..errors import InputError
from ..files import (
    OutputLock,
    checkpoint_damage,
    newest_complete_checkpoint,
    out_of_space,
    refuse_writing_over_inputs,
    write_atomic,
)
from ..model import load_tokenizer, model_revision, resolve_model_path
from ..trainer import SFTMixTrainer

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
        train_part, test_part = _draw_test_records(records, config.test_split_size, config.seed)
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


def _draw_test_records(records: list, size: float | None, seed: int) -> tuple[list, list]:
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


def check_at_start(config) -> None:
    """A command's start-up checks, before any model or data is loaded (a config reads no file): the packages, token
    and hub its settings need, a launch that runs as one correct job, and every file evaluation will read."""
    settings.check_environment(config)
    if hasattr(config, "world_size"):  # a training config
        distributed.check_launch(config)
    if getattr(config, "sharded_scoring", None) and not distributed.zero3_launch():
        raise InputError("--sharded_scoring true needs a DeepSpeed ZeRO-3 launch, which partitions the model over "
                         "the processes: accelerate launch --config_file configs/accelerate/zero3.yaml ...")
    if hasattr(config, "check_inputs"):
        config.check_inputs()


def claims_output_dir(recipe):
    """Run `recipe(config, ...)` holding `config.output_dir` after the start-up checks: refused at once when it cannot
    be written, or when another sftmix run holds it (rank 0 takes the lock; the OS frees it when the process ends,
    however)."""

    @functools.wraps(recipe)
    def claimed(config, *args, **kwargs):
        check_at_start(config)
        refuse_writing_over_inputs(_outputs(config), {f"--{name}": value for name, value in vars(config).items()
                                                      if keys.is_path_field(name)})
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


def _outputs(config) -> dict[str, Path]:
    """What a command writes that could be one of its inputs: its folder, and the files it makes there that a user
    may pass back to it (a run's data split, a dynamics run's confidence file)."""
    output_dir = Path(config.output_dir)
    files = {RunConfig: ["data/train.jsonl", "data/heldout.jsonl"], DynamicsConfig: ["confidence.jsonl"]}
    return {"--output_dir": output_dir, **{f"--output_dir's {name}": output_dir / name
                                           for name in files.get(type(config), [])}}
