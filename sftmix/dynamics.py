"""Stage 1 of SFTMix: training dynamics -> per-example confidence -> confident / unconfident split.

    Perp_c(i) = exp(mean response-token NLL of example i at checkpoint c)
    Conf(i)   = -(1/C) * sum_c Perp_c(i)
    Var(i)    = std_c Perp_c(i)   (variability, beyond the paper: Dataset Cartography's second axis)
    split     : the top `split_ratio` by confidence is "confident" (ties broken by id), the rest "unconfident"

Scoring is batched by length (little padding), runs in inference mode and never
builds full logits (only the response positions go through the LM head, in tiles).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback

from . import distributed
from .confidence import CheckpointScores
from .errors import InputError
from .files import (
    CHECKPOINT,
    newest_complete_checkpoint,
    pyplot,
    save_figure,
    strip_training_state,
    write_atomic,
)
from .keys import key_changes
from .losses import IGNORE_INDEX, response_nll
from .model import head_is_linear

logger = logging.getLogger(__name__)


MAX_MEAN_NLL = math.log(sys.float_info.max)  # exp() of a larger mean NLL overflows a float (~709.8)


def check_finite_nll(ids: list[str], nll_sum: list[float], num_tokens: list[int], what: str, remedy: str) -> None:
    """Refuse a diverged model's scores before they reach a file, a split or a report: NaN/inf response NLL, or a
    perplexity exp(mean NLL) that overflows a float. (A NaN confidence sorts arbitrarily, so a split would
    silently follow file order; a NaN eval metric is no result.) `what` was scored; `remedy` says what to do."""
    bad = [example_id for example_id, nll, count in zip(ids, nll_sum, num_tokens)
           if not (math.isfinite(nll) and nll / max(count, 1) <= MAX_MEAN_NLL)]
    if bad:
        raise InputError(f"{what}: the response NLL of {len(bad)} of {len(ids)} examples is NaN, inf or too large "
                         f"for a perplexity (e.g. ids {bad[:5]}): {remedy}")


def check_scores(scores: CheckpointScores, ids: list[str]) -> None:
    """`check_finite_nll` for one checkpoint's scores (Stage 1)."""
    check_finite_nll(ids, scores.nll_sum, scores.num_tokens, f"checkpoint {scores.checkpoint}",
                     "the checkpoint diverged (NaN/inf weights or too high a learning rate). Score other checkpoints, "
                     "or retrain the reference run with a lower learning rate.")


# --------------------------------------------------------------------------- reference run


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


# --------------------------------------------------------------------------- scoring


