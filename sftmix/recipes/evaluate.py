"""`sftmix eval`: held-out / reference NLL -> generations -> confidence spread -> metrics.json."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from .. import distributed
from ..config import EvalConfig, RunConfig
from ..data import build_dataset, load_prompts
from ..files import write_atomic, write_jsonl
from ..model import check_vocabulary, inference_dtype, load_tokenizer
from .common import claims_output_dir
from .dynamics import _inference_model, sharded_scoring

logger = logging.getLogger(__name__)


@claims_output_dir
def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Score, generate and diagnose one model; writes metrics.json (+ outputs) to `config.output_dir`.

    Under a launcher every rank scores and answers its share; rank 0 writes the files.
    """
    from .. import evaluation as ev

    started, scored_tokens = time.perf_counter(), 0
    tokenizer = load_tokenizer(config.model, config.trust_remote_code, config.chat_template_path, option="--model")
    device = distributed.device(config.use_cpu)
    dtype = config.dtype or inference_dtype(device)
    sharded = sharded_scoring(config, config.model, dtype, device)
    model, engine = _inference_model(config.model, config, dtype, device, sharded)
    check_vocabulary(model, tokenizer, config.model)
    metrics: dict[str, Any] = {"model": config.model, "likelihood": {}}
    files: dict[str, Any] = {}  # file name -> rows, written by rank 0 at the end
    for path, name in zip(config.dataset or [], ev.set_names(config.dataset or [])):
        dataset, _ = distributed.main_first(build_dataset, path, tokenizer, config.max_length, config.max_examples)
        scored_tokens += sum(len(row) for row in dataset["input_ids"])
        result = ev.response_perplexity(model, dataset, tokenizer.pad_token_id, config.scoring_batch_tokens,
                                        desc=f"NLL {name}", sharded=sharded)
        files[f"nll-{name}.jsonl"] = result.pop("per_example")
        metrics["likelihood"][name] = result | {"path": str(path)}
    if config.prompts:
        metrics["generation"] = _generate(config, model, tokenizer, files, sharded)
    if config.mt_bench_questions:
        metrics["mt_bench"] = _answer_mt_bench(config, model, tokenizer, files, sharded)
    if config.confidence_dataset:
        dataset, _ = distributed.main_first(build_dataset, config.confidence_dataset, tokenizer, config.max_length,
                                            config.confidence_max_examples)
        scored_tokens += sum(len(row) for row in dataset["input_ids"])
        spread = ev.confidence_spread(model, dataset, tokenizer.pad_token_id, config.scoring_batch_tokens,
                                      sharded=sharded)
        files["confidence_spread.jsonl"] = spread.pop("per_example")
        metrics["confidence"] = spread
    # what the evaluation cost (the official scorer, a remote judge, is not counted)
    metrics["cost"] = {"seconds": round(time.perf_counter() - started, 3), "tokens": scored_tokens,
                       "sharded": sharded}
    del engine  # the partitioned model's engine lives as long as the model is used
    output_dir = Path(config.output_dir)
    distributed.on_main(_write_eval_outputs, output_dir, metrics, files)
    if config.official_scorer:  # decided by the config; the answers and every other number are on disk first
        metrics["alpaca_eval"] = distributed.on_main(_official_score, config, output_dir / "model_outputs.json",
                                                     output_dir / "alpaca_eval", _generator(config))
        distributed.on_main(write_atomic, output_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def _official_score(config: EvalConfig | RunConfig, model_outputs: Path, output_dir: Path, name: str) -> dict[str, Any]:
    """The official AlpacaEval 2 score of `model_outputs` with the config's annotator, reference and judge."""
    from .. import evaluation as ev

    return ev.run_alpaca_eval(model_outputs, output_dir, name, config.alpaca_eval_annotator,
                              config.alpaca_eval_reference, config.judge_base_url, config.judge_api_key_env)


def _generator(config: EvalConfig) -> str:
    """The name the answers are filed under (model_outputs.json, MT-Bench answers, the leaderboard)."""
    return config.generator or Path(config.model).name


def _answer_mt_bench(config: EvalConfig, model, tokenizer, files: dict[str, Any], sharded: bool) -> dict[str, Any]:
    """FastChat MT-Bench answers (model_answer format), every turn answered greedily in order."""
    from .. import evaluation as ev

    questions = load_prompts(config.mt_bench_questions)
    answers = ev.generate_answers(model, tokenizer, [q["turns"] for q in questions], config.max_new_tokens,
                                  config.batch_size, desc="MT-Bench", sharded=sharded)
    files["mt_bench_answers.jsonl"] = ev.mt_bench_answers(questions, answers, _generator(config))
    return {"questions": len(questions), "turns": sum(len(q["turns"]) for q in questions)}


def _generate(config: EvalConfig, model, tokenizer, files: dict[str, Any], sharded: bool) -> dict[str, Any]:
    """Answers in AlpacaEval format, and in MT-Bench format when a prompt has several turns."""
    from .. import evaluation as ev

    prompts = load_prompts(config.prompts, config.num_generations)
    answers = ev.generate_answers(model, tokenizer, [p["turns"] for p in prompts], config.max_new_tokens,
                                  config.batch_size, sharded=sharded)
    generator = _generator(config)
    files["model_outputs.json"] = ev.alpaca_eval_outputs(prompts, answers, generator)
    if any(len(p["turns"]) > 1 for p in prompts) and not config.mt_bench_questions:
        files["mt_bench_answers.jsonl"] = ev.mt_bench_answers(prompts, answers, generator)
    return {"prompts": len(prompts), "mean_answer_words": sum(len(a[0].split()) for a in answers) / len(answers)}


def _write_eval_outputs(output_dir: Path, metrics: dict[str, Any], files: dict[str, Any]) -> None:
    for name, rows in files.items():
        if name.endswith(".jsonl"):
            write_jsonl(output_dir / name, rows)
        else:
            write_atomic(output_dir / name, json.dumps(rows, indent=2))
    write_atomic(output_dir / "metrics.json", json.dumps(metrics, indent=2))
