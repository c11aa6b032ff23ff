"""The run report: metrics.json (every number), report.md and its PNG plots (numbers read from metrics.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import stats
from .config import VARIANT_LOSS_TYPES, VARIANT_TITLES
from .files import copy_atomic, write_atomic
from .plots import plot_differences, plot_losses


def judge_stage(config, run_dir: Path) -> None:
    """Pairwise SFTMix-vs-NTP judging of each seed's generations; failures are listed, not counted."""
    from .evaluation import JudgeClient, pairwise_judge

    client = JudgeClient(config.judge_base_url, config.judge_model, config.judge_api_key_env)
    for seed in config.seeds:
        ours = json.loads((run_dir / "eval" / f"sftmix-seed{seed}" / "model_outputs.json").read_text())
        baseline = json.loads((run_dir / "eval" / f"ntp-seed{seed}" / "model_outputs.json").read_text())
        result = pairwise_judge(client, [row["instruction"] for row in ours], [row["output"] for row in ours],
                                [row["output"] for row in baseline])
        write_atomic(run_dir / "judge" / f"seed{seed}.json", json.dumps(result, indent=2))


def run_metrics(run_dir: Path, name: str, seed: int) -> dict[str, float]:
    """One trained model's flat metrics: likelihood per set, confidence spread, answer length, training."""
    metrics = json.loads((run_dir / "eval" / name / "metrics.json").read_text())
    flat: dict[str, float] = {}
    for set_name, result in metrics["likelihood"].items():
        flat[f"{set_name} response NLL"] = result["nll"]
        flat[f"{set_name} perplexity"] = result["perplexity"]
    if "confidence" in metrics:
        flat["confidence std on train (paper: lower after SFTMix)"] = metrics["confidence"]["confidence_std"]
    if "generation" in metrics:
        flat["answer length (words)"] = metrics["generation"]["mean_answer_words"]
    if "alpaca_eval" in metrics:  # the official scorer, against its reference model
        scored = metrics["alpaca_eval"]
        flat["AlpacaEval 2 LC win rate (%)"] = scored.get("length_controlled_winrate")
        flat["AlpacaEval 2 win rate (%)"] = scored.get("win_rate")
        flat = {key: value for key, value in flat.items() if value is not None}
    state = run_dir / name / "trainer_state.json"
    if state.exists():
        history = json.loads(state.read_text())["log_history"]
        runtime = [entry["train_runtime"] for entry in history if "train_runtime" in entry]
        if runtime:
            flat["train runtime (s)"] = runtime[-1]
    judged = run_dir / "judge" / f"seed{seed}.json"
    if name.startswith("sftmix") and judged.exists():
        rate = json.loads(judged.read_text())["sftmix_win_rate"]
        if rate is not None:
            flat["judge: SFTMix win rate vs NTP"] = rate
    return flat


BASELINE = "ntp"


def baseline_first(variants: list[str]) -> list[str]:
    """The report's column order: NTP (the baseline) first, then the others as given."""
    return sorted(variants, key=lambda variant: variant != BASELINE)


def summarise(per_seed: dict[str, list[dict[str, float]]]) -> list[dict[str, Any]]:
    """Per metric: each variant's mean and std over seeds, and each variant's mean difference to NTP."""
    metrics = list(dict.fromkeys(key for runs in per_seed.values() for run in runs for key in run))
    rows = []
    for metric in metrics:
        row: dict[str, Any] = {"metric": metric}
        for variant, runs in per_seed.items():
            values = [run[metric] for run in runs if metric in run]
            if values:
                row[variant], row[f"{variant}_std"] = stats.mean_std(values)
        for variant in per_seed:
            if variant != BASELINE and variant in row and BASELINE in row:
                row[f"{variant}_minus_ntp"] = row[variant] - row[BASELINE]
        rows.append(row)
    return rows


def compare_with_baseline(run_dir: Path, variants: list[str], seeds: list[int], resamples: int) -> list[dict]:
    """Each variant against NTP, paired by example and seed, with a two-level bootstrap interval.

    Held-out response NLL on every scored set (lower is better) and the paper's confidence-spread
    diagnostic (std of per-example confidence on the training set; the paper finds it lower after SFTMix).
    """
    eval_dir = run_dir / "eval"
    sets = list(json.loads((eval_dir / f"{BASELINE}-seed{seeds[0]}" / "metrics.json").read_text())["likelihood"])
    rows = []
    for variant in variants:
        if variant == BASELINE:
            continue
        for set_name in sets:
            values, reference, tokens = _paired(eval_dir, variant, seeds, f"nll-{set_name}.jsonl", "nll")
            interval = stats.two_level_bootstrap(values, reference, stats.weighted_mean_difference, tokens, resamples)
            rows.append({"variant": variant, "metric": "response NLL", "eval_set": set_name, **interval.as_dict(),
                         "verdict": stats.verdict(interval, lower="better", higher="worse")})
        if all((eval_dir / f"{name}-seed{seed}" / "confidence_spread.jsonl").exists()
               for name in (variant, BASELINE) for seed in seeds):
            values, reference, _ = _paired(eval_dir, variant, seeds, "confidence_spread.jsonl", "confidence")
            interval = stats.two_level_bootstrap(values, reference, stats.std_difference, None, resamples)
            rows.append({"variant": variant, "metric": "confidence std", "eval_set": "train", **interval.as_dict(),
                         "verdict": stats.verdict(interval, lower="lower (as in the paper)", higher="higher")})
    return rows


