"""sftmix.stats on fixed numbers: hand-checkable cases and an independent loop implementation."""

import numpy as np
import pytest

from sftmix import stats


def test_mean_std_by_hand():
    assert stats.mean_std([1.0, 2.0, 3.0, 6.0]) == pytest.approx((3.0, (14 / 3) ** 0.5))
    assert stats.mean_std([4.0]) == (4.0, None)


def test_one_seed_two_examples_by_hand():
    # differences 0 and 1: a replicate's mean is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4,
    # so the 2.5% and 97.5% quantiles are exactly 0 and 1 and the bootstrap mean is 0.5.
    interval = stats.two_level_bootstrap(np.array([[1.0, 2.0]]), np.array([[1.0, 1.0]]), resamples=20000)
    assert (interval.estimate, interval.low, interval.high) == (0.5, 0.0, 1.0)
    assert interval.bootstrap_mean == pytest.approx(0.5, abs=0.01)
    assert interval.bootstrap_std == pytest.approx(0.125 ** 0.5, abs=0.01)  # var = (1/4) * 0.25 * 2
    assert interval.per_seed == [0.5] and not interval.seed_noise_covered
    assert stats.verdict(interval) == "no detectable difference"


def test_two_seeds_one_example_by_hand():
    # one example, seeds differ by 0 and 1: the seed draw alone gives 0, 0.5, 1 (1/4, 1/2, 1/4)
    interval = stats.two_level_bootstrap(np.array([[0.0], [1.0]]), np.zeros((2, 1)), resamples=20000)
    assert (interval.estimate, interval.low, interval.high) == (0.5, 0.0, 1.0)
    assert interval.per_seed == [0.0, 1.0] and interval.seed_noise_covered


def test_weighted_difference_by_hand():
    a = np.array([[2.0, 1.0, 4.0]])
    b = np.array([[1.0, 1.0, 1.0]])
    tokens = np.array([[1.0, 2.0, 3.0]])
    # (1 * 1 + 2 * 0 + 3 * 3) / 6
    assert stats.weighted_mean_difference(a, b, tokens) == pytest.approx([10 / 6])
    interval = stats.two_level_bootstrap(a, b, weights=tokens, resamples=1000)
    assert interval.estimate == pytest.approx(10 / 6)
    # every replicate is a weighted mean of the differences 1, 0, 3: within [0, 3]
    assert 0 <= interval.low <= interval.estimate <= interval.high <= 3


def test_identical_models_give_exactly_zero():
    rng = np.random.default_rng(1)
    nll = rng.normal(2.0, 0.5, size=(3, 40))
    interval = stats.two_level_bootstrap(nll, nll.copy(), weights=rng.integers(1, 50, size=(3, 40)))
    assert (interval.estimate, interval.low, interval.high) == (0.0, 0.0, 0.0)
    assert stats.verdict(interval) == "no detectable difference"
    spread = stats.two_level_bootstrap(nll, nll.copy(), stats.std_difference)
    assert (spread.low, spread.high) == (0.0, 0.0)


def test_consistent_difference_excludes_zero():
    rng = np.random.default_rng(2)
    baseline = rng.normal(2.0, 0.5, size=(3, 100))
    better = baseline - 0.01 + rng.normal(0, 0.002, size=(3, 100))
    interval = stats.two_level_bootstrap(better, baseline)
    assert interval.high < 0 and stats.verdict(interval) == "better"
    worse = stats.two_level_bootstrap(baseline, better)
    assert worse.low > 0 and stats.verdict(worse) == "worse"
    assert stats.verdict(worse, lower="lower", higher="higher") == "higher"


def test_seed_disagreement_is_not_hidden():
    """The issue's case: per-seed differences -0.0060, -0.0037, +0.0013 with little example noise.

    A per-example bootstrap pooled over the seeds (computed here independently) excludes 0; the
    two-level interval, which also resamples the seeds, includes it.
    """
    rng = np.random.default_rng(3)
    baseline = rng.normal(1.7, 0.3, size=(3, 100))
    noise = rng.normal(0, 0.001, size=(3, 100))
    noise -= noise.mean(axis=1, keepdims=True)  # per-seed means exactly as below
    shifted = baseline + np.array([[-0.0060], [-0.0037], [0.0013]]) + noise
    interval = stats.two_level_bootstrap(shifted, baseline, resamples=4000)
    assert interval.per_seed == pytest.approx([-0.0060, -0.0037, 0.0013])
    assert interval.low < 0 < interval.high and stats.verdict(interval) == "no detectable difference"

    pooled = (shifted - baseline).ravel()
    draws = np.random.default_rng(0).integers(0, pooled.size, size=(4000, pooled.size))
    pooled_low, pooled_high = np.quantile(pooled[draws].mean(axis=1), [0.025, 0.975])
    assert pooled_high < 0  # the naive interval claims a difference


