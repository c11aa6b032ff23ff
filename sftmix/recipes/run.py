"""`sftmix run`: held-out split -> dynamics -> each variant x seed (ntp, sftmix, neftune, ...) -> eval -> judge
-> report with intervals against NTP, each stage in its own folder, skipped when its inputs and settings are
unchanged."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from .. import distributed, keys
from ..config import VARIANT_LOSS_TYPES, DynamicsConfig, EvalConfig, RunConfig, SFTMixConfig
from ..errors import InputError
from ..files import OutputLock, file_hash, jsonl_text, model_identity, write_atomic, write_jsonl
from ..model import resolve_model_path
from .common import claims_output_dir, resolve_datasets
from .dynamics import dynamics
from .evaluate import _official_score, evaluate
from .train import train

logger = logging.getLogger(__name__)


@claims_output_dir
def run(config: RunConfig, callbacks: list | None = None) -> Path:
    """The whole recipe; re-running the same command resumes where it stopped.

    Every file the evaluation reads is read first (`check_at_start`), so a missing or malformed one stops the
    run before any work.
    """
    from .. import report

    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolve_datasets(config, with_test=False)  # the run evaluates on its own held-out split
    data_dir = run_dir / "data"
    source = config.dataset_path
    _stage(data_dir, {"dataset": source, "content": _file_hash(source) if source else "embedded",
                      "max_examples": config.max_examples, "eval_fraction": config.eval_fraction,
                      "seed": config.seeds[0]},
           lambda: distributed.on_main(hold_out, config, data_dir))
    if config.resume_from_checkpoint:
        distributed.on_main(logger.warning, "--resume_from_checkpoint is ignored by `sftmix run`: each stage "
                            "resumes from its own checkpoints")
    train_path = str(data_dir / "train.jsonl")
    # The base model's weights, not only its path: a model retrained in place makes these stages stale.
    weights = model_identity(distributed.main_first(resolve_model_path, config.model_name_or_path))
    variants = config.variants
    runs = [f"{variant}-seed{seed}" for seed in config.seeds for variant in variants]
    progress = RunProgress((["reference run and confidence split"] if config.mixing_variants else [])
                           + [f"{stage} {name}" for name in runs for stage in ("train", "evaluate")])
    if config.mixing_variants:  # Stage 1 only for the variants that read the confidence split
        progress.start("reference run and confidence split")
        _dynamics_stage(config, run_dir, train_path, weights)
    references = distributed.on_main(_reference_sets, config, data_dir)
    for seed in config.seeds:
        for variant in variants:
            progress.start(f"train {variant}-seed{seed}")
            model_dir = _train_stage(config, run_dir, variant, seed, callbacks, weights)
            progress.start(f"evaluate {variant}-seed{seed}")
            _eval_stage(config, run_dir, model_dir, references)
            _alpaca_eval_stage(config, run_dir, model_dir.name)
    progress.finish()
    # the official AlpacaEval 2 scorer, when it runs, replaces our pairwise judge
    if config.judge_base_url and {"sftmix", "ntp"} <= set(variants) and not config.official_scorer:
        answers = [run_dir / "eval" / f"{v}-seed{s}" / "model_outputs.json" for s in config.seeds
                   for v in ("sftmix", "ntp")]  # the judge compares these two
        _stage(run_dir / "judge", {"url": config.judge_base_url, "model": config.judge_model,
                                   "answers": [_file_hash(str(path)) for path in answers]},
               lambda: distributed.on_main(report.judge_stage, config, run_dir))
    distributed.on_main(report.write_report, run_dir, config)
    return run_dir


class RunProgress:
    """One line per stage of `sftmix run` (rank 0, stderr): where the run is, the time so far, the time left.

    The time left is the mean time of the finished stages of the same kind (train, evaluate; a training is
    first estimated by the reference run, which trains as long) over the stages still to come; stages that
    were up to date (under 2 s) do not count.
    """

    def __init__(self, stages: list[str], clock=time.monotonic):
        self.stages, self.clock, self.current, self.took = stages, clock, None, {}
        self.began = clock()

    def start(self, stage: str) -> None:
        now = self.clock()
        if self.current is not None and now - self.current[1] >= 2:
            self.took.setdefault(self._kind(self.current[0]), []).append(now - self.current[1])
        self.current = (stage, now)
        index = self.stages.index(stage)
        left = [self._estimate(remaining) for remaining in self.stages[index:]]
        eta = f", about {_clock(sum(left))} left" if all(value is not None for value in left) else ""
        distributed.print_on_main(f"sftmix run [{index + 1}/{len(self.stages)}] {stage} "
                                  f"({_clock(now - self.began)} so far{eta})", file=sys.stderr)

    def finish(self) -> None:
        distributed.print_on_main(f"sftmix run: all {len(self.stages)} stages done in "
                                  f"{_clock(self.clock() - self.began)}; writing the report", file=sys.stderr)

    def _estimate(self, stage: str) -> float | None:
        kind = self._kind(stage)
        seen = self.took.get(kind) or (self.took.get("reference") if kind == "train" else None)
        return sum(seen) / len(seen) if seen else None

    @staticmethod
    def _kind(stage: str) -> str:
        return stage.split()[0]


def _clock(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _dynamics_stage(config: RunConfig, run_dir: Path, train_path: str, weights: dict) -> None:
    """`dynamics/`: Stage 1 on the training part, keyed like `sftmix dynamics`' own results (`result_settings`)."""
    dyn_config = _stage_config(DynamicsConfig, config, output_dir=str(run_dir / "dynamics"),
                               num_train_epochs=config.dynamics_epochs, seed=config.seeds[0],
                               dataset_path=train_path, max_examples=None, neftune_noise_alpha=None)
    inputs = {"data": _file_hash(train_path), "model_weights": weights,
              "checkpoints": [model_identity(path) for path in dyn_config.checkpoints or []]}
    _stage(run_dir / "dynamics", {**inputs, **keys.result_settings(dyn_config)}, lambda: dynamics(dyn_config))


