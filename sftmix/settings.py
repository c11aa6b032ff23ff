"""Every setting a flag or a YAML key can set, in exactly one of three classes.

honoured   it does what its help says: Trainer's or TRL's meaning, or sftmix's where `HELP` gives it;
refused    a value sftmix cannot honour stops the command at start-up with one line (`REFUSED`);
no effect  accepted, so that a `trl sft` YAML runs as it is, and listed here as doing nothing (`NO_EFFECT`).

Fields that sftmix's own configs declare are honoured by sftmix unless listed in `REFUSED` or `NO_EFFECT`;
every field of transformers' `TrainingArguments` and of TRL's `SFTConfig`, `ModelConfig`, `ScriptArguments` and
`DatasetMixtureConfig` is named in one of the three tables below. tests/test_settings.py enumerates the installed
classes and fails on a field in none or in two of them: a field that a transformers or TRL release adds is caught
by CI, not by a user. `sftmix <command> --help` and docs/settings.md are made from these tables.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from . import distributed
from .errors import InputError

# ---------------------------------------------------------------------------------------------- honoured

# Fields of TrainingArguments, SFTConfig and TRL's script dataclasses that sftmix passes through or applies itself.
HONOURED: dict[str, tuple[str, ...]] = {
    "schedule and optimiser (Trainer)": (
        "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "optim", "optim_args",
        "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "optim_target_modules", "max_grad_norm"),
    "length of training and batches": (
        "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
        "average_tokens_across_devices", "seed", "data_seed", "full_determinism",
        "shuffle_dataset", "dataloader_num_workers",
        "dataloader_pin_memory", "dataloader_persistent_workers", "dataloader_prefetch_factor",
        "dataloader_multiprocessing_context", "dataloader_in_order", "remove_unused_columns"),
    "precision, memory and speed": (
        "bf16", "fp16", "tf32", "activation_checkpointing", "activation_checkpointing_kwargs", "gradient_checkpointing",
        "gradient_checkpointing_kwargs", "torch_compile", "torch_compile_backend", "torch_compile_mode",
        "torch_empty_cache_steps", "use_cache", "activation_offloading", "padding_free", "pad_to_multiple_of"),
    "model and data (TRL's SFTConfig, ModelConfig, ScriptArguments, DatasetMixtureConfig)": (
        "model_init_kwargs", "trust_remote_code", "router_aux_loss_coef", "chat_template_path", "eos_token",
        "pad_token", "max_length", "loss_type", "neftune_noise_alpha",
        "model_name_or_path", "model_revision", "dtype", "attn_implementation", "use_peft", "lora_r", "lora_alpha",
        "lora_dropout", "lora_target_modules", "lora_target_parameters", "lora_modules_to_save",
        "use_rslora", "use_dora", "load_in_8bit", "load_in_4bit", "bnb_4bit_quant_type", "use_bnb_nested_quant",
        "bnb_4bit_quant_storage", "dataset_name", "dataset_config", "dataset_train_split", "dataset_test_split",
        "datasets", "test_split_size"),
    "logging and reporting (Trainer)": (
        "logging_strategy", "logging_steps", "logging_first_step", "log_on_each_node", "logging_nan_inf_filter",
        "include_num_input_tokens_seen", "log_level", "log_level_replica", "disable_tqdm", "report_to", "run_name",
        "project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id", "skip_memory_metrics",
        "debug"),
    "evaluation during training (Trainer)": (
        "eval_strategy", "eval_steps", "eval_delay", "per_device_eval_batch_size", "prediction_loss_only",
        "eval_on_start", "eval_do_concat_batches", "eval_use_gather_object", "eval_accumulation_steps",
        "include_for_metrics", "batch_eval_metrics", "bf16_full_eval", "fp16_full_eval", "load_best_model_at_end",
        "metric_for_best_model", "greater_is_better"),
    "checkpoints, resuming and the hub": (
        "output_dir", "save_only_model", "save_strategy", "save_steps", "save_on_each_node", "save_total_limit",
        "enable_jit_checkpoint", "ignore_data_skip",
        "restore_callback_states_from_checkpoint", "hub_token", "hub_private_repo", "hub_model_id", "hub_revision"),
    "devices and launchers": (
        "use_cpu", "ddp_find_unused_parameters", "ddp_bucket_cap_mb",
        "ddp_broadcast_buffers", "ddp_static_graph", "ddp_backend", "ddp_timeout", "fsdp", "fsdp_config", "deepspeed",
        "local_rank"),
}

# What a setting means in sftmix where that differs from the help text of the class that declares it.
HELP = {
    "assistant_only_loss": "Always true in sftmix: only the assistant's replies are supervised (whatever the data's "
                           "format). false is refused.",
    "completion_only_loss": "Always true in sftmix (as assistant_only_loss). false is refused.",
    "warmup_steps": "Linear warm-up: a value below 1 is a share of the total steps, 1 or more a number of steps. "
                    "sftmix's default: 0.1 (the paper's).",
    "neftune_noise_alpha": "NEFTune noise on the input embeddings while training (`sftmix run`: only the `neftune` "
                           "variant uses it).",
    "push_to_hub": "Push the output directory as it is at the end (the merged, cast model, its card and tokenizer) "
                   "to hub_model_id (default: the output directory's name). Needs a token (HF_TOKEN or hub_token) "
                   "and a reachable hub, checked at start-up.",
    "max_length": "Tokens per example; longer ones are cut as --truncation says.",
    "gradient_checkpointing": "transformers 5's old name of --activation_checkpointing (on by default, as in TRL).",
    "accelerator_config": "accelerate's settings; split_batches is refused for the losses that mix.",
    "resume_from_checkpoint": "The checkpoint to resume (default: the newest complete one in output_dir); "
                              "`sftmix run` resumes every stage from its own and refuses it.",
    "train_sampling_strategy": "Only `random`: sftmix draws its batches with its own samplers (other values are "
                               "refused).",
}

# ---------------------------------------------------------------------------------------------- refused


def _mixes(config) -> bool:
    """Whether the command trains a loss with the Mixup term (and so uses balanced batches)."""
    if hasattr(config, "mixing_variants"):  # sftmix run
        return bool(config.mixing_variants)
    return getattr(config, "loss_type", "ntp") not in ("ntp", "nll")


@dataclasses.dataclass(frozen=True)
class Refusal:
    refused: Callable[[Any], bool]  # config -> whether its value is refused
    reason: str  # the one line: why, and what to do instead


# field -> the values sftmix refuses; any other value is honoured (or has no effect, as the table says).
REFUSED: dict[str, Refusal] = {
    "packing": Refusal(lambda c: c.packing, "--packing is not supported: it bins examples into rows regardless of the "
                       "balanced confident/unconfident batches that SFTMix pairs (and drops the example ids). "
                       "--padding_free true gives the same saving (no padding tokens, no attention across examples) "
                       "and keeps the pairs"),
    "eval_packing": Refusal(lambda c: bool(c.eval_packing), "--eval_packing is not supported (see --packing): "
                            "use --padding_free true"),
    "assistant_only_loss": Refusal(lambda c: c.assistant_only_loss is False, "--assistant_only_loss false (TRL's "
                                   "default) is not supported: sftmix always supervises the assistant's replies only "
                                   "(both loss terms are defined on response tokens); leave it out or set it true"),
    "completion_only_loss": Refusal(lambda c: c.completion_only_loss is False, "--completion_only_loss false is not "
                                    "supported: sftmix always supervises the completions only; leave it out or set "
                                    "it true"),
    "dataset_text_field": Refusal(lambda c: c.dataset_text_field != "text", "--dataset_text_field: sftmix trains on "
                                  "conversations (chat `messages`, Alpaca, prompt/completion, ShareGPT), not on a "
                                  "plain text column; convert the data to one of these formats"),
    "truncation_mode": Refusal(lambda c: c.truncation_mode != "keep_start", "--truncation_mode: sftmix cuts examples "
                               "itself; use --truncation turns (whole turns from the start) or right (TRL's "
                               "keep_start)"),
    "dataset_streaming": Refusal(lambda c: c.dataset_streaming, "streaming datasets are not supported: sftmix keys "
                                 "every example by id for the confidence split, so it reads the whole dataset"),
    "streaming": Refusal(lambda c: c.streaming, "streaming datasets are not supported: sftmix keys every example by "
                         "id for the confidence split, so it reads the whole dataset"),
    "lora_task_type": Refusal(lambda c: c.lora_task_type != "CAUSAL_LM", "--lora_task_type: sftmix trains causal "
                              "LMs (CAUSAL_LM)"),
    "label_smoothing_factor": Refusal(lambda c: c.label_smoothing_factor != 0, "--label_smoothing_factor is not "
                                      "supported: sftmix computes both loss terms itself, without label smoothing"),
    "label_names": Refusal(lambda c: c.label_names not in (None, ["labels"]), "--label_names: sftmix's batches carry "
                           "their labels as `labels`; leave it unset"),
    "auto_find_batch_size": Refusal(lambda c: c.auto_find_batch_size, "--auto_find_batch_size is not supported: "
                                    "balanced confident/unconfident batches need a fixed, even batch size; set "
                                    "--per_device_train_batch_size (and --gradient_accumulation_steps for a larger "
                                    "global batch)"),
    "use_liger_kernel": Refusal(lambda c: c.use_liger_kernel, "--use_liger_kernel is not supported: sftmix computes "
                                "its loss in its own fused LM head, which Liger's kernels were never tested with; the "
                                "default --fused_loss true already never builds [batch, length, vocabulary] logits"),
    "train_sampling_strategy": Refusal(lambda c: c.train_sampling_strategy != "random",
                                       "--train_sampling_strategy: sftmix draws its batches with its own samplers "
                                       "(balanced ones for the losses that mix), so that N processes take the steps "
                                       "one process takes; leave it `random`"),
    "push_to_hub": Refusal(lambda c: c.push_to_hub and not getattr(c, "saves_one_model", True),
                           "--push_to_hub is for `sftmix train`, which saves one model; `sftmix dynamics` and "
                           "`sftmix run` train several: upload the one you want afterwards with `hf upload`"),
    "parallelism_config": Refusal(lambda c: c.parallelism_config is not None, "--parallelism_config: tensor, context "
                                  "and sequence parallelism are not supported: the Mixup pairs need whole sequences on "
                                  "one rank; use data parallelism with FSDP2 or ZeRO-3 (docs/multi-gpu.md)"),
    "accelerator_config": Refusal(lambda c: _mixes(c) and _setting(c.accelerator_config, "split_batches"),
                                  "accelerator_config.split_batches would cut each balanced confident/unconfident "
                                  "batch across ranks; leave it false (each rank then gets whole balanced batches)"),
    "resume_from_checkpoint": Refusal(lambda c: c.resume_from_checkpoint is not None and hasattr(c, "variants"),
                                      "--resume_from_checkpoint: `sftmix run` resumes every stage from its own "
                                      "checkpoints; rerun the same command instead"),
    "hub_always_push": Refusal(lambda c: c.hub_always_push, "--hub_always_push: sftmix pushes once, at the end "
                               "(--push_to_hub), what the output directory then holds"),
}

def _setting(value, name: str):
    """`name` of a config given as an object, a mapping or a JSON string (a YAML or a flag)."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        import json

        value = json.loads(value)
    return value.get(name) if isinstance(value, dict) else getattr(value, name, None)


