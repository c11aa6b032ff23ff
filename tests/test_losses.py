"""SFTMix loss against independent computations (loops over pairs and positions, plain math)."""

import math

import pytest
import torch
import torch.nn.functional as F

from sftmix.losses import (
    mixed_positions,
    sample_lambda,
    sftmix_loss_fused,
    sftmix_loss_reference,
)

IMPLEMENTATIONS = {"reference": sftmix_loss_reference, "fused": sftmix_loss_fused}


def loop_loss(hidden, labels, weight, pairs, lam, ntp_weight, mixup_weight):
    """Method doc, position by position: L = w_ntp * mean CE + w_mix * mean soft-CE of mixed states."""
    ntp_terms, mixup_terms = [], []
    supervised = {}
    for row in range(labels.size(0)):
        positions = [t for t in range(labels.size(1) - 1) if labels[row, t + 1] != -100]
        supervised[row] = positions
        for t in positions:
            log_probs = F.log_softmax(weight @ hidden[row, t], dim=-1)
            ntp_terms.append(-log_probs[labels[row, t + 1]])
    for (c, u), pair_lam in zip(pairs, lam):
        for n in range(min(len(supervised[c]), len(supervised[u]))):
            tc, tu = supervised[c][n], supervised[u][n]
            mixed = pair_lam * hidden[c, tc] + (1 - pair_lam) * hidden[u, tu]
            log_probs = F.log_softmax(weight @ mixed, dim=-1)
            soft_label = pair_lam * F.one_hot(labels[c, tc + 1], weight.size(0)) + (1 - pair_lam) * F.one_hot(
                labels[u, tu + 1], weight.size(0)
            )
            mixup_terms.append(-(soft_label * log_probs).sum())
    ntp = torch.stack(ntp_terms).mean()
    mixup = torch.stack(mixup_terms).mean() if mixup_terms else torch.zeros(())
    return ntp_weight * ntp + mixup_weight * mixup, ntp, mixup