def _train_stage(config: RunConfig, run_dir: Path, variant: str, seed: int, callbacks,
                 weights: dict) -> Path:
    """`<variant>-seed<S>`: the variant's loss (VARIANT_LOSS_TYPES) with every other setting of the run.

    Only `neftune` adds NEFTune's embedding noise; the mixing variants read the confidence split.
    """
    train_path, confidence_path = run_dir / "data" / "train.jsonl", run_dir / "dynamics" / "confidence.jsonl"
    loss_type = VARIANT_LOSS_TYPES[variant]
    mixing = loss_type != "ntp"
    train_config = _stage_config(
        SFTMixConfig, config, output_dir=str(run_dir / f"{variant}-seed{seed}"), seed=seed,
        loss_type=loss_type, confidence_path=str(confidence_path) if mixing else None,
        neftune_noise_alpha=config.neftune_noise_alpha if variant == "neftune" else None,
        dataset_path=str(train_path), max_examples=None, eval_dataset_path=str(run_dir / "data" / "heldout.jsonl"),
    )
    inputs = {"data": _file_hash(str(train_path)), "confidence": _file_hash(str(confidence_path)) if mixing else None,
              "model_weights": weights}
    _stage(Path(train_config.output_dir), {**inputs, **keys.result_settings(train_config)},
           lambda: train(train_config, callbacks=callbacks))
    return Path(train_config.output_dir)


def _reference_sets(config: RunConfig, data_dir: Path) -> list[str]:
    """The eval_datasets to score: as given, or their first `eval_max_examples` records (data/references/).

    The held-out split is always scored whole; the cut copies keep their file stem (the set's name in
    the report) and are rewritten only when their content changes.
    """
    if config.eval_max_examples is None:
        return list(config.eval_datasets or [])
    from ..data import load_records

    paths = []
    for source in config.eval_datasets or []:
        records, _ = load_records(source)
        text = jsonl_text((record.data for record in records[: config.eval_max_examples]), user_data=True)
        target = data_dir / "references" / f"{Path(source).stem}.jsonl"
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            write_atomic(target, text)
        paths.append(str(target))
    return paths


