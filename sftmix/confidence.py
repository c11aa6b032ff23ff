"""Confidence from training dynamics (method doc, Stage 1), from per-example response NLLs (torch only).

Perp_c(i) = exp(NLL_c(i) / |Y_i|) under checkpoint c; Conf(i) = -(1/C) sum_c Perp_c(i); the top `split_ratio`
by confidence is "confident", the rest "unconfident"; Var(i) is the spread of Perp_c(i) over checkpoints.
`sftmix dynamics` scores the checkpoints; any loop that records NLLs can call these functions.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InputError


@dataclass
class CheckpointScores:
    """Response NLL of every example (dataset order) under one checkpoint."""

    checkpoint: str
    nll_sum: list[float]
    num_tokens: list[int]
    seconds: float = 0.0  # wall time of the scoring pass (all ranks together)

    @property
    def perplexities(self) -> list[float]:
        return [math.exp(nll / max(count, 1)) for nll, count in zip(self.nll_sum, self.num_tokens)]




def mean_confidence(scores: list[CheckpointScores]) -> list[float]:
    """Conf(i) = -(1/C) sum_c Perp_c(i)."""
    per_checkpoint = [score.perplexities for score in scores]
    return [-sum(values) / len(values) for values in zip(*per_checkpoint)]


def split_groups(ids: list[str], confidences: list[float], split_ratio: float = 0.5) -> list[str]:
    """The top floor(n * split_ratio) by confidence are "confident"; ties and odd counts broken by id."""
    order = sorted(range(len(ids)), key=lambda index: (-confidences[index], ids[index]))
    num_confident = int(len(ids) * split_ratio)
    groups = ["unconfident"] * len(ids)
    for index in order[:num_confident]:
        groups[index] = "confident"
    return groups


def variability(scores: list[CheckpointScores]) -> list[float]:
    """Var(i) = std over checkpoints of Perp_c(i) (population std, as Dataset Cartography; 0 with C = 1)."""
    per_checkpoint = [score.perplexities for score in scores]
    return [statistics.pstdev(values) for values in zip(*per_checkpoint)]


def confidence_rows(ids, scores: list[CheckpointScores], split_ratio: float) -> list[dict[str, Any]]:
    values = mean_confidence(scores)
    overflowing = [example_id for example_id, value in zip(ids, values) if not math.isfinite(value)]
    if overflowing:
        raise InputError(f"the mean perplexity of {len(overflowing)} examples overflows a float (e.g. ids "
                         f"{overflowing[:5]}): at least one checkpoint diverged; score other checkpoints")
    groups = split_groups(ids, values, split_ratio)
    spreads = variability(scores)
    perplexities = list(zip(*[score.perplexities for score in scores]))
    return [
        {"id": example_id, "confidence": value, "variability": spread, "group": group, "perplexities": list(perps),
         "num_tokens": scores[0].num_tokens[index]}
        for index, (example_id, value, spread, group, perps) in enumerate(
            zip(ids, values, spreads, groups, perplexities))
    ]


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts and confidence quantiles per group (and overall)."""
    def quantiles(values: list[float]) -> dict[str, float]:
        if not values:
            return {}
        tensor = torch.tensor(values, dtype=torch.float64)
        points = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0], dtype=torch.float64)
        labels = ["min", "p10", "p25", "median", "p75", "p90", "max"]
        return {**dict(zip(labels, torch.quantile(tensor, points).tolist())), "mean": tensor.mean().item(),
                "std": tensor.std().item() if len(values) > 1 else 0.0}

    summary = {"all": quantiles([row["confidence"] for row in rows])}
    for group in ("confident", "unconfident"):
        members = [row["confidence"] for row in rows if row["group"] == group]
        summary[group] = {"count": len(members), **quantiles(members)}
    if rows and all("variability" in row for row in rows):  # files written before variability lack it
        summary["variability"] = {
            group: quantiles([row["variability"] for row in rows if group == "all" or row["group"] == group])
            for group in ("all", "confident", "unconfident")
        }
    return summary


def split_agreement(groups_a: dict[str, str], groups_b: dict[str, str]) -> float:
    """Fraction of shared ids that fall in the same group in both splits (id -> group, as read_groups)."""
    shared = [example_id for example_id in groups_b if example_id in groups_a]
    if not shared:
        raise InputError("the two confidence files share no id")
    return sum(groups_a[example_id] == groups_b[example_id] for example_id in shared) / len(shared)
