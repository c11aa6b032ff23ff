"""What determines a result: the one place sftmix decides whether a stored result is still this command's.

A key holds the identity of a result's inputs (model weights, tokenizer, data fingerprint, file contents: never
their names) and the settings that determine it (`result_settings`: every field but the bookkeeping and the
inputs). Every stored result is keyed here; what a stale key means is its command's choice:

    training_key      `sftmix train`'s checkpoints        resumed only under the same key, else refused
    reference_key     `sftmix dynamics`' reference run     redone
    scores_key        one checkpoint's scores file         rescored
    dynamics_key      confidence.jsonl                     a finished split made otherwise is refused
    stage_key         each stage of `sftmix run`           redone, naming what changed
    tokenisation_key  a tokenised-data cache entry         another entry

`key_changes` names what differs between two keys, for those messages.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from . import distributed
from .files import HUB_ID, file_hash, model_identity

# Fields that change no result: where and how often things are logged, saved, evaluated or reported, and how
# scoring is batched. A training resumes its checkpoints, and `sftmix run` reuses a stage, whatever they say.
BOOKKEEPING_PREFIXES = ("logging_", "save_", "dataloader_", "eval_", "push_to_hub", "hub_", "trackio_")
BOOKKEEPING_FIELDS = {
    "output_dir", "logging_dir", "run_name", "project", "report_to", "disable_tqdm", "resume_from_checkpoint",
    "overwrite_output_dir", "ddp_timeout", "use_cpu", "local_rank", "log_level", "log_level_replica",
    "log_on_each_node", "skip_memory_metrics", "include_num_input_tokens_seen", "per_device_eval_batch_size",
    "bf16_full_eval", "fp16_full_eval", "batch_eval_metrics", "include_for_metrics", "prediction_loss_only",
    "do_train", "do_eval", "do_predict", "scoring_batch_tokens", "sharded_scoring",
}
NOT_BOOKKEEPING = {"save_dtype", "dataloader_drop_last"}  # they change the saved weights / the steps taken
# Inputs, named by a path or a hub name: a key holds their content's identity instead, so the same file under
# another name changes nothing.
INPUT_FIELDS = {
    "model_name_or_path", "dataset_path", "dataset_name", "dataset_config", "datasets", "dataset_split",
    "dataset_train_split", "dataset_test_split", "test_split_size", "max_examples", "confidence_path",
    "eval_dataset_path", "checkpoints",
}
# Every field that may name a file or folder (and every field named *_path): compared resolved.
PATH_FIELDS = {
    "dataset", "dataset_path", "datasets", "model", "model_name_or_path", "confidence_path", "checkpoints",
    "resume_from_checkpoint", "prompts", "confidence_dataset", "eval_datasets", "generation_prompts",
    "chat_template_path", "deepspeed", "alpaca_eval_reference", "mt_bench_questions",
}
MIXUP_FIELDS = ("mixup_alpha", "mixup_weight", "mixup_lambda_per")  # no effect on a loss without Mixup
SPLIT_ONLY = ("split_ratio",)  # settings of `sftmix dynamics` that the reference run does not read
SCORING_SETTINGS = ("max_length", "truncation")  # besides weights, tokenizer and data: what a checkpoint's scores read


def is_bookkeeping(name: str) -> bool:
    return name not in NOT_BOOKKEEPING and (name in BOOKKEEPING_FIELDS or name.startswith(BOOKKEEPING_PREFIXES))


def is_path_field(name: str) -> bool:
    return name in PATH_FIELDS or name.endswith("_path")


def result_settings(config) -> dict:
    """The settings that determine what a command trains or computes (given its inputs' content): every field
    but the bookkeeping and input ones, and the Mixup fields of a loss without Mixup; with the number of
    processes (it sets the global batch). JSON values, so a stored key compares equal.
    """
    # to_dict() masks every *_token field as a secret; the ones left here (eos_token, pad_token) are no secret
    settings = {name: getattr(config, name) if name.endswith("_token") else value
                for name, value in config.to_dict().items() if not is_bookkeeping(name) and name not in INPUT_FIELDS}
    if getattr(config, "loss_type", None) == "ntp":
        for name in MIXUP_FIELDS:
            settings.pop(name, None)
    for name, value in settings.items():
        if is_path_field(name) and isinstance(value, str) and Path(value).expanduser().exists():
            settings[name] = str(Path(value).expanduser().resolve())
    settings["processes"] = distributed.world_size()
    return _json_form(settings)


def training_key(config, prepared) -> dict:
    """What determines a training's checkpoints: the base model's weights, the tokenizer, the data, the
    confidence split (mixing losses) and `result_settings` (not the bookkeeping: logging, saving, reporting)."""
    return {"model": model_identity(prepared.model_path), "tokenizer": tokenizer_fingerprint(prepared.tokenizer),
            "data": prepared.report.fingerprint,
            "confidence": file_hash(config.confidence_path) if config.loss_type != "ntp" else None,
            **result_settings(config)}


def reference_settings(config) -> dict[str, Any]:
    """The settings that determine the reference run's checkpoints: those of any training (`result_settings`:
    optimiser, schedule, length, precision, LoRA, C, online, processes, ...) less the split's own."""
    return {name: value for name, value in result_settings(config).items() if name not in SPLIT_ONLY}


