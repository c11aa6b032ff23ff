"""Trainer callbacks of Stage 1's reference run: checkpoints evenly spaced over the run, older checkpoints cut
down to their weights, and each example's response NLL recorded from the training forward passes (`--online`).
The confidence formulas are in `confidence.py`; scoring checkpoints is in `scoring.py`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import TrainerCallback

from . import distributed
from .confidence import CheckpointScores
from .errors import InputError
from .files import CHECKPOINT, newest_complete_checkpoint, strip_training_state, write_atomic

logger = logging.getLogger(__name__)




class SaveEvenlySpaced(TrainerCallback):
    """Save C checkpoints at steps round(k * max_steps / C), k = 1..C, whatever save_strategy says."""

    def __init__(self, count: int):
        self.count = count
        self.steps: set[int] = set()

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps = {max(1, round(k * state.max_steps / self.count)) for k in range(1, self.count + 1)}
        if len(self.steps) < self.count and distributed.is_main():
            logger.warning("--num_checkpoints %d, but the reference run has %d step(s): %d checkpoint(s) are scored%s; "
                           "train it longer (num_train_epochs) or ask for fewer", self.count, state.max_steps,
                           len(self.steps), " and the variability of every example is 0" if len(self.steps) == 1
                           else "")

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            control.should_save = True


class KeepWeightsOnly(TrainerCallback):
    """After each save, the checkpoints older than the newest resumable one keep only their weights
    (`files.strip_training_state`): scoring needs nothing else, and a resume takes the newest.

    Resumable means what the resume picks (`newest_complete_checkpoint`, with `also_needs` files),
    so the checkpoint a killed run resumes from always keeps its optimizer state.
    """

    def __init__(self, also_needs: tuple[str, ...] = ()):
        self.also_needs = also_needs

    def on_save(self, args, state, control, **kwargs):
        distributed.barrier()  # every rank has written its part of the new checkpoint
        distributed.on_main(self.strip_older, args.output_dir, self.also_needs)

    @staticmethod
    def strip_older(output_dir: str, also_needs: tuple[str, ...]) -> None:
        newest = newest_complete_checkpoint(output_dir, also_needs=also_needs)
        if newest is None:
            return
        newest_step = int(CHECKPOINT.fullmatch(Path(newest).name).group(1))
        for path in Path(output_dir).iterdir():
            match = CHECKPOINT.fullmatch(path.name)
            if match and path.is_dir() and int(match.group(1)) < newest_step:
                strip_training_state(path)


class SaveOnlineNLL(TrainerCallback):
    """Store the online NLL records with each checkpoint, so a resumed reference run keeps them."""

    FILE = "online_nll.json"

    def __init__(self, trainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        records = gather_online_nll(self.trainer)  # a collective: every rank takes part
        directory = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        distributed.on_main(write_atomic, directory / self.FILE, json.dumps(records))

    @classmethod
    def load(cls, checkpoint: str | None) -> dict[str, list]:
        path = Path(checkpoint or "") / cls.FILE
        return json.loads(path.read_text()) if checkpoint and path.exists() else {}


def gather_online_nll(trainer) -> dict[str, list]:
    """Every process's online NLL records, merged by example id (each rank saw different examples).

    After a resume every rank holds the records saved with the checkpoint: duplicates are dropped.
    """
    merged: dict[str, set] = {}
    for records_of_rank in distributed.gather(dict(trainer.online_nll)):
        for example_id, records in records_of_rank.items():
            merged.setdefault(example_id, set()).update(tuple(record) for record in records)
    return {example_id: sorted(list(record) for record in records) for example_id, records in merged.items()}


def online_scores(records: dict[str, list], ids: list[str]) -> list[CheckpointScores]:
    """One score set per epoch: epoch e holds each example's NLL from its visit in epoch e.

    A record is (epoch, step, NLL sum, response tokens). Records arrive in rank order, and
    multi-process data loaders repeat a few examples to even out the last batch, so each
    example's visit in an epoch is its record with the earliest step in that epoch.
    """
    missing = [example_id for example_id in ids if not records.get(example_id)]
    if missing:
        raise InputError(f"online dynamics: {len(missing)} examples were never trained on (e.g. {missing[:3]}); "
                         "use at least one full epoch")
    visits = {example_id: _first_visit_per_epoch(records[example_id]) for example_id in ids}
    epochs = min(len(per_epoch) for per_epoch in visits.values())
    return [
        CheckpointScores(
            checkpoint=f"online-visit-{visit + 1}",
            nll_sum=[visits[example_id][visit][2] for example_id in ids],
            num_tokens=[visits[example_id][visit][3] for example_id in ids],
        )
        for visit in range(epochs)
    ]


def _first_visit_per_epoch(records: list) -> list:
    """The earliest-step record of each epoch, in epoch order."""
    first: dict[int, list] = {}
    for record in sorted(records, key=lambda record: (record[0], record[1])):
        first.setdefault(int(record[0]), list(record))
    return [first[epoch] for epoch in sorted(first)]
