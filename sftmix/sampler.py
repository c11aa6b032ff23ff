"""Batch samplers whose optimisation steps are the same at every process count (torch only).

`BalancedBatchSampler`: every batch holds B/2 confident then B/2 unconfident examples; row k is paired
with row k + B/2 (`losses.balanced_pairs`), so Mixup always mixes a confident example with an unconfident
one. `ShuffledBatchSampler`: plain shuffled batches (the NTP losses). Use either as a DataLoader's
`batch_sampler` in any loop.

One rule for the end of an epoch, at every world size: an epoch is a whole number of optimisation steps,
its last step filled with examples drawn again (reshuffled). With `batches_per_step` = processes x
gradient accumulation, the per-device batches dealt out round-robin (as accelerate does) make global
batch s the same examples as one process's batch s of B x batches_per_step rows: no rank repeats
another's batch, no step is short on one process and full on N.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class BalancedBatchSampler:
    """Per-device batches of B/2 confident then B/2 unconfident indices, reshuffled each epoch.

    The smaller group is cycled (reshuffled on each pass) so that every example of the
    larger group is seen once per epoch; only full batches are yielded. Trainer calls
    `set_epoch`, so a resumed run reproduces the same order.
    """

    def __init__(self, confident: list[int], unconfident: list[int], batch_size: int, seed: int = 0,
                 batches_per_step: int = 1):
        if batch_size % 2 or batch_size < 2:
            raise ValueError(f"batch size must be even and >= 2 for balanced batches, got {batch_size}")
        if not confident or not unconfident:
            raise ValueError("balanced batches need at least one confident and one unconfident example")
        self.confident, self.unconfident = list(confident), list(unconfident)
        self.batch_size, self.half, self.batches_per_step = batch_size, batch_size // 2, batches_per_step
        self.drop_last = False
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        pairs = max(len(self.confident), len(self.unconfident))
        return _whole_steps(pairs, self.half, self.batches_per_step)

    def __iter__(self) -> Iterator[list[int]]:
        needed = len(self) * self.half
        # One generator per group: a group's order does not depend on how often the other group
        # was cycled, so batch size B on one process and B/N on N processes pair the same examples.
        confident = _cycled_permutation(self.confident, needed, self._generator(0))
        unconfident = _cycled_permutation(self.unconfident, needed, self._generator(1))
        for start in range(0, needed, self.half):
            yield confident[start : start + self.half] + unconfident[start : start + self.half]


    def _generator(self, group: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch + 7_919 * group)


class ShuffledBatchSampler:
    """Per-device batches of a permutation of range(size), reshuffled each epoch; the last optimisation step is
    filled by drawing again (module docstring), so N processes take the steps one process takes."""

    def __init__(self, size: int, batch_size: int, seed: int = 0, batches_per_step: int = 1):
        if size < 1 or batch_size < 1:
            raise ValueError(f"need examples and a batch size, got {size} and {batch_size}")
        self.size, self.batch_size, self.batches_per_step = size, batch_size, batches_per_step
        self.drop_last = False
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return _whole_steps(self.size, self.batch_size, self.batches_per_step)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + 1_000_003 * self.epoch)
        order = _cycled_permutation(list(range(self.size)), len(self) * self.batch_size, generator)
        for start in range(0, len(order), self.batch_size):
            yield order[start : start + self.batch_size]


def _whole_steps(rows: int, per_batch: int, batches_per_step: int) -> int:
    """Batches of `per_batch` covering `rows`, rounded up to whole steps of `batches_per_step` batches."""
    steps = -(-rows // (per_batch * batches_per_step))
    return steps * batches_per_step


def _cycled_permutation(items: list[int], length: int, generator: torch.Generator) -> list[int]:
    out: list[int] = []
    while len(out) < length:
        out += [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]
    return out[:length]
