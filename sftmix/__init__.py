"""sftmix: SFTMix instruction tuning (Xiao et al., arXiv 2410.05248) on transformers + TRL.

Library entry points (the CLI `sftmix` wraps the recipes in `sftmix.pipeline`):
    sftmix.config.SFTMixConfig, DynamicsConfig, RunConfig, EvalConfig
    sftmix.trainer.SFTMixTrainer
    sftmix.losses.sftmix_loss_fused / sftmix_loss_reference
    sftmix.pipeline.train / dynamics / run / evaluate
"""

__version__ = "0.1.0"
