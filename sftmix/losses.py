"""SFTMix losses as pure tensor functions.

SFTMix (Xiao et al., arXiv 2410.05248, Sec. 3, total loss L = L_NTP + mu * L_Mixup):
for a confident example c and an unconfident example u, take the final hidden states
Z at their supervised positions, aligned in order and truncated to m = min(|Y_c|, |Y_u|):

    Z~_n = lam * Z^c_n + (1 - lam) * Z^u_n,   Y~_n = lam * Y^c_n + (1 - lam) * Y^u_n,   lam ~ Beta(a, a)
    L_Mixup = mean_n  -sum_v Y~_n[v] * log softmax(W Z~_n)[v]
            = mean_n  lam * CE(W Z~_n, y^c_n) + (1 - lam) * CE(W Z~_n, y^u_n)

Two implementations with identical values and gradients:
- `sftmix_loss_reference`: materialises logits, autograd does the rest. Clear, and
  the only correct one when a non-linearity follows the LM head (soft-capping).
- `sftmix_loss_fused`: the LM head is linear, so W Z~ = lam W Z^c + (1 - lam) W Z^u:
  the mixed logits are a mix of the logits NTP needs anyway. One tiled pass computes
  each logits tile once, takes NTP and Mixup from it, and writes the gradients
  during the forward (custom backward), never holding [B, T, V] logits.

Conventions: `hidden` [B, T, D] are the states feeding the LM head, `labels` [B, T]
are unshifted token ids with -100 where unsupervised (position t predicts t + 1),
`weight` [V, D] is the LM head, `pair_index` [P, 2] holds (confident row, unconfident
row) per pair and `lam` [P] its mixing coefficient. Padding-free batches concatenate the
sequences in one row: then `sequence` [B, T] gives each position's sequence number, and
`pair_index` holds sequence numbers instead of rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class LossTerms:
    """Sums, not means, so callers can normalise over gradient accumulation and ranks."""

    total: torch.Tensor  # the differentiable, already weighted and normalised loss
    ntp_sum: torch.Tensor  # sum of token CE over all supervised tokens (detached)
    ntp_count: int
    row_nll: torch.Tensor  # [B] per-sequence sum of token CE (detached): online training dynamics
    mixup_sum: torch.Tensor  # sum of soft-label CE over mixed positions (detached)
    mixup_count: int
    entropy_sum: torch.Tensor  # sum over supervised tokens of the predictive entropy (detached; TRL's log)
    num_correct: torch.Tensor  # supervised tokens whose top-1 prediction is the label (TRL's token accuracy)


@dataclass
class MixedPositions:
    """Row indices into the flattened shifted states, aligned pair by pair, position by position."""

    confident: torch.Tensor  # [M] flat index of the n-th supervised position of c
    unconfident: torch.Tensor  # [M] flat index of the n-th supervised position of u
    lam: torch.Tensor  # [M] the pair's lambda, repeated per position


def shift(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align states with the token they predict: [B, T, D], [B, T] -> [B, T-1, D], [B, T-1]."""
    return hidden[:, :-1], labels[:, 1:]


def mixed_positions(
    shifted_labels: torch.Tensor, pair_index: torch.Tensor, lam: torch.Tensor, sequence: torch.Tensor | None = None
) -> MixedPositions:
    """Pair the n-th supervised position of c with the n-th of u, for n < min(|Y_c|, |Y_u|).

    shifted_labels: [B, T]; pair_index: [P, 2] sequence numbers; lam: [P]; sequence: [B, T], the
    sequence number of each position: its row by default, several per row in a padding-free batch
    (sequences concatenated). Flat indices address [B * T].
    """
    flat_sequence = _sequence_numbers(shifted_labels, sequence).reshape(-1)  # [B*T]
    supervised = (shifted_labels.reshape(-1) != IGNORE_INDEX).nonzero(as_tuple=True)[0]  # [N] flat, in order
    order = torch.argsort(flat_sequence[supervised], stable=True)  # by sequence, positions in order
    supervised, owner = supervised[order], flat_sequence[supervised][order]  # [N], [N]
    count = torch.bincount(owner, minlength=int(flat_sequence.max()) + 1)  # [S] supervised positions per sequence
    first = torch.cumsum(count, 0) - count  # [S] where each sequence's positions start in `supervised`
    confident, unconfident = pair_index[:, 0], pair_index[:, 1]
    shortest = torch.minimum(count[confident], count[unconfident])  # [P]
    pair = torch.repeat_interleave(torch.arange(len(pair_index), device=shortest.device), shortest)  # [M]
    step = torch.arange(len(pair), device=pair.device) - (torch.cumsum(shortest, 0) - shortest)[pair]  # [M] n
    return MixedPositions(
        confident=supervised[first[confident][pair] + step],
        unconfident=supervised[first[unconfident][pair] + step],
        lam=lam.to(shortest.device)[pair],
    )


