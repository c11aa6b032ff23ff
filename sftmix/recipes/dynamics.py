"""`sftmix dynamics`: dataset -> NTP reference run with C checkpoints (or given checkpoints) -> response NLL
per example and checkpoint (whole copies or sharded) -> confidence -> split -> files."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from pathlib import Path

from transformers.trainer_utils import SaveStrategy

from .. import callbacks as cb
from .. import distributed, keys, plots, scoring
from ..confidence import CheckpointScores, confidence_rows, summarise
from ..config import DynamicsConfig
from ..errors import InputError
from ..files import strip_training_state, write_atomic, write_jsonl
from ..model import (
    check_model_path,
    check_vocabulary,
    device_memory,
    inference_dtype,
    load_model,
    loadable_checkpoint,
    torch_dtype,
    whole_copy_bytes,
)
from ..trainer import training_cost
from .common import Prepared, build_trainer, claims_output_dir, prepare, resolve_datasets, resume_checkpoint

logger = logging.getLogger(__name__)


@claims_output_dir
def dynamics(config: DynamicsConfig, callbacks: list | None = None) -> Path:
    """Write confidence.jsonl, dynamics.json and confidence.png to `config.output_dir`.

    Every finished piece is on disk (reference checkpoints, one scores file per
    checkpoint), so re-running the same command after a kill resumes where it stopped.
    Under a launcher every rank trains, every rank scores its share of the examples at
    each checkpoint, and rank 0 writes the files.
    """
    output_dir = Path(config.output_dir)
    for checkpoint in config.checkpoints or []:
        check_model_path(checkpoint, "--checkpoints")
    if config.checkpoints and config.model_name_or_path is None:
        # the checkpoints' own tokenizer (Trainer saves it in each one), not the embedded default's
        config.model_name_or_path = config.checkpoints[0]
        logger.warning("Tokenising with the tokenizer of %s (no --model_name_or_path)", config.checkpoints[0])
    resolve_datasets(config, with_test=False)  # the reference run is not evaluated
    prepared = prepare(config)
    device = distributed.device(config.use_cpu)
    scoring_layout = {"sharded": not config.online and sharded_scoring(config, prepared.model_path,
                                                                         inference_dtype(device), device)}
    ids = prepared.dataset["id"]
    check_split_counts(len(ids), config.split_ratio)
    key = keys.dynamics_key(config, prepared)  # what determines the results: stale ones are redone or refused
    distributed.on_main(clear_stale, output_dir, key)
    checkpoints, online_records, reference_cost = config.checkpoints, None, None
    if not checkpoints:
        checkpoints, online_records, reference_cost = _reference_run(config, prepared, callbacks)
    if config.online:
        scores = cb.online_scores(online_records, ids)
        for score in scores:
            scoring.check_scores(score, ids)
    else:
        scores_dir = output_dir / "scores"
        scores = [
            _checkpoint_scores(config, prepared, checkpoint, scores_dir / f"{k:02d}-{Path(checkpoint).name}.json",
                               scoring_layout)
            for k, checkpoint in enumerate(checkpoints)
        ]
    rows = confidence_rows(ids, scores, config.split_ratio)
    tokens = sum(len(row) for row in prepared.dataset["input_ids"])
    cost = {"reference run": reference_cost,  # None: given checkpoints (not trained here)
            "scoring": None if config.online else {"seconds": sum(score.seconds for score in scores),
                                                   "tokens": tokens * len(scores), "passes": len(scores),
                                                   **scoring_layout}}
    distributed.on_main(_write_dynamics_outputs, config, prepared, scores, rows, key, cost)
    return output_dir


def check_split_counts(count: int, split_ratio: float) -> None:
    """Both groups must be non-empty for this many examples, or SFTMix has nothing to pair (refused before training)."""
    confident = int(count * split_ratio)
    if count < 2:
        raise InputError(f"the data has {count} usable example(s); the confidence split needs at least 2 (one "
                         "confident, one unconfident): use more data (check max_examples and max_length)")
    if confident < 1 or confident >= count:
        raise InputError(
            f"split_ratio {split_ratio} over {count} examples gives {confident} confident and {count - confident} "
            f"unconfident examples; both groups need at least one: use a split_ratio in "
            f"[{1 / count:.3g}, {(count - 1) / count:.3g}] (0.5 is the paper's median split)"
        )


def _write_dynamics_outputs(config: DynamicsConfig, prepared: Prepared, scores: list, rows: list[dict],
                            key: dict, cost: dict) -> None:
    """confidence.jsonl, dynamics.json (what produced it + distribution summary) and confidence.png."""
    output_dir = Path(config.output_dir)
    write_jsonl(output_dir / "confidence.jsonl", rows)
    write_atomic(output_dir / "dynamics.json", json.dumps({
        "model": prepared.model_path,
        "tokenizer": getattr(prepared.tokenizer, "name_or_path", None),
        "checkpoints": [score.checkpoint for score in scores],
        "online": config.online,
        "dataset": {"path": config.dataset_path or "embedded ShareGPT V3", "fingerprint": prepared.report.fingerprint,
                    "source_fingerprint": prepared.report.source_fingerprint,
                    "unordered_fingerprint": prepared.report.unordered_fingerprint,
                    "max_length": config.max_length, "max_examples": config.max_examples,
                    "report": vars(prepared.report) | {"dropped_no_supervised_tokens":
                                                        len(prepared.report.dropped_no_supervised_tokens)}},
        "split_ratio": config.split_ratio,
        "processes": distributed.world_size(),
        "summary": summarise(rows),
        "cost": cost,  # wall time and tokens of the reference run and the scoring passes
        "key": key,
    }, indent=2))
    plots.plot_confidence(rows, output_dir / "confidence.png", title=f"SFTMix confidence ({len(rows)} examples)")
    if len(scores) > 1:  # variability needs two perplexities per example (online over one epoch has one)
        plots.plot_data_map(rows, output_dir / "data_map.png",
                          title=f"Data map ({len(rows)} examples, {len(scores)} checkpoints)")
    else:
        (output_dir / "data_map.png").unlink(missing_ok=True)  # a stale one from an earlier run would mislead


def _reference_run(config: DynamicsConfig, prepared: Prepared, callbacks) -> tuple[list[str], dict | None, dict]:
    """NTP-train the reference model for C evenly spaced checkpoints (skipped when already done).

    Only those C checkpoints are saved (not every `save_steps`), and each keeps only its weights (what
    scoring reads) once a newer one can be resumed from: optimizer, scheduler and engine states (for an
    8B model, 64 GB of Adam states per checkpoint) go, the last one's when the run is done.
    """
    reference = copy.deepcopy(config)
    reference.output_dir = str(Path(config.output_dir) / "reference")
    reference.eval_strategy = "no"  # the reference run only provides training dynamics
    reference.save_strategy = SaveStrategy.NO  # SaveEvenlySpaced saves the C checkpoints
    reference.save_total_limit = None  # all C checkpoints are scored
    done = Path(reference.output_dir) / "reference.json"
    finished = distributed.on_main(lambda: json.loads(done.read_text()) if done.exists() else None)
    if finished is not None:
        distributed.on_main(_keep_weights_only, finished["checkpoints"])  # a kill may have come before
        return finished["checkpoints"], finished.get("online_nll"), finished.get("cost")
    spacing = cb.SaveEvenlySpaced(config.num_checkpoints)
    trainer = build_trainer(reference, prepared, callbacks=[spacing, *(callbacks or [])], record_nll=config.online)
    # Online: a kill between a checkpoint and its NLL records; resume from the newest checkpoint that has them.
    resumable_needs = (cb.SaveOnlineNLL.FILE,) if config.online else ()
    checkpoint = distributed.on_main(resume_checkpoint, reference, also_needs=resumable_needs)
    if config.online:
        trainer.add_callback(cb.SaveOnlineNLL(trainer))
        trainer.online_nll.update(distributed.on_main(cb.SaveOnlineNLL.load, checkpoint))
    trainer.add_callback(cb.KeepWeightsOnly(resumable_needs))  # last: after the checkpoint is whole
    trainer.train(resume_from_checkpoint=checkpoint)
    online = cb.gather_online_nll(trainer) if config.online else None
    checkpoints = [str(Path(reference.output_dir) / f"checkpoint-{step}") for step in sorted(spacing.steps)]
    trainer.accelerator.free_memory()  # the scoring passes load each checkpoint afresh
    cost = training_cost(trainer.state.log_history)
    distributed.on_main(write_atomic, done, json.dumps({"checkpoints": checkpoints, "online_nll": online,
                                                        "cost": cost}))
    distributed.on_main(_keep_weights_only, checkpoints)  # after reference.json: never resumed from again
    return checkpoints, online, cost


def _keep_weights_only(checkpoints: list[str]) -> None:
    for checkpoint in checkpoints:
        if Path(checkpoint).is_dir():
            strip_training_state(Path(checkpoint))


def _inference_model(path: str, config, dtype: str, device, sharded: bool):
    """(model, engine) for scoring and evaluation: a whole copy on this rank (engine None), or, `sharded`, the model
    partitioned over the ZeRO-3 job as it loads (each rank keeps 1/N of every weight) and its inference engine."""
    if not sharded:
        with distributed.unpartitioned_loading():
            return load_model(path, config.trust_remote_code, dtype=dtype,
                              attn_implementation=config.attn_implementation).to(device), None
    with distributed.partitioned_loading(path, torch_dtype(dtype)):
        model = load_model(path, config.trust_remote_code, dtype=dtype, attn_implementation=config.attn_implementation)
    engine = distributed.zero3_inference(model)
    return engine.module, engine


def sharded_scoring(config, model_path: str, dtype: str, device) -> bool:
    """Whether to score with the parameters partitioned over a ZeRO-3 job: as asked (a launch that cannot is refused
    at the start: `check_at_start`), else only when a whole copy at `dtype` would not fit `device`; a model that fits
    no way is refused before any work."""
    if config.sharded_scoring is not None:
        return config.sharded_scoring
    needed, available = whole_copy_bytes(model_path, dtype), device_memory(device)
    if needed is None or needed <= 0.8 * available:  # room left for activations
        return False
    if distributed.zero3_launch():
        distributed.on_main(logger.warning, "Scoring with sharded parameters: a whole copy of %s (%.1f GiB) would "
                            "not fit one device (%.1f GiB)", model_path, needed / 2**30, available / 2**30)
        return True
    raise InputError(
        f"{model_path}: a whole copy of the model ({needed / 2**30:.1f} GiB in {dtype}) does not "
        f"fit one device ({available / 2**30:.1f} GiB) to be scored: launch with a DeepSpeed ZeRO-3 config "
        "(configs/accelerate/zero3.yaml), which scores it with its parameters sharded over the processes")


def _checkpoint_scores(config: DynamicsConfig, prepared: Prepared, checkpoint: str, path: Path, scoring_layout: dict):
    """One checkpoint's response NLL of every example: each rank scores its share, rank 0 saves the whole.
    `scoring_layout`: {"sharded": ...}; the share of the weights each rank held is recorded in it."""
    key = keys.scores_key(checkpoint, config, prepared)
    saved = distributed.on_main(scoring.load_scores, path, key)
    if saved is not None:
        return saved
    # Sharded checkpoints (FSDP's default, ZeRO without 16-bit gathering) are merged once, by rank 0.
    weights = distributed.on_main(loadable_checkpoint, checkpoint, prepared.model_path,
                                  Path(config.output_dir) / "consolidated")
    device = distributed.device(config.use_cpu)
    model, engine = _inference_model(weights, config, inference_dtype(device), device, scoring_layout["sharded"])
    check_vocabulary(model, prepared.tokenizer, checkpoint)
    # The largest share of the weights one rank holds (1 for whole copies; 1/N when partitioned), for dynamics.json
    held = max(distributed.gather(sum(getattr(p, "ds_tensor", p).numel() for p in model.parameters())))
    scoring_layout["share_of_weights_per_rank"] = held / sum(getattr(p, "ds_numel", p.numel())
                                                             for p in model.parameters())
    started = time.perf_counter()
    nll_sum, num_tokens = scoring.score_model(
        model, prepared.dataset, config.scoring_batch_tokens, prepared.tokenizer.pad_token_id,
        desc=f"Scoring {Path(checkpoint).name}", sharded=scoring_layout["sharded"],
    )
    scores = CheckpointScores(str(checkpoint), nll_sum, num_tokens, time.perf_counter() - started)
    distributed.on_main(scoring.check_scores, scores, prepared.dataset["id"])
    distributed.on_main(scoring.save_scores, path, scores, key)
    return scores


def clear_stale(output_dir: Path, key: dict) -> None:
    """Before any work: refuse to overwrite a finished split made with other settings; remove a reference run
    made with other settings (naming them), so it is redone; record this key with the reference run.

    Only folders whose settings sftmix recorded are removed; scores files carry their own key.
    """
    finished = output_dir / "dynamics.json"
    if finished.exists():
        recorded = json.loads(finished.read_text()).get("key")
        if recorded != key:
            changes = keys.key_changes(recorded, key) if recorded else "settings not recorded: made by an older sftmix"
            raise InputError(f"{output_dir} holds a finished confidence split made with other settings ({changes}); "
                             f"it is not overwritten: use another --output_dir, or delete {output_dir} to redo it")
    if "reference" not in key:
        return
    reference, marker = output_dir / "reference", output_dir / "reference" / "key.json"
    recorded = json.loads(marker.read_text()) if marker.exists() else None
    if reference.exists() and recorded != key["reference"]:
        if recorded is None:
            raise InputError(f"{reference} holds no record of the settings that made it (made by an older sftmix, or "
                             "not by sftmix); move or delete it to train the reference run again")
        logger.warning("%s was trained with other settings (%s): it is redone", reference,
                       keys.key_changes(recorded, key["reference"]))
        shutil.rmtree(reference)
        shutil.rmtree(output_dir / "consolidated", ignore_errors=True)  # merged copies of the old checkpoints
    write_atomic(marker, json.dumps(key["reference"], indent=1))