def reference_key(config, prepared) -> dict[str, Any]:
    """What determines the reference run's checkpoints: base model, tokenizer, data and `reference_settings`."""
    return _json_form({
        "model": model_identity(prepared.model_path), "tokenizer": tokenizer_fingerprint(prepared.tokenizer),
        "data": prepared.report.fingerprint, **reference_settings(config),
    })


def scores_key(checkpoint: str, config, prepared) -> dict[str, Any]:
    """What determines one checkpoint's scores: its weights, the tokenizer, the data, max_length and truncation."""
    return _json_form({"checkpoint": model_identity(checkpoint), "tokenizer": tokenizer_fingerprint(prepared.tokenizer),
                       "data": prepared.report.fingerprint,
                       **{name: getattr(config, name) for name in SCORING_SETTINGS}})


def dynamics_key(config, prepared) -> dict[str, Any]:
    """What determines confidence.jsonl: the reference run (or the given checkpoints), the data, how it is scored
    and the split."""
    if config.checkpoints:
        source = {"checkpoints": [model_identity(checkpoint) for checkpoint in config.checkpoints]}
    else:
        source = {"reference": reference_key(config, prepared)}
    return _json_form({**source, "tokenizer": tokenizer_fingerprint(prepared.tokenizer),
                       "data": prepared.report.fingerprint,
                       **{name: getattr(config, name) for name in (*SCORING_SETTINGS, *SPLIT_ONLY)}})


def stage_key(key: dict, run_dir: str | Path) -> dict:
    """`key` with its paths resolved, those inside the run folder relative to it: `o/R`, `/abs/o/R` and a
    moved run folder give the same key. A name that is no local path (a hub id) is kept as it is."""
    root = Path(run_dir).resolve()

    def comparable(value):
        if isinstance(value, (list, tuple)):
            return [comparable(item) for item in value]
        if isinstance(value, dict):  # a dataset mixture entry
            return {name: comparable(item) if name in ("path", "data_files", "data_dir") else item
                    for name, item in value.items()}
        if not isinstance(value, str):
            return value
        path = Path(value).expanduser()
        if not path.exists() and HUB_ID.fullmatch(value):
            return value
        resolved = path.resolve()
        return f"<run>/{resolved.relative_to(root)}" if resolved.is_relative_to(root) else str(resolved)

    return {name: comparable(value) if is_path_field(name) else value for name, value in key.items()}


def tokenisation_key(source, tokenizer, version: int, **settings) -> str:
    """A tokenised file's cache entry: the file's content, resolved path and suffix (which picks the reader: the
    same bytes under another name are another file, maybe another format, and the report names the file read),
    the tokenizer, the tokenisation code's `version` and the `settings` (split, max_length, truncation, ...)."""
    resolved = Path(str(source)).resolve()
    return digest([version, file_hash(source), str(resolved), resolved.suffix, *settings.values(),
                   tokenizer_fingerprint(tokenizer)], length=24)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides the token ids and the rendered text: the vocabulary and merges, the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(json.dumps(
        [type(tokenizer).__name__, tokenizer.chat_template, hashlib.sha256(vocabulary.encode()).hexdigest()]
    ).encode()).hexdigest()[:16]


def digest(key: Any, length: int = 16) -> str:
    """A short, stable hash of a key (JSON with sorted names)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:length]


def key_changes(old: dict, new: dict, limit: int = 6) -> str:
    """'name: old -> new' for each field of two keys that differs (nested fields as a.b, values shortened):
    why a stored result is not reused."""
    def flat(key: dict, prefix: str = "") -> dict:
        items: dict = {}
        for name, value in key.items():
            if isinstance(value, dict) and value:
                items.update(flat(value, f"{prefix}{name}."))
            else:
                items[f"{prefix}{name}"] = value
        return items

    def short(value) -> str:
        text = json.dumps(value, default=str)
        return text if len(text) <= 60 else text[:57] + "..."

    old, new = flat(old), flat(new)
    changed = [f"{name}: {short(old.get(name))} -> {short(new.get(name))}"
               for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
    return "; ".join(changed[:limit]) + (f"; and {len(changed) - limit} more" if len(changed) > limit else "")


def _json_form(value: Any) -> Any:
    """The value as it reads back from JSON (tuples -> lists, enums -> strings), so keys compare equal."""
    return json.loads(json.dumps(value, default=str))
