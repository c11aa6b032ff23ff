"""`sftmix train`: model + tokenizer -> dataset -> confidence split -> SFTMixTrainer -> saved model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from .. import distributed, keys
from ..config import SFTMixConfig
from ..data import build_dataset, read_groups
from ..errors import InputError
from ..files import write_atomic
from ..hub import push_output_dir, write_model_card
from ..model import check_loadable, convert_saved_dtype, merge_adapter, model_revision
from ..trainer import SFTMixTrainer, check_ids_match
from .common import Prepared, build_trainer, claims_output_dir, prepare, resolve_datasets, resume_checkpoint

logger = logging.getLogger(__name__)


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
        groups = read_groups(config.confidence_path)
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
