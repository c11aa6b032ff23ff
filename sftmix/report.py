"""The run report: metrics.json (every number), report.md and its PNG plots (numbers read from metrics.json)."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path
from typing import Any

from .files import write_atomic


def judge_stage(config, run_dir: Path) -> None:
    """Pairwise SFTMix-vs-NTP judging of each seed's generations; failures are listed, not counted."""
    from .eval import JudgeClient, pairwise_judge

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


def summarise(per_seed: dict[str, list[dict[str, float]]]) -> list[dict[str, Any]]:
    """Rows of mean/std per metric for each variant, and the SFTMix - NTP difference."""
    metrics = list(dict.fromkeys(key for runs in per_seed.values() for run in runs for key in run))
    rows = []
    for metric in metrics:
        row: dict[str, Any] = {"metric": metric}
        for variant, runs in per_seed.items():
            values = [run[metric] for run in runs if metric in run]
            if values:
                row[variant] = statistics.fmean(values)
                row[f"{variant}_std"] = statistics.stdev(values) if len(values) > 1 else None
        if "sftmix" in row and "ntp" in row:
            row["diff"] = row["sftmix"] - row["ntp"]
        rows.append(row)
    return rows


def write_report(run_dir: Path, config) -> Path:
    variants = ["sftmix"] + ([] if config.no_baseline else ["ntp"])
    per_seed = {v: [run_metrics(run_dir, f"{v}-seed{s}", s) for s in config.seeds] for v in variants}
    dynamics = json.loads((run_dir / "dynamics" / "dynamics.json").read_text())
    metrics = {
        "seeds": config.seeds,
        "runs": {f"{v}-seed{s}": run for v in variants for s, run in zip(config.seeds, per_seed[v])},
        "table": summarise(per_seed),
        "split": dynamics["summary"],
        "data": json.loads((run_dir / "data" / "split.json").read_text()),
    }
    judged = judge_summary(run_dir, config.seeds)
    if judged:
        metrics["judge"] = judged
    write_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    plot_losses(run_dir, variants, config.seeds, run_dir / "loss_curves.png")
    shutil.copyfile(run_dir / "dynamics" / "confidence.png", run_dir / "confidence.png")
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


def plot_losses(run_dir: Path, variants: list[str], seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for variant in variants:
        for seed in seeds:
            state = run_dir / f"{variant}-seed{seed}" / "trainer_state.json"
            history = json.loads(state.read_text())["log_history"] if state.exists() else []
            for key, style in (("ntp_loss", "-"), ("mixup_loss", ":"), ("eval_loss", "--")):
                points = [(entry["step"], entry[key]) for entry in history if key in entry]
                if points:
                    axis.plot(*zip(*points), style, marker=".", label=f"{variant} seed {seed}: {key}")
    axis.set_xlabel("optimisation step")
    axis.set_ylabel("loss (per token)")
    axis.set_title("Training loss (NTP and Mixup terms) and held-out loss")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _number(value: Any, std: Any = None) -> str:
    if value is None:
        return "-"
    text = f"{value:.4g}"
    return f"{text} ± {std:.2g}" if std is not None else text


def render(run_dir: Path, config, metrics: dict[str, Any]) -> str:
    variants = ["sftmix"] + ([] if config.no_baseline else ["ntp"])
    split = metrics["split"]
    trained = split["confident"]["count"] + split["unconfident"]["count"]
    lines = [
        "# SFTMix vs NTP",
        "",
        f"Model `{config.model_name_or_path or 'SmolLM2-135M-Instruct (embedded)'}`, data "
        f"`{config.dataset_path or 'ShareGPT V3 (embedded)'}`: {metrics['data']['train']} training / "
        f"{metrics['data']['heldout']} held-out records, {trained} training examples left after tokenisation "
        f"(max_length {config.max_length}); loss `{config.loss_type}` (mu = {config.mixup_weight}, "
        f"alpha = {config.mixup_alpha}); seeds {', '.join(map(str, config.seeds))}. Every number below is read "
        "from `metrics.json`.",
        "",
        "## Metrics",
        "",
        "| metric | " + " | ".join(v.upper() if v == "ntp" else "SFTMix" for v in variants)
        + (" | SFTMix - NTP |" if "ntp" in variants else " |"),
        "|---|" + "---|" * len(variants) + ("---|" if "ntp" in variants else ""),
    ]
    for row in metrics["table"]:
        cells = [_number(row.get(v), row.get(f"{v}_std")) for v in variants]
        if "ntp" in variants:
            cells.append(_number(row.get("diff")))
        lines.append(f"| {row['metric']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Lower NLL / perplexity is better. With one seed a difference may be noise: "
        "`--seeds 1 2 3` reports mean ± std.",
        "",
        *_judge_lines(metrics.get("judge", {})),
        "## Training loss",
        "",
        "![loss curves](loss_curves.png)",
        "",
        "## Confidence split (reference run)",
        "",
        f"{split['confident']['count']} confident / {split['unconfident']['count']} unconfident examples; "
        f"median confidence {split['all']['median']:.4g}.",
        "",
        "![confidence histogram](confidence.png)",
        "",
        *_generations(run_dir, variants, config.seeds[0]),
        "",
        "---",
        "SFTMix: Xiao et al., arXiv:2410.05248. Generated by `sftmix run`.",
    ]
    return "\n".join(lines) + "\n"


def _generations(run_dir: Path, variants: list[str], seed: int, count: int = 3) -> list[str]:
    outputs = {}
    for variant in variants:
        path = run_dir / "eval" / f"{variant}-seed{seed}" / "model_outputs.json"
        if path.exists():
            outputs[variant] = json.loads(path.read_text())
    if not outputs:
        return []
    lines = ["## Generations (first prompts, greedy)", ""]
    first = next(iter(outputs.values()))
    for index, row in enumerate(first[:count]):
        lines += [f"**Prompt {index + 1}.** {_quote(row['instruction'], 300)}", ""]
        for variant, rows in outputs.items():
            lines += [f"*{'SFTMix' if variant == 'sftmix' else 'NTP'}:* {_quote(rows[index]['output'], 500)}", ""]
    return lines


def _quote(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " …"