def length_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped longest-first so each padded batch holds at most `max_tokens` tokens."""
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    batches, current = [], []
    for index in order:
        longest = lengths[current[0]] if current else lengths[index]
        if current and (len(current) + 1) * longest > max_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def pad_batch(dataset, indices: list[int], pad_id: int, device) -> dict[str, torch.Tensor]:
    rows = [dataset[index] for index in indices]
    width = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row_number, row in enumerate(rows):
        length = len(row["input_ids"])
        input_ids[row_number, :length] = torch.tensor(row["input_ids"])
        labels[row_number, :length] = torch.tensor(row["labels"])
        attention_mask[row_number, :length] = 1
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "attention_mask": attention_mask.to(device)}


@torch.inference_mode()
def score_model(model, dataset, max_tokens: int, pad_id: int, desc: str = "Scoring",
                sharded: bool = False) -> tuple[list, list]:
    """Response NLL sum and token count of each example (dataset order). -> (nll_sum [N], num_tokens [N])

    Under a launcher each rank scores its share of the length-sorted batches and every rank
    gets all results, gathered by example index: N processes score about N times faster.
    `sharded`: the model's parameters are partitioned over the ranks (`distributed.zero3_inference`), so every
    forward is a collective: a rank with fewer batches runs spare forwards (results discarded) until all are done.
    """
    model.eval()
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in dataset["input_ids"]]
    batches = length_batches(lengths, max_tokens)
    shares = assign_batches(batches, lengths, distributed.world_size())
    mine = shares[distributed.rank()]
    linear = head_is_linear(model) and not sharded  # a partitioned head weight is only whole inside a forward
    progress = tqdm(total=sum(lengths[i] for batch in mine for i in batch), desc=desc, unit="tok", unit_scale=True,
                    mininterval=2, disable=not distributed.is_main())
    scored: list[tuple[int, float, int]] = []
    for indices in mine:
        sums, counts = _batch_nll(model, pad_batch(dataset, indices, pad_id, device), linear)
        scored += [(index, float(sums[k]), int(counts[k])) for k, index in enumerate(indices)]
        progress.update(sum(lengths[index] for index in indices))
    spare = pad_batch(dataset, [min(range(len(lengths)), key=lengths.__getitem__)], pad_id, device) if sharded else None
    for _ in range(max(map(len, shares)) - len(mine) if sharded else 0):
        _batch_nll(model, spare, linear)
    progress.close()
    nll_sum, num_tokens = [0.0] * len(lengths), [0] * len(lengths)
    for index, nll, count in (item for share in distributed.gather(scored) for item in share):
        nll_sum[index], num_tokens[index] = nll, count
    return nll_sum, num_tokens


def assign_batches(batches: list[list[int]], lengths: list[int], ranks: int) -> list[list[list[int]]]:
    """Deal the batches out so every rank gets about the same number of padded tokens (deterministic)."""
    shares: list[list[list[int]]] = [[] for _ in range(ranks)]
    load = [0] * ranks
    for batch in batches:  # longest first: each goes to the least loaded rank, lowest rank on ties
        rank = min(range(ranks), key=lambda candidate: (load[candidate], candidate))
        shares[rank].append(batch)
        load[rank] += len(batch) * max(lengths[index] for index in batch)
    return shares


def _batch_nll(model, batch: dict[str, torch.Tensor], linear_head: bool):
    if linear_head:  # only response positions go through the head
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return response_nll(hidden.last_hidden_state, batch["labels"], model.get_output_embeddings().weight)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return token_nll.sum(dim=1), (targets != IGNORE_INDEX).sum(dim=1)


def save_scores(path: Path, scores: CheckpointScores, key: dict) -> None:
    """One checkpoint's scores with the key of what determined them (see `scores_key`)."""
    write_atomic(path, json.dumps({"key": key, **scores.__dict__}, allow_nan=False))


def load_scores(path: Path, key: dict) -> CheckpointScores | None:
    """Scores saved by an earlier (possibly killed) run, if the same checkpoint, tokenizer and data made them."""
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    recorded = saved.pop("key", None)
    saved.pop("fingerprint", None)  # files of older versions
    if recorded != key:
        logger.warning("%s was computed with other settings (%s): rescored", path,
                       key_changes(recorded, key) if recorded else "settings not recorded")
        return None
    return CheckpointScores(**saved)


def clear_stale(output_dir: Path, key: dict[str, Any]) -> None:
    """Before any work: refuse to overwrite a finished split made with other settings; remove a reference run
    made with other settings (naming them), so it is redone; record this key with the reference run.

    Only folders whose settings sftmix recorded are removed; scores files carry their own key.
    """
    finished = output_dir / "dynamics.json"
    if finished.exists():
        recorded = json.loads(finished.read_text()).get("key")
        if recorded != key:
            changes = key_changes(recorded, key) if recorded else "settings not recorded: made by an older sftmix"
            raise InputError(f"{output_dir} holds a finished confidence split made with other settings ({changes}); "
                             f"it is not overwritten: use another --output_dir, or delete {output_dir} to redo it")
    if "reference" not in key:
        return
    reference, marker = output_dir / "reference", output_dir / "reference" / "key.json"
    recorded = json.loads(marker.read_text()) if marker.exists() else None
    if reference.exists() and recorded != key["reference"]:
        if recorded is None:
            raise InputError(f"{reference} holds no record of the settings that made it (made by an older sftmix, or "
                             "not by sftmix); move or delete it to train the reference run again")
        logger.warning("%s was trained with other settings (%s): it is redone", reference,
                       key_changes(recorded, key["reference"]))
        shutil.rmtree(reference)
        shutil.rmtree(output_dir / "consolidated", ignore_errors=True)  # merged copies of the old checkpoints
    write_atomic(marker, json.dumps(key["reference"], indent=1))


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
