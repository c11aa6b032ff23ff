"""What the Hub shows: the model card of a saved model, and `--push_to_hub`, which uploads the output directory as
it is when the command ends.

Trainer would push from inside `save_model` and at each checkpoint: before `--save_dtype` casts the weights,
before the model card, and, with `--use_peft`, the adapter instead of the merged model. sftmix keeps Trainer
from pushing (`SFTMixTrainer`) and pushes here once, after everything in the output directory is final.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .files import write_atomic

logger = logging.getLogger(__name__)

# Not the model: resumable checkpoints, the LoRA adapter the merged weights were made from, sftmix's lock, and
# Trainer's pickled arguments (training_args.bin holds --hub_token in clear).
NOT_PUSHED = ["checkpoint-*", "checkpoint-*/**", "adapter/**", "_*", ".sftmix*", "training_args.bin"]


def push_output_dir(output_dir: Path, config) -> str:
    """Create the repo if needed and upload `output_dir`; returns the commit's URL."""
    from huggingface_hub import HfApi

    from .errors import InputError

    token = config.hub_token  # None: huggingface_hub reads HF_TOKEN or the login
    repo_id = config.hub_model_id or Path(output_dir).resolve().name
    api = HfApi(token=token)
    try:
        repo = api.create_repo(repo_id, private=config.hub_private_repo, exist_ok=True)
        commit = api.upload_folder(repo_id=repo.repo_id, folder_path=str(output_dir), revision=config.hub_revision,
                                   commit_message="sftmix: trained model", ignore_patterns=NOT_PUSHED)
    except Exception as err:  # the network, the token, the repo: the model is safe on disk either way
        raise InputError(f"the model is saved in {output_dir}, but pushing it to {repo_id} failed "
                         f"({type(err).__name__}: {str(err)[:200]}); upload it later with `hf upload {repo_id} "
                         f"{output_dir} --exclude 'checkpoint-*' 'adapter/*' training_args.bin`") from err
    logger.warning("Pushed %s to %s", output_dir, getattr(commit, "commit_url", repo.repo_id))
    return str(getattr(commit, "commit_url", repo.repo_id))


MODEL_CARD = """---
library_name: transformers
tags: [sftmix, trl, sft]
base_model: {base_model}
---
# {name}

Instruction-tuned with [sftmix](https://pypi.org/project/sftmix/), an implementation of
**SFTMix** (Xiao et al., "SFTMix: Elevating Language Model Instruction Tuning with Mixup
Recipe", [arXiv:2410.05248](https://arxiv.org/abs/2410.05248)).

| setting | value |
|---|---|
| base model | `{base_model}` |
| dataset | `{dataset}` |
| loss_type | `{loss_type}` (NTP weight {ntp_weight}, Mixup weight {mixup_weight}) |
| mixup_alpha | {alpha} (lambda per {lambda_per}) |
| confidence split | `{confidence}` |
| learning rate / schedule | {lr} / {scheduler}, warm-up {warmup} |
| epochs / max steps | {epochs} / {max_steps} |

Load it with `AutoModelForCausalLM.from_pretrained("{name}")`.

```bibtex
@inproceedings{{xiao2026sftmix,
  title={{SFTMix: Elevating Language Model Instruction Tuning with Mixup Recipe}},
  author={{Xiao, Yuxin and Zhang, Shujian and Zhou, Wenxuan and Ghassemi, Marzyeh and Zhao, Sanqiang}},
  booktitle={{ACL}}, year={{2026}}, eprint={{2410.05248}}
}}
```
"""


def write_model_card(output_dir: Path, args, base_model: str | None = None,
                     dataset: str | None = None) -> None:
    """README.md of a saved model; `base_model` and `dataset` name what the trainer was given (default: args')."""
    ntp_weight, mixup_weight = args.loss_weights
    write_atomic(output_dir / "README.md", MODEL_CARD.format(
        name=output_dir.name,
        base_model=base_model or args.model_name_or_path or "SmolLM2-135M-Instruct (embedded default)",
        dataset=dataset or args.dataset_path or "ShareGPT V3 (embedded default)", loss_type=args.loss_type,
        ntp_weight=ntp_weight, mixup_weight=mixup_weight, alpha=args.mixup_alpha, lambda_per=args.mixup_lambda_per,
        confidence=args.confidence_path, lr=args.learning_rate, scheduler=args.lr_scheduler_type,
        warmup=args.warmup_steps, epochs=args.num_train_epochs, max_steps=args.max_steps,
    ))
