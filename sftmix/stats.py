"""Statistics of a comparison over seeds and examples: did a variant beat NTP, or is it noise?

Every trained model of a run is scored on the same evaluation examples, once per
seed, so a difference between two variants has two sources of noise: which seeds
were trained (training randomness) and which examples happen to be in the eval set.
A per-example bootstrap pooled over seeds sees only the second and can be tight while
the seeds disagree in sign. Here:

    values:       a, b [S, n]   per seed s and example i (same examples, same order, in a and b)
    statistic:    f(a_s, b_s) -> one number per seed (e.g. token-weighted mean of a - b)
    estimate:     mean_s f(a_s, b_s)
    interval:     percentile interval of the same quantity over a two-level bootstrap that
                  draws S seeds with replacement AND n examples with replacement per replicate

The examples are crossed with the seeds (every seed's model saw the same examples), so
one example draw is shared by all drawn seeds of a replicate (Owen's "pigeonhole"
bootstrap). Drawing examples independently inside each seed would treat the seeds'
eval sets as independent samples and shrink the example noise by a factor S. With one
seed the interval covers only the example noise: `seed_noise_covered` says so. With few
seeds the seed part is rough (3 seeds give 10 distinct seed draws), which widens rather
than narrows the interval; more seeds give a better one.

Pure functions on numpy arrays; every random draw comes from `numpy.random.default_rng(seed)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

Statistic = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]  # ([..., n] x3) -> [...]


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof 1; None for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        raise ValueError("mean_std of no values")
    return float(array.mean()), (float(array.std(ddof=1)) if array.size > 1 else None)


# --------------------------------------------------------------------------- statistics per seed


def weighted_mean_difference(a: np.ndarray, b: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """sum_i w_i (a_i - b_i) / sum_i w_i over the last axis. [..., n] -> [...]

    With a, b the per-example mean response NLL and w the response token counts this is
    exactly the difference of the two models' token-weighted NLL (what the report shows).
    """
    return ((a - b) * weights).sum(axis=-1) / weights.sum(axis=-1)


def std_difference(a: np.ndarray, b: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """std(a) - std(b) over the last axis (ddof 1, as the eval's confidence spread). [..., n] -> [...]"""
    return a.std(axis=-1, ddof=1) - b.std(axis=-1, ddof=1)


# --------------------------------------------------------------------------- the bootstrap


@dataclass
class Interval:
    """A difference (variant minus baseline) with its percentile bootstrap interval."""

    estimate: float  # mean over seeds of the per-seed statistic
    low: float
    high: float
    level: float
    per_seed: list[float]  # the statistic of each seed (the seed-to-seed spread, unresampled)
    num_seeds: int
    num_examples: int
    resamples: int
    bootstrap_mean: float  # mean of the bootstrap distribution (close to `estimate`)
    bootstrap_std: float  # its standard deviation: the standard error of `estimate`
    seed_noise_covered: bool  # False with one seed: the interval covers example noise only

    def as_dict(self) -> dict:
        return asdict(self)


def two_level_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    statistic: Statistic = weighted_mean_difference,
    weights: np.ndarray | None = None,
    resamples: int = 10000,
    level: float = 0.95,
    seed: int = 0,
    chunk: int = 500,
) -> Interval:
    """Interval of mean_s statistic(a_s, b_s) under resampling of seeds and examples (see module doc).

    a, b, weights: [S, n] (seed, example); a and b must hold the same examples in the same order.
    Each replicate draws S seed indices and n example indices with replacement; every drawn seed
    is evaluated on the same drawn examples.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must both be [seeds, examples], got {a.shape} and {b.shape}")
    weights = np.ones_like(a) if weights is None else np.asarray(weights, dtype=np.float64)
    if weights.shape != a.shape:
        raise ValueError(f"weights must be {a.shape}, got {weights.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    num_seeds, num_examples = a.shape
    per_seed = statistic(a, b, weights)  # [S]
    rng = np.random.default_rng(seed)
    replicates = np.empty(resamples)
    for start in range(0, resamples, chunk):
        count = min(chunk, resamples - start)
        seeds = rng.integers(0, num_seeds, size=(count, num_seeds))[:, :, None]  # [c, S, 1]
        examples = rng.integers(0, num_examples, size=(count, num_examples))[:, None, :]  # [c, 1, n]
        drawn = statistic(a[seeds, examples], b[seeds, examples], weights[seeds, examples])  # [c, S]
        replicates[start : start + count] = drawn.mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(replicates, [tail, 1 - tail])
    return Interval(
        estimate=float(per_seed.mean()), low=float(low), high=float(high), level=level,
        per_seed=[float(value) for value in per_seed], num_seeds=num_seeds, num_examples=num_examples,
        resamples=resamples, bootstrap_mean=float(replicates.mean()), bootstrap_std=float(replicates.std(ddof=1)),
        seed_noise_covered=num_seeds > 1,
    )


def verdict(interval: Interval, lower: str = "better", higher: str = "worse") -> str:
    """`lower` when the whole interval is below 0, `higher` when above, else 'no detectable difference'."""
    if interval.high < 0:
        return lower
    if interval.low > 0:
        return higher
    return "no detectable difference"


def pair_by_id(rows_a: list[dict], rows_b: list[dict], where: str) -> tuple[list[dict], list[dict]]:
    """Rows of two models' per-example files in one order (b's), refusing files with different examples."""
    index_a = {str(row["id"]): row for row in rows_a}
    ids_b = [str(row["id"]) for row in rows_b]
    if len(index_a) != len(rows_a) or len(set(ids_b)) != len(ids_b) or set(index_a) != set(ids_b):
        only_a, only_b = set(index_a) - set(ids_b), set(ids_b) - set(index_a)
        raise ValueError(f"{where}: the two models were not scored on the same examples ({len(only_a)} ids only "
                         f"in one, {len(only_b)} only in the other, e.g. {sorted(only_a | only_b)[:3]})")
    return [index_a[example_id] for example_id in ids_b], rows_b