# ---------------------------------------------------------------------------------------------- no effect

NO_EFFECT: dict[str, str] = {
    "dataloader_drop_last": "every epoch is a whole number of full steps: the last one is filled by drawing again "
                            "(sftmix/sampler.py)",
    "length_column_name": "only read by train_sampling_strategy group_by_length, which is refused",
    "packing_strategy": "packing is refused",
    "liger_kernel_config": "use_liger_kernel is refused",
    "dataset_kwargs": "sftmix tokenises the data itself, so TRL's dataset preparation options do not apply",
    "dataset_num_proc": "sftmix tokenises the data itself, so TRL's dataset preparation options do not apply",
    "ignore_bias_buffers": "TRL's sft script does not use it either",
    "hub_strategy": "sftmix pushes once, at the end (--push_to_hub), what the output directory then holds",
    "do_train": "Trainer does not read it (scripts do); every sftmix command knows what it runs",
    "do_eval": "Trainer does not read it (scripts do); every sftmix command knows what it runs",
    "do_predict": "Trainer does not read it (scripts do); every sftmix command knows what it runs",
}

# Spellings of earlier releases that a YAML or a flag may still use: refused with the name to use instead.
RENAMED = {
    "warmup_ratio": "warmup_steps (transformers 5 removed warmup_ratio; a warmup_steps value below 1 is a share of "
                    "the total steps, e.g. warmup_steps: 0.1)",
}


