"""sftmix: SFTMix instruction tuning (Xiao et al., arXiv 2410.05248) on transformers + TRL.

The core, torch only (no TRL, no transformers), for your own training loop:
    sftmix_loss, sftmix_loss_fused, sftmix_loss_reference, sample_lambda, balanced_pairs   (sftmix.losses)
    BalancedBatchSampler                                                                   (sftmix.sampler)
    CheckpointScores, mean_confidence, variability, split_groups, confidence_rows          (sftmix.confidence)
Used like TRL's SFTTrainer:
    SFTMixConfig, SFTMixTrainer, build_dataset, read_groups
Every name is imported on first use, so `import sftmix` (and the CLI's start) costs nothing.
"""

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    **dict.fromkeys(["LossTerms", "balanced_pairs", "sample_lambda", "sftmix_loss", "sftmix_loss_fused",
                     "sftmix_loss_reference"], "losses"),
    "BalancedBatchSampler": "sampler",
    **dict.fromkeys(["CheckpointScores", "mean_confidence", "variability", "split_groups", "confidence_rows"],
                    "confidence"),
    "SFTMixConfig": "config",
    "SFTMixTrainer": "trainer",
    **dict.fromkeys(["build_dataset", "read_groups"], "data"),
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'sftmix' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
