"""Recipes: the explicit sequence of steps behind each CLI command, one module each.

    train(config):     model + tokenizer -> dataset -> confidence split -> SFTMixTrainer -> saved model
    dynamics(config):  dataset -> NTP reference run with C checkpoints (or given checkpoints)
                       -> response NLL per example and checkpoint -> confidence -> split -> files
    evaluate(config):  held-out / reference NLL -> generations -> confidence spread -> metrics.json
    run(config):       held-out split -> dynamics -> each variant x seed (ntp, sftmix, neftune, ...) -> eval
                       -> judge -> report with intervals against NTP,
                       each stage in its own folder, skipped when its inputs and config are unchanged
`common` holds what they share (prepared data and model, the trainer, resuming, the output directory's claim).
Import a recipe from its module: `from sftmix.recipes.train import train`.
"""
