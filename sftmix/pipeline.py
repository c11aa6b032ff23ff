"""Recipes: the explicit sequence of steps behind each CLI command.

    train(config): model + tokenizer -> dataset -> confidence split -> SFTMixTrainer -> saved model
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers.trainer_utils import get_last_checkpoint

from .config import SFTMixConfig
from .data import build_dataset, read_confidence
from .model import load_model, load_tokenizer, resolve_model_path
from .trainer import SFTMixTrainer, write_model_card

logger = logging.getLogger(__name__)


def train(config: SFTMixConfig, callbacks: list | None = None) -> Path:
    """Train with `config.loss_type` and save a `from_pretrained`-loadable model in `config.output_dir`.

    Resumes from the newest checkpoint in `output_dir` when there is one.
    """
    if config.loss_type != "ntp" and config.confidence_path is None:
        raise ValueError(
            f"--loss_type {config.loss_type} needs --confidence_path: first run `sftmix dynamics "
            "--output_dir dyn` on the same model and data, then pass --confidence_path dyn/confidence.jsonl "
            "(or train the plain baseline with --loss_type ntp)"
        )
    model_path = resolve_model_path(config.model_name_or_path)
    tokenizer = load_tokenizer(model_path, config.trust_remote_code)
    dataset, report = build_dataset(
        config.dataset_path, tokenizer, config.max_length, config.max_examples, config.dataset_split
    )
    logger.warning("Data: %s", report.summary())
    groups = read_confidence(config.confidence_path) if config.loss_type != "ntp" else None
    trainer = SFTMixTrainer(
        load_model(model_path, config.trust_remote_code),
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=_lora_config(config) if config.use_peft else None,
        groups=groups,
        callbacks=callbacks,
    )
    output_dir = Path(config.output_dir)
    checkpoint = config.resume_from_checkpoint
    if checkpoint is None and output_dir.is_dir():
        checkpoint = get_last_checkpoint(str(output_dir))
        if checkpoint:
            logger.warning("Resuming from %s", checkpoint)
    trainer.train(resume_from_checkpoint=checkpoint)
    _save(trainer, config, output_dir)
    if trainer.is_world_process_zero():
        (output_dir / "data_report.json").write_text(json.dumps(vars(report), indent=2, default=str))
    return output_dir


def _lora_config(config: SFTMixConfig):
    from peft import LoraConfig

    targets = config.lora_target_modules
    if targets != "all-linear":
        targets = [name.strip() for name in targets.split(",") if name.strip()]
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=targets, task_type="CAUSAL_LM")


def _save(trainer: SFTMixTrainer, config: SFTMixConfig, output_dir: Path) -> None:
    """Full weights (LoRA merged in) so that `AutoModelForCausalLM.from_pretrained(output_dir)` just works."""
    if config.use_peft:
        trainer.save_model(str(output_dir / "adapter"))
        if trainer.is_world_process_zero():
            merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
            merged.save_pretrained(output_dir, safe_serialization=True)
            trainer.processing_class.save_pretrained(output_dir)
    else:
        trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        write_model_card(output_dir, config)