def random_batch(batch, length, dim, vocab, seed, dtype=torch.float32):
    """Hidden states, labels with uneven prompt/response/padding lengths, head weight."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, length, dim, generator=generator, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, dim, generator=generator, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    for row in range(batch):
        prompt = int(torch.randint(1, length // 2, (1,), generator=generator))
        padding = int(torch.randint(0, length // 3, (1,), generator=generator))
        labels[row, :prompt] = -100
        if padding:
            labels[row, length - padding :] = -100
    return hidden, labels, weight


def halves(batch):
    half = batch // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=1)


def terms_as_means(terms, ntp_weight, mixup_weight):
    return terms.ntp_sum / terms.ntp_count, terms.mixup_sum / max(terms.mixup_count, 1)


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("lam_kind", ["zero", "one", "random"])
def test_matches_loop_computation(name, lam_kind):
    hidden, labels, weight = random_batch(4, 10, 6, 11, seed=1, dtype=torch.float64)
    pairs = halves(4)
    lam = {"zero": torch.zeros(2), "one": torch.ones(2), "random": torch.tensor([0.3, 0.85])}[lam_kind]
    lam = lam.double()
    expected, expected_ntp, expected_mixup = loop_loss(hidden, labels, weight, pairs.tolist(), lam, 1.0, 0.2)
    ntp_count = int((labels[:, 1:] != -100).sum())
    mixed = mixed_positions(labels[:, 1:], pairs, lam)
    terms = IMPLEMENTATIONS[name](hidden, labels, weight, pairs, lam, 1.0 / ntp_count, 0.2 / len(mixed.lam))
    assert terms.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert (terms.ntp_sum / terms.ntp_count).item() == pytest.approx(expected_ntp.item(), rel=1e-6)
    assert (terms.mixup_sum / terms.mixup_count).item() == pytest.approx(expected_mixup.item(), rel=1e-6)


def test_lambda_one_and_zero_reduce_to_ce_on_one_side():
    hidden, labels, weight = random_batch(2, 8, 4, 7, seed=2, dtype=torch.float64)
    pairs = halves(2)
    shifted = labels[:, 1:]
    m = min(int((shifted[0] != -100).sum()), int((shifted[1] != -100).sum()))

    def side_ce(row):
        positions = (shifted[row] != -100).nonzero().squeeze(1)[:m]
        logits = hidden[row, positions] @ weight.T
        return F.cross_entropy(logits, shifted[row, positions], reduction="sum")

    for lam, row in ((1.0, 0), (0.0, 1)):
        terms = sftmix_loss_reference(hidden, labels, weight, pairs, torch.tensor([lam], dtype=torch.float64), 0, 1)
        assert terms.mixup_sum.item() == pytest.approx(side_ce(row).item(), rel=1e-9)
        assert terms.mixup_count == m


def test_hand_computed_case():
    # D = 1, V = 2, head W = [[1], [-1]]: logits of state z are (z, -z).
    weight = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
    # Two sequences of length 3; labels: c supervises positions 1,2 (tokens 0,1), u only position 2 (token 0).
    hidden = torch.tensor([[[2.0], [0.5], [9.0]], [[7.0], [1.0], [9.0]]], dtype=torch.float64)
    labels = torch.tensor([[-100, 0, 1], [-100, -100, 0]])
    lam = 0.25
    # Mixed pair: n = 0 only (|Y_u| = 1): c's state 2.0 (target 0) with u's state 1.0 (target 0).
    z = lam * 2.0 + (1 - lam) * 1.0  # 1.25
    log_p0 = z - math.log(math.exp(z) + math.exp(-z))
    expected_mixup = -(lam * log_p0 + (1 - lam) * log_p0)

    def ce(state, target):
        logits = (state, -state)
        return math.log(math.exp(logits[0]) + math.exp(logits[1])) - logits[target]

    expected_ntp = ce(2.0, 0) + ce(0.5, 1) + ce(1.0, 0)  # three supervised tokens
    for implementation in IMPLEMENTATIONS.values():
        terms = implementation(hidden, labels, weight, torch.tensor([[0, 1]]), torch.tensor([lam]).double(), 1, 1)
        assert terms.mixup_count == 1 and terms.ntp_count == 3
        assert terms.mixup_sum.item() == pytest.approx(expected_mixup, rel=1e-6)
        assert terms.ntp_sum.item() == pytest.approx(expected_ntp, rel=1e-6)


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_mixup_gradient_reaches_both_examples_of_a_pair(name):
    hidden, labels, weight = random_batch(2, 9, 4, 7, seed=3)
    pairs = halves(2)
    terms = IMPLEMENTATIONS[name](hidden, labels, weight, pairs, torch.tensor([0.4]), 0.0, 1.0)  # Mixup only
    (grad,) = torch.autograd.grad(terms.total, [hidden])
    mixed = mixed_positions(labels[:, 1:], pairs, torch.tensor([0.4]))
    states = grad[:, :-1].reshape(-1, grad.size(-1))
    assert states[mixed.confident].abs().sum(dim=1).gt(0).all()
    assert states[mixed.unconfident].abs().sum(dim=1).gt(0).all()
    in_pair = torch.zeros(states.size(0), dtype=torch.bool)
    in_pair[mixed.confident] = in_pair[mixed.unconfident] = True
    assert states[~in_pair].abs().sum() == 0  # positions beyond min(|Y_c|, |Y_u|) get no Mixup gradient


def test_mixed_positions_align_in_order_and_truncate():
    labels = torch.tensor([
        [-100, 5, 6, 7, -100],  # supervised shifted positions 0, 1, 2
        [-100, -100, -100, 8, 9],  # supervised shifted positions 2, 3
    ])
    mixed = mixed_positions(labels[:, 1:], torch.tensor([[0, 1]]), torch.tensor([0.5]))
    width = labels.size(1) - 1
    assert mixed.confident.tolist() == [0, 1]  # first two of c
    assert mixed.unconfident.tolist() == [width + 2, width + 3]  # both of u
    assert mixed.lam.tolist() == [0.5, 0.5]


@pytest.mark.parametrize("shape", [(2, 7, 5, 9), (4, 12, 8, 31), (6, 20, 16, 50)])
@pytest.mark.parametrize("lam_kind", ["zero", "one", "random"])
@pytest.mark.parametrize("weights", [(1.0, 0.2), (0.5, 0.5), (0.0, 1.0), (1.0, 0.0)])
def test_fused_equals_reference_float32(shape, lam_kind, weights):
    batch, length, dim, vocab = shape
    hidden, labels, weight = random_batch(batch, length, dim, vocab, seed=sum(shape))
    labels[-1, :] = -100  # a row with no supervised token at all
    pairs = halves(batch)
    lam = {"zero": torch.zeros(batch // 2), "one": torch.ones(batch // 2), "random": torch.rand(batch // 2)}[lam_kind]
    ntp_scale, mixup_scale = weights[0] / 17, weights[1] / 5
    reference = sftmix_loss_reference(hidden, labels, weight, pairs, lam, ntp_scale, mixup_scale)
    fused = sftmix_loss_fused(hidden, labels, weight, pairs, lam, ntp_scale, mixup_scale, chunk_rows=3)
    grads_reference = torch.autograd.grad(reference.total, [hidden, weight])
    grads_fused = torch.autograd.grad(fused.total, [hidden, weight])
    torch.testing.assert_close(fused.total, reference.total, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads_fused, grads_reference):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_fused_without_pairs_is_plain_ntp():
    hidden, labels, weight = random_batch(3, 9, 4, 13, seed=5)
    count = int((labels[:, 1:] != -100).sum())
    fused = sftmix_loss_fused(hidden, labels, weight, None, None, 1.0 / count, 0.0)
    logits = hidden[:, :-1] @ weight.T
    expected = F.cross_entropy(logits.reshape(-1, 13), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(fused.total, expected)
    (got,) = torch.autograd.grad(fused.total, [hidden])
    (want,) = torch.autograd.grad(expected, [hidden])
    torch.testing.assert_close(got, want)


def test_sample_lambda_per_pair_and_per_batch():
    per_pair = sample_lambda(0.5, 20000, seed=(0,))
    assert per_pair.shape == (20000,) and per_pair.min() >= 0 and per_pair.max() <= 1
    assert per_pair.mean().item() == pytest.approx(0.5, abs=0.01)
    # Beta(0.5, 0.5) has variance 1/8: U-shaped, unlike a uniform (1/12).
    assert per_pair.var().item() == pytest.approx(1 / 8, abs=0.005)
    per_batch = sample_lambda(0.5, 4, per="batch", seed=(0,))
    assert per_batch.shape == (4,) and torch.all(per_batch == per_batch[0])
    with pytest.raises(ValueError, match="mixup_lambda_per"):
        sample_lambda(0.5, 4, per="token")


def test_sample_lambda_depends_on_its_seed_only():
    torch.manual_seed(1)
    first = sample_lambda(0.5, 8, seed=(42, 3, 1))
    torch.manual_seed(2)  # global RNG state must not matter: ranks and resumed runs share the draw
    assert torch.equal(sample_lambda(0.5, 8, seed=(42, 3, 1)), first)
    assert not torch.equal(sample_lambda(0.5, 8, seed=(42, 4, 1)), first)
    # a prefix of a longer draw is the shorter draw: slices of one global vector are consistent
    assert torch.equal(sample_lambda(0.5, 16, seed=(42, 3, 1))[:8], first)


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_row_nll_is_per_sequence_ce_sum(name):
    hidden, labels, weight = random_batch(4, 9, 5, 11, seed=8)
    terms = IMPLEMENTATIONS[name](hidden, labels, weight, halves(4), torch.rand(2), 1.0, 0.2)
    for row in range(4):
        targets = labels[row, 1:]
        expected = F.cross_entropy(hidden[row, :-1] @ weight.T, targets, ignore_index=-100, reduction="sum")
        assert terms.row_nll[row].item() == pytest.approx(expected.item(), rel=1e-5)


def test_response_nll_matches_full_logits():
    from sftmix.losses import response_nll

    hidden, labels, weight = random_batch(3, 12, 6, 17, seed=9)
    nll_sum, num_tokens = response_nll(hidden, labels, weight, chunk_rows=4)
    for row in range(3):
        targets = labels[row, 1:]
        expected = F.cross_entropy(hidden[row, :-1] @ weight.T, targets, ignore_index=-100, reduction="sum")
        assert nll_sum[row].item() == pytest.approx(expected.item(), rel=1e-5)
        assert num_tokens[row].item() == int((targets != -100).sum())


@pytest.mark.parametrize("name", sorted(IMPLEMENTATIONS))
def test_token_accuracy_and_entropy_over_supervised_tokens(name):
    """TRL's logs, from the same tiles: entropy of softmax(W h) and top-1 hits, supervised positions only."""
    hidden, labels, weight = random_batch(4, 10, 6, 11, seed=5, dtype=torch.float64)
    terms = IMPLEMENTATIONS[name](hidden, labels, weight, halves(4), torch.tensor([0.4, 0.6]).double(), 1.0, 0.2)
    entropy, hits = 0.0, 0
    for row in range(4):
        for t in range(9):
            if labels[row, t + 1] != -100:
                probs = F.softmax(weight @ hidden[row, t], dim=-1).detach()
                entropy -= float((probs * probs.log()).sum())
                hits += int(probs.argmax() == labels[row, t + 1])
    assert terms.entropy_sum.item() == pytest.approx(entropy, rel=1e-6)
    assert int(terms.num_correct) == hits
