"""The balanced batch sampler: every batch holds B/2 confident then B/2 unconfident examples (torch only).

Row k of a batch is paired with row k + B/2 (`losses.balanced_pairs`), so Mixup always mixes a
confident example with an unconfident one. Use it as a DataLoader's `batch_sampler` in any loop.
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

    def __init__(self, confident: list[int], unconfident: list[int], batch_size: int, seed: int = 0):
        if batch_size % 2 or batch_size < 2:
            raise ValueError(f"batch size must be even and >= 2 for balanced batches, got {batch_size}")
        if not confident or not unconfident:
            raise ValueError("balanced batches need at least one confident and one unconfident example")
        self.confident, self.unconfident = list(confident), list(unconfident)
        self.batch_size, self.half = batch_size, batch_size // 2
        self.drop_last = False
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        pairs = max(len(self.confident), len(self.unconfident))
        return -(-pairs // self.half)  # ceil: the last batch is filled by cycling

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


def _cycled_permutation(items: list[int], length: int, generator: torch.Generator) -> list[int]:
    out: list[int] = []
    while len(out) < length:
        out += [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]
    return out[:length]