def declared_by_sftmix(config_class) -> set[str]:
    """The fields an sftmix config class declares itself: its own, and the TRL ones whose default or meaning it
    changes (learning_rate, loss_type, ...)."""
    return {name for cls in config_class.__mro__ if cls.__module__.startswith("sftmix")
            for name in vars(cls).get("__annotations__", {}) if name in config_class.__dataclass_fields__}


def classify(name: str) -> str:
    """'refused', 'no effect' or 'honoured' (sftmix's own fields are honoured unless a table says otherwise)."""
    if name in REFUSED:
        return "refused"
    if name in NO_EFFECT:
        return "no effect"
    return "honoured"


def refuse(config) -> None:
    """Raise the one-line InputError of the first refused value in `config` (no I/O: a config's own check)."""
    for name, refusal in REFUSED.items():
        if hasattr(config, name) and refusal.refused(config):
            raise InputError(refusal.reason)


# ---------------------------------------------------------------------------------------------- start-up checks

# report_to name -> the package that provides it, where the two differ.
_REPORTER_PACKAGES = {"tensorboard": "tensorboard", "comet_ml": "comet-ml", "azure_ml": "azureml-core",
                      "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab"}


def check_environment(config) -> None:
    """What a command needs from the machine for its settings, checked before any model or data is loaded:
    the packages of --report_to, and a token and a reachable hub for --push_to_hub."""
    reporters = getattr(config, "report_to", None) or []
    if reporters:
        from transformers.integrations import get_available_reporting_integrations
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

        unknown = [name for name in reporters if name not in INTEGRATION_TO_CALLBACK]
        if unknown:
            raise InputError(f"--report_to {' '.join(unknown)}: unknown; choose from "
                             f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))} (or none)")
        available = set(get_available_reporting_integrations())
        missing = [name for name in reporters if name not in available]
        if missing:
            packages = " ".join(_REPORTER_PACKAGES.get(name, name) for name in missing)
            raise InputError(f"--report_to {' '.join(missing)} needs its package: pip install {packages} (or drop it "
                             "from --report_to)")
    if getattr(config, "push_to_hub", False) and distributed.is_main():  # rank 0 alone pushes
        check_hub(config)


