"""Loss aggregation: micro-batch, data-parallel and context-parallel splits of a mini-batch give
exactly the full-batch loss and gradient when every part divides by the global normaliser."""

from __future__ import annotations

import pytest
import torch
from algorithm_batches import response_mask, with_garbage

from megarl.algorithms.aggregation import MODES, aggregate_loss, masked_mean, normalizer
from megarl.algorithms.policy_losses import policy_loss

pytestmark = pytest.mark.cpu

LENGTHS = (7, 1, 4, 6, 2, 5, 3, 7, 0, 5)  # row 8 was filtered out: it counts nowhere
HORIZON = 7
HIDDEN, VOCAB = 3, 5
ALL = list(range(len(LENGTHS)))

# Each split: ranks -> micro-batches -> rows, uneven in both sample count and padded length.
SPLITS = {
    "1 micro-batch": [[ALL]],
    "2 micro-batches": [[[0, 1, 2], [3, 4, 5, 6, 7, 8, 9]]],
    "4 micro-batches": [[[0], [1, 2, 3, 4], [5, 6], [7, 8, 9]]],
    "2 ranks": [[[0, 1, 2]], [[3, 4, 5, 6, 7, 8, 9]]],
    "2 ranks x uneven micro-batches": [[[0, 1, 2, 3], [4, 5]], [[6], [7, 8, 9]]],
}


def data():
    """A tiny policy's inputs: features -> logits = features @ weight -> log-probs of the tokens."""
    generator = torch.Generator().manual_seed(0)
    shape = (len(LENGTHS), HORIZON)
    return dict(
        features=torch.randn(*shape, HIDDEN, generator=generator),
        tokens=torch.randint(VOCAB, shape, generator=generator),
        old_log_probs=-2 * torch.rand(shape, generator=generator) - 0.5,
        advantages=torch.randn(shape, generator=generator),
        mask=response_mask(LENGTHS, HORIZON),
        weight=torch.randn(HIDDEN, VOCAB, generator=generator),
    )


def per_token_loss(weight, inputs, rows, length):
    """PPO loss of ``rows``, cut to ``length`` positions (a micro-batch's own padding)."""
    logits = inputs["features"][rows, :length] @ weight
    log_probs = torch.log_softmax(logits, -1).gather(-1, inputs["tokens"][rows, :length, None]).squeeze(-1)
    loss, _ = policy_loss(
        "ppo",
        log_probs=log_probs,
        old_log_probs=inputs["old_log_probs"][rows, :length],
        advantages=inputs["advantages"][rows, :length],
        response_mask=inputs["mask"][rows, :length],
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        clip_ratio_c=3.0,
    )
    return loss


def split_gradient(mode, ranks, local_normalizer=False):
    """Sum over ranks of each rank's gradient, each the sum over its micro-batches; and the loss."""
    inputs = data()
    mask = inputs["mask"]
    rank_normalizers = [sum(normalizer(mode, mask[rows], HORIZON) for rows in micro_batches) for micro_batches in ranks]
    global_normalizer = sum(rank_normalizers)  # the all-reduce over data-parallel ranks
    gradient, total_loss = torch.zeros(HIDDEN, VOCAB), 0.0
    for micro_batches in ranks:
        weight = inputs["weight"].clone().requires_grad_()  # every rank holds the same parameters
        for rows in micro_batches:
            length = max(1, max(LENGTHS[row] for row in rows))
            denominator = normalizer(mode, mask[rows], HORIZON) if local_normalizer else global_normalizer
            loss = aggregate_loss(per_token_loss(weight, inputs, rows, length), mask[rows, :length], mode, denominator)
            loss.backward()
            total_loss += loss.item()
        gradient += weight.grad
    return gradient, total_loss


def reference_loss(mode):
    """The mini-batch loss by its definition, response by response, in float64."""
    inputs = data()
    losses = per_token_loss(inputs["weight"], inputs, ALL, HORIZON).double().tolist()
    rows = [row for row, length in enumerate(LENGTHS) if length > 0]
    sums = {row: sum(losses[row][:LENGTHS[row]]) for row in rows}
    if mode == "token-mean":
        return sum(sums.values()) / sum(LENGTHS)
    if mode == "seq-mean-token-sum":
        return sum(sums.values()) / len(rows)
    if mode == "seq-mean-token-mean":
        return sum(sums[row] / LENGTHS[row] for row in rows) / len(rows)
    if mode == "token-sum":
        return sum(sums.values())
    return sum(sums.values()) / (len(rows) * HORIZON)


