"""The batch samplers: an epoch's optimisation steps are the same examples, and the same pairs, at every process
count and gradient accumulation, on any data size (the per-device batches dealt out as accelerate deals them)."""

import pytest
from accelerate.data_loader import BatchSamplerShard

from sftmix.sampler import BalancedBatchSampler, ShuffledBatchSampler

GLOBAL_BATCH = 8


def steps(kind: str, size: int, processes: int, accumulation: int) -> list[list[tuple[int, ...]]]:
    """Each optimisation step's rows (NTP) or (confident, unconfident) pairs (balanced), in one global list."""
    per_device, per_step = GLOBAL_BATCH // (processes * accumulation), processes * accumulation
    half = size // 2

    def sampler():
        if kind == "balanced":
            return BalancedBatchSampler(list(range(half)), list(range(half, size)), per_device, 3, per_step)
        return ShuffledBatchSampler(size, per_device, 3, per_step)

    shards = [list(BatchSamplerShard(sampler(), processes, rank, split_batches=False, even_batches=True))
              for rank in range(processes)]
    assert len({len(shard) for shard in shards}) == 1 and len(shards[0]) % accumulation == 0  # no padding, no part
    result = []
    for first in range(0, len(shards[0]), accumulation):
        batches = [shards[rank][first + micro] for micro in range(accumulation) for rank in range(processes)]
        if kind == "balanced":  # row k with row k + B/2 of its own per-device batch
            items = [(batch[k], batch[k + len(batch) // 2]) for batch in batches for k in range(len(batch) // 2)]
        else:
            items = [(row,) for batch in batches for row in batch]
        result.append(sorted(items))
    return result


@pytest.mark.parametrize("kind", ["balanced", "shuffled"])
@pytest.mark.parametrize("size", [17, 20, 25])
def test_steps_are_the_same_at_every_process_count(kind, size):
    one = steps(kind, size, 1, 1)
    rows, per_step = (size - size // 2, GLOBAL_BATCH // 2) if kind == "balanced" else (size, GLOBAL_BATCH)
    assert len(one) == -(-rows // per_step)  # ceil: the last step is whole
    for processes, accumulation in [(2, 1), (1, 2), (2, 2), (4, 1), (2, 4)]:
        if kind == "balanced" and GLOBAL_BATCH // (processes * accumulation) < 2:
            continue  # a balanced batch needs a pair
        assert steps(kind, size, processes, accumulation) == one, (processes, accumulation)


def test_every_example_is_seen_each_epoch_and_only_the_last_step_draws_again():
    seen = [row for step in steps("shuffled", 20, 2, 1) for (row,) in step]
    assert len(seen) == 24 and set(seen) == set(range(20))  # 3 steps of 8: 4 rows of the last drawn again
    pairs = [pair for step in steps("balanced", 17, 2, 1) for pair in step]
    assert {c for c, _ in pairs} == set(range(8)) and {u for _, u in pairs} == set(range(8, 17))
