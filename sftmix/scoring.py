"""Scoring: each example's response NLL under a model, batched by length, in inference mode, without full logits
(only response positions go through the LM head, in tiles). Stage 1 scores checkpoints with it, evaluation
scores models. Scores of a checkpoint are stored with the key of what determined them (`keys.scores_key`)."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed
from .confidence import CheckpointScores
from .errors import InputError
from .files import write_atomic
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
    linear = head_is_linear(model)
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
    if linear_head:  # only response positions go through the head (gathered whole when ZeRO-3 partitions it)
        hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        weight = model.get_output_embeddings().weight
        with distributed.gathered(weight):
            return response_nll(hidden.last_hidden_state, batch["labels"], weight)
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