@pytest.mark.parametrize("mode", MODES)
def test_full_batch_loss_matches_its_definition(mode):
    _, loss = split_gradient(mode, SPLITS["1 micro-batch"])
    assert loss == pytest.approx(reference_loss(mode), abs=1e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("split", [name for name in SPLITS if name != "1 micro-batch"])
def test_splits_give_the_full_batch_loss_and_gradient(mode, split):
    full_gradient, full_loss = split_gradient(mode, SPLITS["1 micro-batch"])
    gradient, loss = split_gradient(mode, SPLITS[split])
    assert (gradient - full_gradient).abs().max().item() <= 1e-6
    assert loss == pytest.approx(full_loss, abs=1e-6)
    # The test has teeth: normalising each micro-batch by its own count is not the same (token-sum
    # has no count: there the two are the same by definition).
    naive_gradient, _ = split_gradient(mode, SPLITS[split], local_normalizer=True)
    if mode != "token-sum":
        assert (naive_gradient - full_gradient).abs().max().item() > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_context_parallel_shards_give_the_full_batch_gradient(mode):
    """Two context-parallel ranks hold load-balanced chunks of every response (Megatron's layout:
    rank 0 the first and last chunk); Z and |i| come from the full responses."""
    inputs = data()
    mask = inputs["mask"]
    shard_positions = ([0, 1, 5, 6], [2, 3, 4])
    global_normalizer = normalizer(mode, mask, HORIZON)

    def gradient(sequence_lengths):
        total = torch.zeros(HIDDEN, VOCAB)
        for positions in shard_positions:
            weight = inputs["weight"].clone().requires_grad_()
            loss = per_token_loss(weight, inputs, ALL, HORIZON)[:, positions]
            aggregate_loss(loss, mask[:, positions], mode, global_normalizer, sequence_lengths=sequence_lengths).backward()
            total += weight.grad
        return total

    full_gradient, _ = split_gradient(mode, SPLITS["1 micro-batch"])
    assert (gradient(mask.sum(-1)) - full_gradient).abs().max().item() <= 1e-6
    if mode == "seq-mean-token-mean":  # a shard's own row lengths are not |i|
        assert (gradient(None) - full_gradient).abs().max().item() > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_normalizer_is_additive_over_micro_batches(mode):
    mask = data()["mask"]
    for micro_batches in (SPLITS["4 micro-batches"][0], [ALL[:5], ALL[5:]]):
        parts = sum(normalizer(mode, mask[rows, : max(1, max(LENGTHS[r] for r in rows))], HORIZON) for rows in micro_batches)
        assert torch.equal(parts, normalizer(mode, mask, HORIZON))
    responses = 9  # row 8 is empty
    expected = {"token-mean": sum(LENGTHS), "seq-mean-token-sum-norm": responses * HORIZON, "token-sum": 0}
    assert normalizer(mode, mask, HORIZON).item() == expected.get(mode, responses)


@pytest.mark.parametrize("mode", MODES)
def test_masked_positions_are_never_read(mode):
    inputs = data()
    mask = inputs["mask"]
    losses = per_token_loss(inputs["weight"], inputs, ALL, HORIZON)
    total = normalizer(mode, mask, HORIZON)
    noisy = with_garbage(losses, mask, 1)
    assert torch.equal(aggregate_loss(losses, mask, mode, total), aggregate_loss(noisy, mask, mode, total))


@pytest.mark.parametrize("mode", MODES)
def test_nothing_to_train_on_gives_zero(mode):
    weight = torch.ones(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3)
    loss = aggregate_loss(weight * 2, mask, mode, normalizer(mode, mask, 3))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(weight.grad, torch.zeros(2, 3))


def test_unknown_mode_lists_the_valid_ones():
    with pytest.raises(ValueError, match="choose one of token-mean, seq-mean-token-sum, seq-mean-token-mean"):
        normalizer("mean", torch.ones(1, 1), 1)
    with pytest.raises(ValueError, match="unknown loss aggregation mode 'sum'"):
        aggregate_loss(torch.ones(1, 1), torch.ones(1, 1), "sum", 1.0)


def test_token_sum_is_the_plain_sum_over_every_split():
    """token-sum's normaliser is 0 in every part (Megatron then leaves the gradient unscaled) and
    each micro-batch adds its plain sum: the split gives the sum of the whole mini-batch."""
    inputs = data()
    mask = inputs["mask"]
    assert all(normalizer("token-sum", mask[rows], HORIZON).item() == 0 for rows in SPLITS["4 micro-batches"][0])
    losses = per_token_loss(inputs["weight"], inputs, ALL, HORIZON)
    expected = sum(losses[row, t].item() for row, length in enumerate(LENGTHS) for t in range(length))
    assert aggregate_loss(losses, mask, "token-sum", 0.0).item() == pytest.approx(expected, abs=1e-5)
    # A mini-batch twice as large has twice the loss: no normaliser.
    doubled = aggregate_loss(torch.cat([losses, losses]), torch.cat([mask, mask]), "token-sum", 0.0)
    assert doubled.item() == pytest.approx(2 * expected, abs=1e-5)


def test_masked_mean():
    values = torch.tensor([[1.0, 2.0, 1e9], [4.0, 1e9, 1e9]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(values, mask).item() == pytest.approx(7 / 3)
    assert masked_mean(values, torch.zeros(2, 3)).item() == 0.0
