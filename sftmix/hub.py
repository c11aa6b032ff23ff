"""`--push_to_hub`: upload the output directory as it is when the command ends.

Trainer would push from inside `save_model` and at each checkpoint: before `--save_dtype` casts the weights,
before the model card, and, with `--use_peft`, the adapter instead of the merged model. sftmix keeps Trainer
from pushing (`SFTMixTrainer`) and pushes here once, after everything in the output directory is final.
"""

from __future__ import annotations

import logging
from pathlib import Path

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
