"""Every figure sftmix draws, as PNG files: the confidence histogram and data map of Stage 1, and the run
report's loss curves and differences to NTP. Numbers come in as plain rows; nothing here computes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .config import VARIANT_TITLES


def pyplot():
    """matplotlib.pyplot on the headless Agg backend (sftmix only writes PNG files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str | Path) -> None:
    """tight_layout, then save the PNG atomically and close the figure."""
    path = Path(path)
    figure.tight_layout()
    staging = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(staging, dpi=120)
    pyplot().close(figure)
    staging.replace(path)


def plot_confidence(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    import numpy as np

    plt = pyplot()

    figure, axis = plt.subplots(figsize=(7, 4))
    everything = np.array([row["confidence"] for row in rows])
    # Perplexity has a long tail (a response truncated to one token can score 10^4): the lowest 1% would
    # squeeze every other example into one bar, so the x-range starts at the 1st percentile.
    low = float(np.percentile(everything, 1)) if len(everything) >= 100 else float(everything.min())
    bins = np.histogram_bin_edges(everything[everything >= low], bins=40)  # shared by both groups
    for group, colour in (("confident", "tab:blue"), ("unconfident", "tab:orange")):
        values = [row["confidence"] for row in rows if row["group"] == group and row["confidence"] >= low]
        axis.hist(values, bins=bins, alpha=0.7, color=colour, label=f"{group} ({len(values)} shown)")
    hidden = int((everything < low).sum())
    if hidden:
        title = f"{title or 'SFTMix confidence'}; {hidden} below {low:.3g} not shown"
    median = float(np.median(everything))
    axis.axvline(median, color="black", linestyle="--", label=f"median {median:.3g}")
    axis.set_xlabel("confidence = - mean perplexity over checkpoints")
    axis.set_ylabel("examples")
    axis.set_title(title or "SFTMix confidence")
    axis.legend()
    save_figure(figure, path)


def plot_data_map(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Dataset-Cartography-style map: confidence (y) against variability (x), one colour per group.

    Perplexity has a long tail, so both axes are cut at the 1st/99th percentile (with 100+ examples)
    and the title says how many points fall outside.
    """
    import numpy as np

    plt = pyplot()

    confidences = np.array([row["confidence"] for row in rows])
    spreads = np.array([row["variability"] for row in rows])
    if len(rows) >= 100:
        low_conf, high_var = np.percentile(confidences, 1), np.percentile(spreads, 99)
    else:
        low_conf, high_var = confidences.min(), spreads.max()
    shown = (confidences >= low_conf) & (spreads <= high_var)
    figure, axis = plt.subplots(figsize=(6, 5))
    for group, colour in (("confident", "tab:blue"), ("unconfident", "tab:orange")):
        member = shown & np.array([row["group"] == group for row in rows])
        axis.scatter(spreads[member], confidences[member], s=10, alpha=0.6, color=colour,
                     label=f"{group} ({int(member.sum())} shown)")
    hidden = int((~shown).sum())
    title = title or "Data map"
    if hidden:
        title += f"; {hidden} outside the 1st/99th percentiles not shown"
    axis.set_xlabel("variability = std of perplexity over checkpoints")
    axis.set_ylabel("confidence = - mean perplexity over checkpoints")
    axis.set_title(title, fontsize=10)
    axis.legend()
    save_figure(figure, path)


def plot_losses(run_dir: Path, variants: list[str], seeds: list[int], path: Path) -> None:
    """Training loss per step: one colour per variant (every seed), solid NTP term, dotted Mixup term."""
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(7, 4))
    for number, variant in enumerate(variants):
        colour = f"C{number}"
        for seed_number, seed in enumerate(seeds):
            state = run_dir / f"{variant}-seed{seed}" / "trainer_state.json"
            history = json.loads(state.read_text())["log_history"] if state.exists() else []
            for key, style in (("ntp_loss", "-"), ("mixup_loss", ":"), ("eval_loss", "--")):
                points = [(entry["step"], entry[key]) for entry in history if key in entry]
                if points:
                    label = f"{VARIANT_TITLES.get(variant, variant)}: {key}" if seed_number == 0 else None
                    axis.plot(*zip(*points), style, color=colour, marker=".", alpha=0.8, label=label)
    axis.set_xlabel("optimisation step")
    axis.set_ylabel("loss (per token)")
    axis.set_title(f"Training loss (NTP and Mixup terms) and held-out loss, {len(seeds)} seed(s) per variant")
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8)
    save_figure(figure, path)


def plot_differences(comparisons: list[dict], path: Path) -> None:
    """One panel per (metric, eval set): each variant's difference to NTP, its interval and the per-seed values."""
    plt = pyplot()
    panels = list(dict.fromkeys((row["metric"], row["eval_set"]) for row in comparisons))
    figure, axes = plt.subplots(len(panels), 1, figsize=(7, 1.0 + 0.5 * len(comparisons) + 0.8 * len(panels)),
                                squeeze=False)
    for axis, (metric, eval_set) in zip(axes[:, 0], panels):
        rows = [row for row in comparisons if (row["metric"], row["eval_set"]) == (metric, eval_set)]
        for position, row in enumerate(rows):
            error = [[row["estimate"] - row["low"]], [row["high"] - row["estimate"]]]
            axis.errorbar(row["estimate"], position, xerr=error, fmt="o", color="black", capsize=4,
                          label=f"mean, {row['level']:.0%} interval" if not position else None)
            axis.scatter(row["per_seed"], [position] * len(row["per_seed"]), color="tab:orange", marker="x", zorder=3,
                         label="one seed" if not position else None)
        axis.axvline(0, color="grey", linestyle="--")
        axis.set_yticks(range(len(rows)), [VARIANT_TITLES.get(row["variant"], row["variant"]) for row in rows])
        axis.set_ylim(len(rows) - 0.3, -0.7)  # the first variant on top
        axis.set_title(f"{metric} on {eval_set}: variant - NTP (lower is "
                       + ("better)" if metric == "response NLL" else "a narrower spread)"), fontsize=10)
        axis.legend(fontsize=7, loc="best")
    figure.supxlabel("difference to NTP")
    save_figure(figure, path)