def _sequence_numbers(labels: torch.Tensor, sequence: torch.Tensor | None) -> torch.Tensor:
    """`sequence`, or each position's row when there is none. [B, T] -> [B, T] long"""
    if sequence is not None:
        return sequence
    return torch.arange(labels.size(0), device=labels.device)[:, None].expand_as(labels)


def sample_lambda(alpha: float, num_pairs: int, per: str = "pair", seed: Sequence[int] = (0,)) -> torch.Tensor:
    """lam ~ Beta(alpha, alpha): one per pair, or one shared by all pairs (`per="batch"`). -> [P] float32

    Drawn from a generator seeded by `seed` alone, never from global state: every process
    that passes the same seed draws the same values (so ranks can take their slice of
    one global draw), and a resumed run draws what the uninterrupted run drew.
    """
    if per not in ("pair", "batch"):
        raise ValueError(f"mixup_lambda_per must be 'pair' or 'batch', got {per!r}")
    generator = np.random.default_rng([int(part) for part in seed])
    draws = generator.beta(alpha, alpha, size=1 if per == "batch" else num_pairs)
    if per == "batch":
        draws = np.repeat(draws, num_pairs)
    return torch.from_numpy(draws).float()


# --------------------------------------------------------------------------- pairs


def balanced_pairs(batch_size: int, device=None) -> torch.Tensor:
    """(confident, unconfident) pairs of a balanced batch: sequence k with k + B/2 (rows, or the sequences of a
    padding-free row, which keep the sampler's order). -> [B/2, 2]"""
    rows = torch.arange(batch_size // 2, device=device)
    return torch.stack([rows, rows + batch_size // 2], dim=1)


def count_mixed_positions(
    shifted_labels: torch.Tensor, pair_index: torch.Tensor, shifted_sequence: torch.Tensor | None = None
) -> int:
    """sum over pairs of min(|Y_c|, |Y_u|): the number of Mixup positions. [B, T], [P, 2] -> int"""
    supervised = shifted_labels != IGNORE_INDEX
    if shifted_sequence is None:
        count = supervised.sum(dim=1)  # [B]
    else:
        count = torch.bincount(shifted_sequence[supervised], minlength=int(pair_index.max()) + 1)  # [S]
    return int(torch.minimum(count[pair_index[:, 0]], count[pair_index[:, 1]]).sum())


# --------------------------------------------------------------------------- reference


def sftmix_loss_reference(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    pair_index: torch.Tensor | None,
    lam: torch.Tensor | None,
    ntp_scale: float,
    mixup_scale: float,
    head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sequence: torch.Tensor | None = None,
) -> LossTerms:
    """total = ntp_scale * sum_tokens CE + mixup_scale * sum_mixed soft-CE, with full logits.

    `head` maps states [N, D] to logits [N, V] (default: `states @ weight.T`); pass the
    model's real head when a non-linearity follows it, since then mixing states and
    mixing logits differ and the method mixes states. `sequence` [B, T]: each position's
    sequence number, for padding-free batches (default: its row).
    """
    head = head or (lambda states: states @ weight.T)
    states, targets = shift(hidden, labels)  # [B, T-1, D], [B, T-1]
    owner = _sequence_numbers(labels, sequence)  # [B, T]
    flat_states = states.reshape(-1, states.size(-1))  # [B*(T-1), D]
    flat_targets = targets.reshape(-1)  # [B*(T-1)]
    supervised = flat_targets != IGNORE_INDEX
    logits = _at_least_float32(head(flat_states[supervised]))  # [N, V]
    token_nll = F.cross_entropy(logits, flat_targets[supervised], reduction="none")  # [N]
    entropy_sum, num_correct = _prediction_stats(logits.detach(), flat_targets[supervised])
    ntp_sum = token_nll.sum()
    row_nll = torch.zeros(int(owner.max()) + 1, dtype=token_nll.dtype, device=hidden.device)  # [S]
    row_nll.index_add_(0, owner[:, 1:].reshape(-1)[supervised], token_nll.detach())
    total = ntp_scale * ntp_sum
    mixup_sum, mixup_count = torch.zeros((), device=hidden.device), 0
    if pair_index is not None and len(pair_index) and mixup_scale != 0:
        mixed = mixed_positions(targets, pair_index, lam, owner[:, 1:])
        lam_col = mixed.lam[:, None].to(flat_states.dtype)  # [M, 1]
        mixed_states = lam_col * flat_states[mixed.confident] + (1 - lam_col) * flat_states[mixed.unconfident]
        log_probs = F.log_softmax(_at_least_float32(head(mixed_states)), dim=-1)  # [M, V]
        per_position = -(
            mixed.lam * log_probs.gather(1, flat_targets[mixed.confident][:, None]).squeeze(1)
            + (1 - mixed.lam) * log_probs.gather(1, flat_targets[mixed.unconfident][:, None]).squeeze(1)
        )  # [M]
        mixup_sum, mixup_count = per_position.sum(), len(per_position)
        total = total + mixup_scale * mixup_sum
    return LossTerms(total, ntp_sum.detach(), int(supervised.sum()), row_nll, mixup_sum.detach(), mixup_count,
                     entropy_sum, num_correct)


def _prediction_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of entropies and count of top-1 hits of logits [t, V] against targets [t]."""
    log_norm = torch.logsumexp(logits, dim=-1)  # [t]
    probs = (logits - log_norm[:, None]).exp()  # [t, V]
    entropy = log_norm - torch.bmm(probs[:, None, :], logits[:, :, None]).view(-1)  # [t]
    return entropy.sum(), (logits.argmax(dim=-1) == targets).sum()


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """Softmax in bf16/fp16 loses the loss; float64 stays float64 (tests compare at 1e-9)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


# --------------------------------------------------------------------------- fused


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per tile so that one [rows, V] float32 tile stays around 32 MiB."""
    return max(16, (1 << 23) // vocab_size)


def sftmix_loss_fused(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    pair_index: torch.Tensor | None,
    lam: torch.Tensor | None,
    ntp_scale: float,
    mixup_scale: float,
    chunk_rows: int | None = None,
    sequence: torch.Tensor | None = None,
) -> LossTerms:
    """Same value and gradients as `sftmix_loss_reference` for a linear head, without full logits."""
    states, targets = shift(hidden, labels)  # [B, T-1, D], [B, T-1]
    owner = _sequence_numbers(labels, sequence)  # [B, T]
    flat_states = states.reshape(-1, states.size(-1))  # [B*(T-1), D]
    flat_targets = targets.reshape(-1)
    supervised = flat_targets != IGNORE_INDEX
    if pair_index is not None and len(pair_index) and mixup_scale != 0:
        mixed = mixed_positions(targets, pair_index, lam, owner[:, 1:])
    else:
        empty = torch.zeros(0, dtype=torch.long, device=hidden.device)
        mixed = MixedPositions(empty, empty, torch.zeros(0, device=hidden.device))
    # Positions outside the mixed pairs need only NTP (still computed when its weight is 0, for the log).
    in_pair = torch.zeros_like(supervised)
    in_pair[mixed.confident] = True
    in_pair[mixed.unconfident] = True
    ntp_only = (supervised & ~in_pair).nonzero(as_tuple=True)[0]
    total, position_nll, mixup_sum, stats = _FusedSFTMix.apply(
        flat_states, weight, flat_targets, mixed.confident, mixed.unconfident, mixed.lam, ntp_only,
        float(ntp_scale), float(mixup_scale), chunk_rows or default_chunk_rows(weight.size(0)),
    )
    row_nll = torch.zeros(int(owner.max()) + 1, dtype=position_nll.dtype, device=hidden.device)  # [S]
    row_nll.index_add_(0, owner[:, 1:].reshape(-1), position_nll)
    return LossTerms(total, row_nll.sum(), int(supervised.sum()), row_nll, mixup_sum, len(mixed.lam),
                     stats[0], stats[1])


def sftmix_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head_weight: torch.Tensor,
    lam: torch.Tensor,
    mixup_weight: float = 0.2,
    ntp_weight: float = 1.0,
    fused: bool = True,
) -> LossTerms:
    """The SFTMix loss of one balanced batch, for your own training loop: `total` is
    ntp_weight * (mean CE over the supervised tokens) + mixup_weight * (mean soft CE over the mixed positions).

    hidden [B, T, D]: the final hidden states (the LM head's input); labels [B, T]: -100 where unsupervised; rows
    0..B/2-1 confident and B/2..B-1 unconfident (`BalancedBatchSampler`), row k paired with k + B/2;
    lm_head_weight [V, D]; lam [B/2] (`sample_lambda`). With gradient accumulation or several processes, normalise
    over the whole step instead: `sftmix_loss_fused` takes the scales (what `SFTMixTrainer` does).
    """
    pairs = balanced_pairs(labels.size(0), labels.device)  # [B/2, 2]
    tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    mixed = count_mixed_positions(labels[:, 1:], pairs)
    loss = sftmix_loss_fused if fused else sftmix_loss_reference
    return loss(hidden, labels, lm_head_weight, pairs, lam.to(hidden.device), ntp_weight / max(tokens, 1),
                mixup_weight / max(mixed, 1))


class _FusedSFTMix(torch.autograd.Function):
    """Tiled NTP + Mixup over the rows of `states`; gradients are computed in the forward."""

    @staticmethod
    def forward(ctx, states, weight, targets, confident, unconfident, lam, ntp_only, ntp_scale, mixup_scale, chunk):
        # states [N, D]; weight [V, D]; targets [N]; confident/unconfident/lam [M]; ntp_only [R]
        need_states = ctx.needs_input_grad[0]
        need_weight = ctx.needs_input_grad[1]
        grad_states = torch.zeros_like(states, dtype=torch.float32) if need_states else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        position_nll = torch.zeros(len(states), dtype=torch.float32, device=states.device)  # [N]
        mixup_sum = torch.zeros((), dtype=torch.float32, device=states.device)
        stats = torch.zeros(2, dtype=torch.float32, device=states.device)  # (entropy sum, top-1 hits)
        with torch.no_grad():
            for start in range(0, len(lam), chunk):
                rows_c, rows_u = confident[start : start + chunk], unconfident[start : start + chunk]
                tile_lam = lam[start : start + chunk, None].float()  # [t, 1]
                logits_c = (states[rows_c] @ weight.T).float()  # [t, V]
                logits_u = (states[rows_u] @ weight.T).float()  # [t, V]
                targets_c, targets_u = targets[rows_c], targets[rows_u]
                nll_c, dlogits_c = _ce_and_grad(logits_c, targets_c, stats)
                nll_u, dlogits_u = _ce_and_grad(logits_u, targets_u, stats)
                # Mixed logits = logits of the mixed states, because the head is linear.
                mixed_logits = tile_lam * logits_c + (1 - tile_lam) * logits_u  # [t, V]
                mixed_nll, dmixed = _soft_ce_and_grad(mixed_logits, targets_c, targets_u, tile_lam)
                position_nll[rows_c], position_nll[rows_u] = nll_c, nll_u
                mixup_sum += mixed_nll.sum()
                dlogits_c = ntp_scale * dlogits_c + mixup_scale * tile_lam * dmixed  # [t, V]
                dlogits_u = ntp_scale * dlogits_u + mixup_scale * (1 - tile_lam) * dmixed  # [t, V]
                _accumulate(states, weight, rows_c, dlogits_c, grad_states, grad_weight)
                _accumulate(states, weight, rows_u, dlogits_u, grad_states, grad_weight)
            for start in range(0, len(ntp_only), chunk):
                rows = ntp_only[start : start + chunk]
                logits = (states[rows] @ weight.T).float()  # [t, V]
                nll, dlogits = _ce_and_grad(logits, targets[rows], stats)
                position_nll[rows] = nll
                _accumulate(states, weight, rows, ntp_scale * dlogits, grad_states, grad_weight)
        ctx.save_for_backward(
            grad_states.to(states.dtype) if need_states else None,
            grad_weight.to(weight.dtype) if need_weight else None,
        )
        ctx.mark_non_differentiable(position_nll, mixup_sum, stats)
        total = ntp_scale * position_nll.sum() + mixup_scale * mixup_sum
        return total, position_nll, mixup_sum, stats

    @staticmethod
    def backward(ctx, grad_total, _grad_position_nll, _grad_mixup, _grad_stats):
        grad_states, grad_weight = ctx.saved_tensors
        scale = grad_total.to(torch.float32)
        return (
            None if grad_states is None else grad_states * scale.to(grad_states.dtype),
            None if grad_weight is None else grad_weight * scale.to(grad_weight.dtype),
            None, None, None, None, None, None, None, None,
        )


def _ce_and_grad(logits: torch.Tensor, targets: torch.Tensor, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token CE and its gradient w.r.t. the logits: softmax - onehot. [t, V], [t] -> [t], [t, V]

    Also adds the tile's entropy sum and top-1 hits to `stats` [2], from the softmax it computes anyway.
    """
    log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)  # [t, 1]
    nll = log_norm.squeeze(1) - logits.gather(1, targets[:, None]).squeeze(1)  # [t]
    grad = (logits - log_norm).exp_()  # softmax, in place of a second [t, V] buffer
    stats[0] += (log_norm.squeeze(1) - torch.bmm(grad[:, None, :], logits[:, :, None]).view(-1)).sum()
    stats[1] += (logits.argmax(dim=-1) == targets).sum()
    grad.scatter_add_(1, targets[:, None], torch.full_like(nll[:, None], -1.0))
    return nll, grad


def _soft_ce_and_grad(logits, targets_c, targets_u, lam) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-label CE against lam*onehot(c) + (1-lam)*onehot(u), and its logits gradient."""
    log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)  # [t, 1]
    picked_c = logits.gather(1, targets_c[:, None])  # [t, 1]
    picked_u = logits.gather(1, targets_u[:, None])  # [t, 1]
    nll = (log_norm - lam * picked_c - (1 - lam) * picked_u).squeeze(1)  # [t]
    grad = (logits - log_norm).exp_()  # [t, V]
    grad.scatter_add_(1, targets_c[:, None], -lam)
    grad.scatter_add_(1, targets_u[:, None], -(1 - lam))
    return nll, grad


def _accumulate(states, weight, rows, dlogits, grad_states, grad_weight) -> None:
    """grad_states[rows] += dlogits @ W ; grad_W += dlogits^T @ states[rows]."""
    dlogits = dlogits.to(weight.dtype)
    if grad_states is not None:
        grad_states.index_add_(0, rows, (dlogits @ weight).float())
    if grad_weight is not None:
        grad_weight += (dlogits.T @ states[rows]).float()


# --------------------------------------------------------------------------- scoring


def response_nll(
    hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence sum of response-token NLL and token count, without full logits.

    hidden [B, T, D], labels [B, T] -> nll_sum [B] (float32), num_tokens [B] (long).
    Perplexity (method doc, Stage 1) is exp(nll_sum / num_tokens).
    """
    states, targets = shift(hidden, labels)  # [B, T-1, D], [B, T-1]
    supervised = targets != IGNORE_INDEX  # [B, T-1]
    row_of = supervised.nonzero(as_tuple=True)[0]  # [N] sequence of each supervised position
    flat_states, flat_targets = states[supervised], targets[supervised]  # [N, D], [N]
    nll_sum = torch.zeros(labels.size(0), dtype=torch.float32, device=hidden.device)
    chunk = chunk_rows or default_chunk_rows(weight.size(0))
    for start in range(0, len(flat_targets), chunk):
        logits = (flat_states[start : start + chunk] @ weight.T).float()  # [t, V]
        target = flat_targets[start : start + chunk]
        nll = torch.logsumexp(logits, dim=-1) - logits.gather(1, target[:, None]).squeeze(1)  # [t]
        nll_sum.index_add_(0, row_of[start : start + chunk], nll)
    return nll_sum, supervised.sum(dim=1)
