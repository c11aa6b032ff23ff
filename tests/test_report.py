"""The run report on a hand-made run directory (fixed numbers, no training): tables, intervals, verdicts, plots."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from sftmix import report

# per-example response NLL (mean over the example's tokens) and token counts on the held-out set
TOKENS = [10, 30, 20, 40]
HELDOUT = {
    ("ntp", 1): [2.0, 1.0, 3.0, 1.5],
    ("ntp", 2): [2.1, 1.1, 2.9, 1.6],
    ("sftmix", 1): [1.5, 0.5, 2.5, 1.0],  # 0.5 better on every example
    ("sftmix", 2): [1.6, 0.6, 2.4, 1.1],
    ("equal", 1): [2.0, 1.0, 3.0, 1.5],  # identical to NTP
    ("equal", 2): [2.1, 1.1, 2.9, 1.6],
}
CONFIDENCE = {  # per-example confidence on 4 training examples
    "ntp": [-2.0, -4.0, -6.0, -8.0],
    "sftmix": [-3.0, -4.0, -5.0, -6.0],  # narrower spread
    "equal": [-2.0, -4.0, -6.0, -8.0],
}


def write_run(run_dir: Path, seeds=(1, 2), variants=("ntp", "sftmix", "equal")) -> SimpleNamespace:
    (run_dir / "data").mkdir(parents=True)
    (run_dir / "data" / "split.json").write_text(json.dumps({"train": 20, "heldout": 4}))
    (run_dir / "dynamics").mkdir()
    summary = {"all": {"median": -3.0}, "confident": {"count": 2}, "unconfident": {"count": 2},
               "variability": {"all": {"median": 0.5}, "confident": {"median": 0.2}, "unconfident": {"median": 0.9}}}
    (run_dir / "dynamics" / "dynamics.json").write_text(json.dumps({"summary": summary}))
    from sftmix.plots import plot_confidence, plot_data_map

    rows = [{"id": f"t{i}", "confidence": -float(i), "variability": i / 2, "group": "confident" if i < 2 else
             "unconfident"} for i in range(4)]
    plot_confidence(rows, run_dir / "dynamics" / "confidence.png")
    plot_data_map(rows, run_dir / "dynamics" / "data_map.png")
    for variant in variants:
        for seed in seeds:
            directory = run_dir / "eval" / f"{variant}-seed{seed}"
            directory.mkdir(parents=True)
            values = HELDOUT[(variant, seed)]
            nll = sum(v * t for v, t in zip(values, TOKENS)) / sum(TOKENS)
            spread = float(np.std(CONFIDENCE[variant], ddof=1))
            (directory / "metrics.json").write_text(json.dumps({
                "likelihood": {"heldout": {"nll": nll, "perplexity": float(np.exp(nll))}},
                "confidence": {"confidence_std": spread}}))
            # written in another order than NTP's: the report must pair by id
            order = [3, 1, 2, 0] if variant != "ntp" else [0, 1, 2, 3]
            (directory / "nll-heldout.jsonl").write_text("".join(
                json.dumps({"id": f"h{i}", "nll": values[i], "num_tokens": TOKENS[i]}) + "\n" for i in order))
            (directory / "confidence_spread.jsonl").write_text("".join(
                json.dumps({"id": f"t{i}", "confidence": CONFIDENCE[variant][i]}) + "\n" for i in order))
    return SimpleNamespace(variants=list(variants), seeds=list(seeds), bootstrap_resamples=2000,
                           model_name_or_path=None, dataset_path=None, max_length=64, mixup_weight=0.2,
                           mixup_alpha=0.5, neftune_noise_alpha=5.0)


def test_report_tables_intervals_and_verdicts(tmp_path):
    config = write_run(tmp_path)
    report.write_report(tmp_path, config)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    rows = {row["metric"]: row for row in metrics["table"]}
    heldout = rows["heldout response NLL"]
    ntp = [sum(v * t for v, t in zip(HELDOUT[("ntp", s)], TOKENS)) / sum(TOKENS) for s in (1, 2)]
    assert heldout["ntp"] == pytest.approx(np.mean(ntp))
    assert heldout["ntp_std"] == pytest.approx(np.std(ntp, ddof=1))
    assert heldout["sftmix_minus_ntp"] == pytest.approx(-0.5)
    assert heldout["equal_minus_ntp"] == pytest.approx(0.0)

    comparisons = {(row["variant"], row["metric"]): row for row in metrics["comparisons"]}
    assert set(comparisons) == {(v, m) for v in ("sftmix", "equal") for m in ("response NLL", "confidence std")}
    better = comparisons[("sftmix", "response NLL")]
    # every example and seed is exactly 0.5 lower: every bootstrap replicate is -0.5
    assert (better["estimate"], better["low"], better["high"]) == pytest.approx((-0.5, -0.5, -0.5))
    assert better["verdict"] == "better" and better["num_seeds"] == 2 and better["num_examples"] == 4
    same = comparisons[("equal", "response NLL")]
    assert (same["low"], same["high"], same["verdict"]) == (0.0, 0.0, "no detectable difference")
    spread = comparisons[("sftmix", "confidence std")]
    assert spread["estimate"] == pytest.approx(np.std(CONFIDENCE["sftmix"], ddof=1) - np.std(CONFIDENCE["ntp"], ddof=1))
    assert spread["high"] <= 0 and spread["verdict"] in ("lower (as in the paper)", "no detectable difference")

    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# NTP vs SFTMix vs NTP+Mixup equal")
    assert f"| heldout response NLL | {heldout['ntp']:.4g} ± {heldout['ntp_std']:.2g} |" in text
    assert "| SFTMix | response NLL | heldout | -0.5 | [-0.5, -0.5] | -0.5, -0.5 | **better** |" in text
    assert "One seed" not in text
    for png in ("differences.png", "data_map.png", "confidence.png", "loss_curves.png"):
        assert (tmp_path / png).stat().st_size > 3000
    assert "![data map](data_map.png)" in text and "![differences to NTP](differences.png)" in text


def test_one_seed_says_seed_noise_is_not_covered(tmp_path):
    config = write_run(tmp_path, seeds=(1,), variants=("ntp", "sftmix"))
    report.write_report(tmp_path, config)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert all(not row["seed_noise_covered"] for row in metrics["comparisons"])
    assert "One seed: the intervals cover example noise only, not seed noise" in (tmp_path / "report.md").read_text()


def test_without_ntp_there_is_no_comparison(tmp_path):
    config = write_run(tmp_path, seeds=(1,), variants=("sftmix", "equal"))
    report.write_report(tmp_path, config)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["comparisons"] == [] and not (tmp_path / "differences.png").exists()
    assert "No NTP baseline in this run" in (tmp_path / "report.md").read_text()