def _paired(eval_dir: Path, variant: str, seeds: list[int], file_name: str, field: str):
    """[S, n] arrays of `field` for a variant and NTP (NTP's example order) and of NTP's token counts."""
    import numpy as np

    from .files import read_jsonl

    values, reference, tokens = [], [], []
    for seed in seeds:
        path = eval_dir / f"{variant}-seed{seed}" / file_name
        ours, theirs = stats.pair_by_id(read_jsonl(path), read_jsonl(eval_dir / f"{BASELINE}-seed{seed}" / file_name),
                                        where=str(path))
        values.append([row[field] for row in ours])
        reference.append([row[field] for row in theirs])
        tokens.append([row.get("num_tokens", 1) for row in theirs])
    return np.array(values), np.array(reference), np.array(tokens, dtype=float)


def cost(run_dir: Path, variants: list[str], seeds: list[int]) -> dict[str, Any]:
    """What each stage cost (wall time, tokens processed: files the stages wrote) and SFTMix's overhead over NTP:
    for each mixing variant, (Stage 1 + its training) / NTP's training, the mean over seeds. Stage 1 (one
    reference run and C scoring passes) is shared by every mixing variant and seed; the ratio charges it whole to
    each model: the cost of adopting the recipe for one model."""
    from .trainer import training_cost

    stages: list[dict[str, Any]] = []
    dynamics_file = run_dir / "dynamics" / "dynamics.json"
    recorded = json.loads(dynamics_file.read_text()).get("cost") or {} if dynamics_file.exists() else {}
    stage_one = 0.0
    for name in ("reference run", "scoring"):
        if recorded.get(name):
            stages.append({"stage": f"Stage 1: {name}", **recorded[name]})
            stage_one += recorded[name]["seconds"]
    trainings: dict[str, dict[int, float]] = {}
    for variant in variants:
        for seed in seeds:
            state = run_dir / f"{variant}-seed{seed}" / "trainer_state.json"
            spent = training_cost(json.loads(state.read_text())["log_history"]) if state.exists() else None
            if spent:
                stages.append({"stage": f"train {variant}-seed{seed}", **spent})
                trainings.setdefault(variant, {})[seed] = spent["seconds"]
            evaluated = run_dir / "eval" / f"{variant}-seed{seed}" / "metrics.json"
            spent = json.loads(evaluated.read_text()).get("cost") if evaluated.exists() else None
            if spent:
                stages.append({"stage": f"evaluate {variant}-seed{seed}", **spent})
    overhead = {}
    for variant in variants:
        if VARIANT_LOSS_TYPES[variant] != "ntp" and BASELINE in trainings and variant in trainings:
            ratios = [(stage_one + trainings[variant][seed]) / trainings[BASELINE][seed] for seed in seeds
                      if seed in trainings[variant] and trainings[BASELINE].get(seed)]
            if ratios:
                overhead[variant] = sum(ratios) / len(ratios)
    return {"stages": stages, "stage_1_seconds": stage_one, "overhead_vs_ntp_training": overhead}


def write_report(run_dir: Path, config) -> Path:
    variants = baseline_first(config.variants)
    per_seed = {v: [run_metrics(run_dir, f"{v}-seed{s}", s) for s in config.seeds] for v in variants}
    mixing = any(VARIANT_LOSS_TYPES[variant] != "ntp" for variant in variants)  # else Stage 1 was skipped
    split = json.loads((run_dir / "dynamics" / "dynamics.json").read_text())["summary"] if mixing else None
    comparisons = (compare_with_baseline(run_dir, variants, config.seeds, config.bootstrap_resamples)
                   if BASELINE in variants else [])
    metrics = {
        "seeds": config.seeds,
        "variants": variants,
        "runs": {f"{v}-seed{s}": run for v in variants for s, run in zip(config.seeds, per_seed[v])},
        "table": summarise(per_seed),
        "comparisons": comparisons,
        "split": split,
        "data": json.loads((run_dir / "data" / "split.json").read_text()),
        "cost": cost(run_dir, variants, config.seeds),
    }
    if split is None:  # the examples left after tokenisation, as the training counted them
        trained = run_dir / f"{variants[0]}-seed{config.seeds[0]}" / "data_report.json"
        metrics["num_examples"] = json.loads(trained.read_text())["num_examples"]
    judged = judge_summary(run_dir, config.seeds)
    if judged:
        metrics["judge"] = judged
    write_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    plot_losses(run_dir, variants, config.seeds, run_dir / "loss_curves.png")
    for plot in ("confidence.png", "data_map.png"):
        if split is not None and (run_dir / "dynamics" / plot).exists():
            copy_atomic(run_dir / "dynamics" / plot, run_dir / plot)
        else:
            (run_dir / plot).unlink(missing_ok=True)  # not made this time (no split, or one checkpoint): not shown
    if comparisons:
        plot_differences(comparisons, run_dir / "differences.png")
    write_atomic(run_dir / "report.md", render(run_dir, config, json.loads((run_dir / "metrics.json").read_text())))
    return run_dir / "report.md"