def check_hub(config) -> None:
    """A token, and a hub that answers with the account it belongs to."""
    from huggingface_hub import HfApi, get_token

    token = config.hub_token or get_token()
    if not token:
        raise InputError("--push_to_hub needs a Hugging Face token with write access: set HF_TOKEN (or log in with "
                         "`hf auth login`), or leave --push_to_hub out")
    try:
        HfApi().whoami(token=token)
    except Exception as err:  # offline, unreachable, or a token the hub refuses: the same advice
        raise InputError(f"--push_to_hub: the hub did not accept the token ({type(err).__name__}); check the network "
                         "and HF_TOKEN, or leave --push_to_hub out and upload the output directory later") from None


# ---------------------------------------------------------------------------------------------- --help


def arrange_help(parser: argparse.ArgumentParser, own_fields: set[str]) -> None:
    """`--help` for sftmix users: sftmix's own options first, TRL's and transformers' after them with sftmix's
    meaning where it differs (`HELP`); options with no effect, or refused unless left at their default, are
    named once at the end instead."""
    parser.usage = f"{parser.prog} [--config FILE.yaml] [--option value ...]   (options: below)"
    own = parser.add_argument_group("sftmix options")
    others = parser.add_argument_group("transformers and TRL options (honoured)")
    hidden = []
    for action in list(parser._actions):
        name = action.dest
        if isinstance(action, argparse._HelpAction) or name == "config":
            continue
        for group in parser._action_groups:
            if action in group._group_actions:
                group._group_actions.remove(action)
        if name in HELP and name not in own_fields:  # sftmix's own fields carry their own help
            action.help = HELP[name]
        if classify(name) != "honoured" and name not in HELP:  # refused whatever its value, or no effect
            action.help = argparse.SUPPRESS
            hidden.append(name)
        (own if name in own_fields else others)._group_actions.append(action)
    # argparse lists groups in the order they were added: ours first, after the usage and --help
    parser._action_groups = [group for group in parser._action_groups if group not in (own, others)]
    parser._action_groups[2:2] = [own, others]  # after -h and --config
    refused = sorted(name for name in hidden if classify(name) == "refused")
    no_effect = sorted(name for name in hidden if classify(name) == "no effect")
    parser.epilog = (f"Refused (a value sftmix cannot honour stops the command at start-up): {', '.join(refused)}. "
                     f"Accepted with no effect (so that a `trl sft` YAML runs): {', '.join(no_effect)}. "
                     "docs/settings.md says why for each.")


def markdown() -> str:
    """docs/settings.md: the three classes, with the reason for each refused and no-effect field."""
    lines = ["# Settings: honoured, refused, no effect", "",
             "Made by `python -m sftmix.settings` from `sftmix/settings.py`; tests/test_settings.py checks that every",
             "field of the installed transformers and TRL classes is in exactly one class, and that this file is",
             "current. sftmix's own options (`sftmix <command> --help`) are honoured unless listed here.", "",
             "## Refused", "", "| field | refused values: why, and what to do |", "| --- | --- |"]
    lines += [f"| `{name}` | {refusal.reason} |" for name, refusal in sorted(REFUSED.items())]
    lines += ["", "## Accepted with no effect", "", "| field | why |", "| --- | --- |"]
    lines += [f"| `{name}` | {reason} |" for name, reason in sorted(NO_EFFECT.items())]
    lines += ["", "## Renamed", "", "| old name | use |", "| --- | --- |"]
    lines += [f"| `{old}` | {new} |" for old, new in RENAMED.items()]
    lines += ["", "## Honoured", "", "With Trainer's or TRL's meaning, except where sftmix gives its own:", ""]
    lines += [f"- `{name}`: {text}" for name, text in sorted(HELP.items())]
    for title, names in HONOURED.items():
        lines += ["", f"**{title}**: " + ", ".join(f"`{name}`" for name in names)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