def loop_bootstrap(a, b, weights, statistic, resamples, seed):
    """Independent, straightforward implementation: explicit loops over replicates and drawn seeds."""
    rng = np.random.default_rng(seed)
    num_seeds, num_examples = len(a), len(a[0])
    replicates = []
    for _ in range(resamples):
        seeds = [int(rng.integers(num_seeds)) for _ in range(num_seeds)]
        examples = [int(rng.integers(num_examples)) for _ in range(num_examples)]
        per_seed = []
        for s in seeds:
            xs = [a[s][i] for i in examples]
            ys = [b[s][i] for i in examples]
            ws = [weights[s][i] for i in examples]
            if statistic == "weighted mean":
                per_seed.append(sum(w * (x - y) for x, y, w in zip(xs, ys, ws)) / sum(ws))
            else:
                def sample_std(values):
                    mean = sum(values) / len(values)
                    return (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
                per_seed.append(sample_std(xs) - sample_std(ys))
        replicates.append(sum(per_seed) / len(per_seed))
    replicates.sort()
    return replicates


@pytest.mark.parametrize("statistic", ["weighted mean", "std"])
def test_matches_independent_loop(statistic):
    rng = np.random.default_rng(4)
    baseline = rng.normal(2.0, 0.4, size=(4, 25))
    variant = baseline + rng.normal(-0.02, 0.05, size=(4, 25)) + np.array([[0.01], [-0.03], [0.0], [-0.02]])
    tokens = rng.integers(5, 60, size=(4, 25)).astype(float)
    function = stats.weighted_mean_difference if statistic == "weighted mean" else stats.std_difference
    interval = stats.two_level_bootstrap(variant, baseline, function, tokens, resamples=20000, seed=7)
    loop = np.array(loop_bootstrap(variant.tolist(), baseline.tolist(), tokens.tolist(), statistic, 8000, seed=11))
    spread = loop.std()
    assert interval.bootstrap_mean == pytest.approx(loop.mean(), abs=0.05 * spread)
    assert interval.bootstrap_std == pytest.approx(spread, rel=0.05)
    assert interval.low == pytest.approx(np.quantile(loop, 0.025), abs=0.12 * spread)
    assert interval.high == pytest.approx(np.quantile(loop, 0.975), abs=0.12 * spread)
    # the point estimate is the plain mean over seeds of the per-seed statistic
    if statistic == "weighted mean":
        expected = np.mean([(tokens[s] * (variant[s] - baseline[s])).sum() / tokens[s].sum() for s in range(4)])
    else:
        expected = np.mean([variant[s].std(ddof=1) - baseline[s].std(ddof=1) for s in range(4)])
    assert interval.estimate == pytest.approx(expected)


def test_seeded_and_reproducible():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(2, 30)), rng.normal(size=(2, 30))
    first = stats.two_level_bootstrap(a, b, resamples=500, seed=3)
    assert stats.two_level_bootstrap(a, b, resamples=500, seed=3) == first
    assert stats.two_level_bootstrap(a, b, resamples=500, seed=4).low != first.low


def test_pair_by_id_orders_and_refuses_other_examples():
    ours = [{"id": "b", "nll": 2.0}, {"id": "a", "nll": 1.0}]
    theirs = [{"id": "a", "nll": 1.5}, {"id": "b", "nll": 2.5}]
    aligned, reference = stats.pair_by_id(ours, theirs, where="x")
    assert [row["id"] for row in aligned] == ["a", "b"] and reference == theirs
    with pytest.raises(ValueError, match="not scored on the same examples"):
        stats.pair_by_id(ours, [{"id": "a"}, {"id": "c"}], where="x")
    with pytest.raises(ValueError, match="shapes|must both be"):
        stats.two_level_bootstrap(np.zeros((2, 3)), np.zeros((2, 4)))
