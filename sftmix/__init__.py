"""sftmix: SFTMix instruction tuning (Xiao et al., arXiv 2410.05248) on transformers + TRL.

The core, torch only (no TRL, no transformers), for your own training loop:
    sftmix_loss, sftmix_loss_fused, sftmix_loss_reference, sample_lambda, balanced_pairs   (sftmix.losses)
    BalancedBatchSampler                                                                   (sftmix.sampler)
    CheckpointScores, confidence, variability, split_groups, confidence_rows               (sftmix.confidence)
Used like TRL's SFTTrainer (imported on first use):
    SFTMixConfig, SFTMixTrainer, build_dataset, read_confidence
The CLI `sftmix` runs the recipes of `sftmix.pipeline` (train, dynamics, run, evaluate).
"""

from .confidence import CheckpointScores, confidence, confidence_rows, split_groups, variability
from .losses import LossTerms, balanced_pairs, sample_lambda, sftmix_loss, sftmix_loss_fused, sftmix_loss_reference
from .sampler import BalancedBatchSampler

__version__ = "0.1.0"

# name -> module: these import TRL and transformers, so only when asked for
_ON_FIRST_USE = {"SFTMixConfig": "config", "SFTMixTrainer": "trainer", "build_dataset": "data",
                 "read_confidence": "data"}

__all__ = ["BalancedBatchSampler", "CheckpointScores", "LossTerms", "balanced_pairs", "confidence", "confidence_rows",
           "sample_lambda", "sftmix_loss", "sftmix_loss_fused", "sftmix_loss_reference", "split_groups",
           "variability", *_ON_FIRST_USE]


def __getattr__(name: str):
    if name in _ON_FIRST_USE:
        import importlib

        return getattr(importlib.import_module(f".{_ON_FIRST_USE[name]}", __name__), name)
    raise AttributeError(f"module 'sftmix' has no attribute {name!r}")