def judge_summary(run_dir: Path, seeds: list[int]) -> dict[str, dict[str, Any]]:
    """Per seed: pairs judged, pairs failed (never counted as a win, loss or tie) and the win rate."""
    summary = {}
    for seed in seeds:
        path = run_dir / "judge" / f"seed{seed}.json"
        if path.exists():
            result = json.loads(path.read_text())
            summary[f"seed{seed}"] = {"judged": result["judged"], "failed": len(result["failed"]),
                                      "sftmix_win_rate": result["sftmix_win_rate"]}
    return summary


def _judge_lines(judged: dict[str, dict[str, Any]]) -> list[str]:
    if not judged:
        return []
    lines = ["## Pairwise judge (SFTMix vs NTP, both orders)", ""]
    for seed, result in judged.items():
        total = result["judged"] + result["failed"]
        rate = "-" if result["sftmix_win_rate"] is None else f"{result['sftmix_win_rate']:.3g}"
        failed = (f"**{result['failed']} of {total} pairs failed** (no verdict after retries; listed under `failed` "
                  f"in `judge/{seed}.json`, not counted)" if result["failed"] else "no pair failed")
        lines.append(f"- {seed}: {result['judged']} of {total} pairs judged, {failed}; SFTMix win rate {rate}.")
    return lines + [""]


def _number(value: Any, std: Any = None) -> str:
    if value is None:
        return "-"
    text = f"{value:.4g}"
    return f"{text} ± {std:.2g}" if std is not None else text


def render(run_dir: Path, config, metrics: dict[str, Any]) -> str:
    variants = metrics.get("variants") or baseline_first(getattr(config, "variants", None) or ["ntp", "sftmix"])
    titles = [VARIANT_TITLES.get(variant, variant) for variant in variants]
    others = [variant for variant in variants if variant != BASELINE] if BASELINE in variants else []
    split = metrics.get("split")
    trained = (split["confident"]["count"] + split["unconfident"]["count"] if split
               else metrics.get("num_examples", "?"))
    lines = [
        f"# {' vs '.join(titles)}",
        "",
        f"Model `{config.model_name_or_path or 'SmolLM2-135M-Instruct (embedded)'}`, data "
        f"`{config.dataset_path or 'ShareGPT V3 (embedded)'}`: {metrics['data']['train']} training / "
        f"{metrics['data']['heldout']} held-out records, {trained} training examples left after tokenisation "
        f"(max_length {config.max_length}); variants {', '.join(variants)} (mu = {config.mixup_weight}, "
        f"alpha = {config.mixup_alpha}"
        + (f", NEFTune alpha = {config.neftune_noise_alpha}" if "neftune" in variants else "")
        + f"); seeds {', '.join(map(str, config.seeds))}. Every number below is read from `metrics.json`.",
        "",
        "## Metrics (mean ± std over seeds)",
        "",
        "| metric | " + " | ".join(titles) + "".join(f" | {VARIANT_TITLES.get(v, v)} - NTP" for v in others) + " |",
        "|---|" + "---|" * (len(variants) + len(others)),
    ]
    for row in metrics["table"]:
        cells = [_number(row.get(v), row.get(f"{v}_std")) for v in variants]
        cells += [_number(row.get(f"{v}_minus_ntp")) for v in others]
        lines.append(f"| {row['metric']} | " + " | ".join(cells) + " |")
    lines += ["", "Lower NLL / perplexity is better.", "", *_comparison_section(metrics, variants), "",
              *_judge_lines(metrics.get("judge", {})),
              "## Training loss", "", "![loss curves](loss_curves.png)", "",
              *_split_section(run_dir, split), *_cost_section(metrics.get("cost")),
              *_generations(run_dir, variants, config.seeds[0]), "", "---",
              "SFTMix: Xiao et al., arXiv:2410.05248. Generated by `sftmix run`."]
    return "\n".join(lines) + "\n"