def _eval_stage(config: RunConfig, run_dir: Path, model_dir: Path, references: list[str] | None = None) -> None:
    """`eval/<variant>-seed<S>`: held-out split + reference sets (`_reference_sets`), answers, confidence spread.

    No judge setting enters this stage (or its key): the official scorer is a stage of its own
    (`_alpaca_eval_stage`), so scoring again never generates the answers again.
    """
    heldout, train_path = str(run_dir / "data" / "heldout.jsonl"), str(run_dir / "data" / "train.jsonl")
    references = list(config.eval_datasets or []) if references is None else references
    eval_config = EvalConfig(
        model=str(model_dir), dataset=[heldout, *references],
        prompts=config.generation_prompts or heldout, confidence_dataset=train_path,
        confidence_max_examples=config.num_confidence_examples,
        output_dir=str(run_dir / "eval" / model_dir.name), generator=model_dir.name, max_length=config.max_length,
        num_generations=config.num_generations, max_new_tokens=config.max_new_tokens,
        batch_size=config.per_device_train_batch_size, scoring_batch_tokens=config.scoring_batch_tokens,
        sharded_scoring=config.sharded_scoring, use_cpu=config.use_cpu, trust_remote_code=config.trust_remote_code,
        attn_implementation=config.attn_implementation,
        mt_bench_questions=config.mt_bench_questions, alpaca_eval_scorer="off",
    )
    settings = {name: value for name, value in vars(eval_config).items() if not keys.is_bookkeeping(name)}
    inputs = {"model_weights": model_identity(model_dir),
              "file_contents": [_file_hash(path) for path in [*eval_config.dataset, eval_config.prompts, train_path]]}
    _stage(Path(eval_config.output_dir), {**settings, **inputs}, lambda: evaluate(eval_config), run_dir=run_dir)


def _alpaca_eval_stage(config: RunConfig, run_dir: Path, name: str) -> None:
    """`alpaca_eval/<variant>-seed<S>`: the official AlpacaEval 2 score of `eval/<name>/model_outputs.json`.

    A stage of its own, keyed by the hash of the answers and the judge settings: a scorer failure
    leaves the answers in place (the rerun only scores), and a new annotator, reference or judge
    endpoint scores the same answers again. The score is copied into `eval/<name>/metrics.json`,
    where the report reads it, and taken out of it when this run does not score.
    """
    eval_dir, stage_dir = run_dir / "eval" / name, run_dir / "alpaca_eval" / name
    answers, score = eval_dir / "model_outputs.json", stage_dir / "score.json"
    if config.official_scorer:
        reference = config.alpaca_eval_reference
        key = {"answers": _file_hash(str(answers)), "alpaca_eval_annotator": config.alpaca_eval_annotator,
               "alpaca_eval_reference": reference, "reference_content": _file_hash(reference) if reference else None,
               "judge_base_url": config.judge_base_url}
        _stage(stage_dir, key, lambda: distributed.on_main(_write_official_score, config, answers, score, name))
    distributed.on_main(_file_official_score, eval_dir / "metrics.json", score if config.official_scorer else None)


def _write_official_score(config: RunConfig, answers: Path, score: Path, name: str) -> None:
    write_atomic(score, json.dumps(_official_score(config, answers, score.parent, name), indent=2))


def _file_official_score(metrics_path: Path, score: Path | None) -> None:
    """Put the official score (the `score` file, or none) into an eval stage's metrics.json."""
    metrics = json.loads(metrics_path.read_text())
    filed = metrics.pop("alpaca_eval", None)
    if score is not None:
        metrics["alpaca_eval"] = json.loads(score.read_text())
    if metrics.get("alpaca_eval") != filed:
        write_atomic(metrics_path, json.dumps(metrics, indent=2))


def hold_out(config: RunConfig, data_dir: Path) -> None:
    """Write data/train.jsonl and data/heldout.jsonl: a deterministic split by hashed example id."""
    from ..data import default_dataset_path, example_id, load_records, to_messages

    records, report = load_records(config.dataset_path or default_dataset_path(), config.dataset_split)
    records = records[: config.max_examples]
    seed = config.seeds[0]

    def rank(record) -> str:
        identifier = example_id(record, to_messages(record))
        return hashlib.sha256(f"{seed}:{identifier}".encode()).hexdigest()

    ordered = sorted(records, key=rank)
    num_heldout = max(1, round(len(ordered) * config.eval_fraction))
    heldout, training = ordered[:num_heldout], ordered[num_heldout:]
    if len(training) < 2:
        raise InputError(f"{report.source}: eval_fraction {config.eval_fraction} of {len(ordered)} records leaves "
                         f"{len(training)} for training; use more data or a smaller --eval_fraction")
    write_jsonl(data_dir / "heldout.jsonl", (record.data for record in heldout), user_data=True)
    write_jsonl(data_dir / "train.jsonl", (record.data for record in training), user_data=True)
    write_atomic(data_dir / "split.json", json.dumps({"source": report.source, "train": len(training),
                                                      "heldout": len(heldout), "load_report": vars(report)}, indent=2))


def _stage_config(config_class, run_config: RunConfig, **overrides):
    """A stage's config: every field it shares with the run config, plus the overrides."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(config_class) if f.init}
    values = {name: copy.deepcopy(getattr(run_config, name)) for name in names if hasattr(run_config, name)}
    values.update(dataset_name=None, dataset_config=None, datasets=[])  # resolve_datasets made them dataset_path
    values.update(resume_from_checkpoint=None)  # every stage resumes from its own checkpoints
    values.update(overrides)
    return config_class(**values)


def _file_hash(path: str) -> str | None:
    return file_hash(path) if Path(path).is_file() else None


def _stage(directory: Path, key: dict, work, run_dir: Path | None = None) -> None:
    """Run `work` unless `directory` holds a finished stage with the same key.

    The key is compared with its paths resolved (and relative to the run folder, `run_dir`,
    default the stage's parent), so spelling the run folder another way redoes nothing. A
    folder left by a killed stage with the same key is kept (the stage resumes from its
    checkpoints / score files); one made with another key is removed first, with a message
    naming what changed; a folder sftmix did not make is never removed. Rank 0 decides and
    keeps the books; every rank does the work (each stage coordinates its own writes).
    """
    key = keys.stage_key(key, run_dir if run_dir is not None else directory.parent)
    digest = keys.digest(key)
    if distributed.on_main(_open_stage, directory, digest, key) == "done":
        logger.warning("Stage %s: up to date, skipped", directory.name)
        return
    work()
    distributed.on_main(_close_stage, directory, digest, key)


def _open_stage(directory: Path, digest: str, key: dict) -> str:
    """'done' when the stage is finished with this key; else prepare its folder and return 'run'."""
    done, pending = directory / "stage.json", directory / "stage.pending.json"
    finished = json.loads(done.read_text()) if done.exists() else None
    if finished is not None and finished["key"] == digest:
        return "done"
    if directory.exists() and not (pending.exists() and json.loads(pending.read_text())["key"] == digest):
        made_by_us = finished is not None or pending.exists()
        others = sorted(path.name for path in directory.iterdir() if path.name != OutputLock.FILE)
        if not made_by_us and others:
            raise InputError(f"{directory} holds files that `sftmix run` did not make (e.g. {others[:3]}); move them "
                             "away or use another --output_dir: sftmix never deletes what it did not write")
        if finished is not None:
            logger.warning("Stage %s: settings changed since it finished (%s); it is redone and its results replaced",
                           directory.name, keys.key_changes(finished.get("inputs", {}), key))
        shutil.rmtree(directory)
    write_atomic(pending, json.dumps({"key": digest}))
    done.unlink(missing_ok=True)
    return "run"


def _close_stage(directory: Path, digest: str, key: dict) -> None:
    write_atomic(directory / "stage.json", json.dumps({"key": digest, "inputs": key}, indent=2, default=str))
    (directory / "stage.pending.json").unlink()