def _cost_section(spent: dict[str, Any] | None) -> list[str]:
    if not spent or not spent["stages"]:
        return []
    lines = ["## Cost", "", "| stage | wall time (s) | tokens processed |", "|---|---|---|"]
    lines += [f"| {row['stage']} | {row['seconds']:.1f} | {row['tokens'] if row['tokens'] is not None else '?'} |"
              for row in spent["stages"]]
    for variant, ratio in spent["overhead_vs_ntp_training"].items():
        lines += ["", f"{VARIANT_TITLES.get(variant, variant)} costs {ratio:.2f}x NTP's training: Stage 1 "
                  f"({spent['stage_1_seconds']:.0f} s: the reference run and any scoring passes, shared by every "
                  "mixing variant and seed, charged whole here) plus its own training, over NTP's training "
                  "(mean over seeds)."]
    return [*lines, ""]


def _comparison_section(metrics: dict[str, Any], variants: list[str]) -> list[str]:
    comparisons = metrics.get("comparisons", [])
    if not comparisons:
        return [] if BASELINE in variants else [
            "No NTP baseline in this run (`--variants` without ntp): no paired comparison."]
    first = comparisons[0]
    seeds = first["num_seeds"]
    lines = [
        "## Against NTP: paired differences with intervals",
        "",
        f"Difference = variant - NTP, paired by seed and example; mean over {seeds} seed(s). Interval: "
        f"{first['level']:.0%} percentile interval of a two-level bootstrap ({first['resamples']} resamples) that "
        "draws the seeds and the evaluation examples with replacement, so it covers both the training randomness "
        "and the choice of examples. Verdict: the whole interval below 0, above 0, or neither.",
        "",
    ]
    if seeds == 1:
        lines += ["**One seed: the intervals cover example noise only, not seed noise** (another seed can reverse a "
                  "difference); run `--seeds 1 2 3` for an answer that includes it.", ""]
    lines += ["| variant | metric | eval set | difference | interval | per seed | verdict |",
              "|---|---|---|---|---|---|---|"]
    for row in comparisons:
        per_seed = ", ".join(f"{value:+.3g}" for value in row["per_seed"])
        lines.append(f"| {VARIANT_TITLES.get(row['variant'], row['variant'])} | {row['metric']} | {row['eval_set']} | "
                     f"{row['estimate']:+.3g} | [{row['low']:+.3g}, {row['high']:+.3g}] | {per_seed} | "
                     f"**{row['verdict']}** |")
    lines += ["", "Response NLL: token-weighted over the set's response tokens (lower is better). Confidence std: "
              "std of per-example confidence (-perplexity) on training examples under the trained model (the paper "
              "reports it ~7% lower after SFTMix than after NTP).", "", "![differences to NTP](differences.png)"]
    return lines


def _split_section(run_dir: Path, split: dict[str, Any] | None) -> list[str]:
    if split is None:
        return ["No confidence split: no variant of this run mixes (Stage 1 skipped).", ""]
    return ["## Confidence split (reference run)", "",
            f"{split['confident']['count']} confident / {split['unconfident']['count']} unconfident examples; "
            f"median confidence {split['all']['median']:.4g}.", "", "![confidence histogram](confidence.png)", "",
            *_data_map_section(run_dir, split)]


def _data_map_section(run_dir: Path, split: dict[str, Any]) -> list[str]:
    if not (run_dir / "data_map.png").exists():
        return []
    variability = split.get("variability", {})
    medians = ", ".join(f"{group} {values['median']:.3g}" for group, values in variability.items() if values)
    return ["## Data map (beyond the paper)", "",
            "Each training example's confidence (minus mean perplexity over the reference checkpoints) against its "
            "variability (std of its perplexity over those checkpoints), as in Dataset Cartography"
            + (f"; median variability: {medians}." if medians else "."), "", "![data map](data_map.png)", ""]


def _generations(run_dir: Path, variants: list[str], seed: int, count: int = 3) -> list[str]:
    outputs = {}
    for variant in variants:
        path = run_dir / "eval" / f"{variant}-seed{seed}" / "model_outputs.json"
        if path.exists():
            outputs[variant] = json.loads(path.read_text())
    if not outputs:
        return []
    lines = [f"## Generations (first prompts, greedy, seed {seed})", ""]
    first = next(iter(outputs.values()))
    for index, row in enumerate(first[:count]):
        lines += [f"**Prompt {index + 1}.** {_quote(row['instruction'], 300)}", ""]
        for variant, rows in outputs.items():
            lines += [f"*{VARIANT_TITLES.get(variant, variant)}:* {_quote(rows[index]['output'], 500)}", ""]
    return lines


def _quote(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " …"
