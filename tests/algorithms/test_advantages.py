"""Advantage estimators against naive per-sample loops; masked positions and all-equal groups."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from algorithm_batches import response_mask, with_garbage

from megarl.algorithms.advantages import ADVANTAGES, EPS, OTB_EPS, clip_advantages, compute_advantages, outcome_token_rewards

pytestmark = pytest.mark.cpu

LENGTHS = (3, 5, 1, 4, 6, 2, 6, 4)
GROUP_IDS = (10, 10, 10, 4, 4, 99, 7, 7)  # sizes 3, 2, 1, 2
HORIZON = 6
HOLES = ((1, 2), (4, 0), (6, 3))  # tokens masked inside responses (multi-turn tool output)


def batch(holes=(), seed=0):
    generator = torch.Generator().manual_seed(seed)
    mask = response_mask(LENGTHS, HORIZON, holes)
    return dict(
        scores=torch.randn(len(LENGTHS), generator=generator),
        token_rewards=torch.randn(len(LENGTHS), HORIZON, generator=generator),
        values=torch.randn(len(LENGTHS), HORIZON, generator=generator),
        reward_baselines=torch.randn(len(LENGTHS), generator=generator),
        old_log_probs=-torch.rand(len(LENGTHS), HORIZON, generator=generator) * 3,
        sum_pi_squared=torch.rand(len(LENGTHS), HORIZON, generator=generator),
        rollout_is_weights=torch.rand(len(LENGTHS), HORIZON, generator=generator) * 2,
        response_mask=mask,
        group_ids=torch.tensor(GROUP_IDS),
        gamma=0.9,
        lam=0.8,
        norm_by_std=True,
    )


def max_error(actual: torch.Tensor, expected) -> float:
    return (actual.double() - torch.tensor(expected, dtype=torch.float64)).abs().max().item()


def groups(inputs) -> dict[int, list[int]]:
    members = {}
    for row, group in enumerate(inputs["group_ids"].tolist()):
        members.setdefault(group, []).append(row)
    return members


def expand(per_sample, inputs):
    """A per-sample value on each valid token, 0 elsewhere, as nested lists."""
    mask = inputs["response_mask"].tolist()
    return [[value if keep else 0.0 for keep in row] for value, row in zip(per_sample, mask)]


def reference_grpo(inputs, norm_by_std):
    scores = inputs["scores"].double().tolist()
    out = [0.0] * len(scores)
    for rows in groups(inputs).values():
        values = [scores[i] for i in rows]
        if len(set(values)) == 1:
            continue
        mean, std = statistics.fmean(values), statistics.stdev(values)
        for i in rows:
            out[i] = (scores[i] - mean) / (std + EPS) if norm_by_std else scores[i] - mean
    return out


def reference_rloo(inputs):
    scores = inputs["scores"].double().tolist()
    out = [0.0] * len(scores)
    for rows in groups(inputs).values():
        for i in rows:
            others = [scores[j] for j in rows if j != i]
            if others and len({scores[j] for j in rows}) > 1:
                out[i] = scores[i] - sum(others) / len(others)
    return out


def reference_returns(inputs, gamma):
    rewards, mask = inputs["token_rewards"].double().tolist(), inputs["response_mask"].tolist()
    out = []
    for row_rewards, row_mask in zip(rewards, mask):
        row, running = [0.0] * HORIZON, 0.0
        for t in reversed([t for t in range(HORIZON) if row_mask[t]]):
            running = row_rewards[t] + gamma * running
            row[t] = running
        out.append(row)
    return out


def reference_gae(inputs, gamma, lam):
    rewards, values, mask = (inputs[k].double().tolist() for k in ("token_rewards", "values", "response_mask"))
    out = []
    for row_rewards, row_values, row_mask in zip(rewards, values, mask):
        row, running, next_value = [0.0] * HORIZON, 0.0, 0.0
        for t in reversed([t for t in range(HORIZON) if row_mask[t]]):
            running = row_rewards[t] + gamma * next_value - row_values[t] + gamma * lam * running
            next_value = row_values[t]
            row[t] = running
        out.append(row)
    return out


def reference_whiten(rows, mask, centre=True):
    valid = [v for row, m in zip(rows, mask) for v, keep in zip(row, m) if keep]
    mean, std = statistics.fmean(valid), statistics.stdev(valid)
    shift = mean if centre else 0.0
    return [[(v - shift) / (std + EPS) if keep else 0.0 for v, keep in zip(row, m)] for row, m in zip(rows, mask)]


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_matches_loop(norm_by_std):
    inputs = batch()
    advantages, returns = compute_advantages("grpo", **{**inputs, "norm_by_std": norm_by_std})
    assert max_error(advantages, expand(reference_grpo(inputs, norm_by_std), inputs)) <= 1e-6
    assert torch.equal(returns, advantages)


def test_grpo_known_values():
    inputs = dict(scores=torch.tensor([0.0, 1.0]), response_mask=torch.ones(2, 1), group_ids=torch.tensor([0, 0]))
    advantages, _ = compute_advantages("grpo", **inputs, norm_by_std=True)
    std = 0.5**0.5  # unbiased std of {0, 1}
    assert advantages[:, 0].tolist() == pytest.approx([-0.5 / (std + EPS), 0.5 / (std + EPS)], abs=1e-6)
    dr_grpo, _ = compute_advantages("grpo", **inputs, norm_by_std=False)
    assert dr_grpo[:, 0].tolist() == [-0.5, 0.5]


def test_rloo_matches_loop():
    inputs = batch()
    advantages, _ = compute_advantages("rloo", **inputs)
    assert max_error(advantages, expand(reference_rloo(inputs), inputs)) <= 1e-6


@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("holes", [(), HOLES])
def test_reinforce_pp_matches_loop(gamma, holes):
    inputs = batch(holes)
    advantages, returns = compute_advantages("reinforce_pp", **{**inputs, "gamma": gamma})
    expected_returns = reference_returns(inputs, gamma)
    assert max_error(returns, expected_returns) <= 1e-6
    assert max_error(advantages, reference_whiten(expected_returns, inputs["response_mask"].tolist())) <= 1e-6


def test_reinforce_pp_baseline_matches_loop():
    inputs = batch()
    advantages, _ = compute_advantages("reinforce_pp_baseline", **inputs)
    centred = expand(reference_grpo(inputs, norm_by_std=False), inputs)
    expected = reference_whiten(centred, inputs["response_mask"].tolist(), centre=False)
    assert max_error(advantages, expected) <= 1e-6


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0)])
@pytest.mark.parametrize("holes", [(), HOLES])
def test_gae_matches_loop(gamma, lam, holes):
    inputs = {**batch(holes), "gamma": gamma, "lam": lam}
    raw, returns = compute_advantages("gae", **inputs, whiten=False)
    expected = reference_gae(inputs, gamma, lam)
    assert max_error(raw, expected) <= 1e-6
    values = inputs["values"].double().tolist()
    mask = inputs["response_mask"].tolist()
    expected_returns = [[a + v if keep else 0.0 for a, v, keep in zip(*rows)] for rows in zip(expected, values, mask)]
    assert max_error(returns, expected_returns) <= 1e-6
    whitened, whitened_returns = compute_advantages("gae", **inputs)
    assert max_error(whitened, reference_whiten(expected, mask)) <= 1e-6
    assert torch.equal(whitened_returns, returns)


def test_outcome_token_rewards_put_the_score_on_the_last_valid_token():
    mask = response_mask((3, 0, 2), 4, holes=((0, 2),))
    rewards = outcome_token_rewards(torch.tensor([1.5, 7.0, -2.0]), mask)
    assert rewards.tolist() == [[0.0, 1.5, 0.0, 0.0], [0.0] * 4, [0.0, -2.0, 0.0, 0.0]]


@pytest.mark.parametrize("name", ADVANTAGES.names())
@pytest.mark.parametrize("holes", [(), HOLES])
def test_masked_positions_change_nothing(name, holes):
    inputs = batch(holes)
    mask = inputs["response_mask"]
    noisy = {
        **inputs,
        "token_rewards": with_garbage(inputs["token_rewards"], mask, 1),
        "values": with_garbage(inputs["values"], mask, 2),
        "old_log_probs": with_garbage(inputs["old_log_probs"], mask, 3),
        "sum_pi_squared": with_garbage(inputs["sum_pi_squared"], mask, 4),
        "rollout_is_weights": with_garbage(inputs["rollout_is_weights"], mask, 5),
    }
    for clean, dirty in zip(compute_advantages(name, **inputs), compute_advantages(name, **noisy)):
        assert torch.equal(clean, dirty)
        assert torch.equal(clean[mask == 0], torch.zeros_like(clean[mask == 0]))
        assert torch.isfinite(clean).all()


def test_gae_known_values_whitened_and_not():
    # gamma = lam = 1, V = (0.5, 0.25), reward 1 on the last token: delta = (0 + 0.25 - 0.5, 1 + 0 - 0.25)
    # = (-0.25, 0.75), A = (-0.25 + 0.75, 0.75) = (0.5, 0.75), R = A + V = (1, 1).
    inputs = dict(token_rewards=torch.tensor([[0.0, 1.0]]), values=torch.tensor([[0.5, 0.25]]), response_mask=torch.ones(1, 2), gamma=1.0, lam=1.0)
    raw, returns = compute_advantages("gae", **inputs, whiten=False)
    assert raw.tolist() == [[0.5, 0.75]]
    assert returns.tolist() == [[1.0, 1.0]]
    # Whitened: mean 0.625, unbiased std sqrt(2 x 0.125^2) = 0.125 sqrt(2).
    whitened, whitened_returns = compute_advantages("gae", **inputs, whiten=True)
    std = 0.125 * math.sqrt(2)
    assert whitened[0].tolist() == pytest.approx([-0.125 / (std + EPS), 0.125 / (std + EPS)], abs=1e-6)
    assert whitened_returns.tolist() == [[1.0, 1.0]]


def test_reinforce_pp_known_values_whitened_and_not():
    # gamma 0.5, reward 1 on the last of three tokens: G = (0.25, 0.5, 1).
    inputs = dict(token_rewards=torch.tensor([[0.0, 0.0, 1.0]]), response_mask=torch.ones(1, 3), gamma=0.5)
    raw, returns = compute_advantages("reinforce_pp", **inputs, whiten=False)
    assert raw.tolist() == returns.tolist() == [[0.25, 0.5, 1.0]]
    # Whitened: mean 7/12, unbiased std sqrt(((-1/3)^2 + (-1/12)^2 + (5/12)^2) / 2) = sqrt(7/48).
    whitened, _ = compute_advantages("reinforce_pp", **inputs, whiten=True)
    std = math.sqrt(7 / 48)
    assert whitened[0].tolist() == pytest.approx([(g - 7 / 12) / (std + EPS) for g in (0.25, 0.5, 1.0)], abs=1e-6)


def test_reinforce_pp_baseline_known_values_scaled_and_not():
    # Group 0 scores (1, 0): centred (0.5, -0.5); group 1 (2, 2) all equal: 0. One token each.
    inputs = dict(scores=torch.tensor([1.0, 0.0, 2.0, 2.0]), response_mask=torch.ones(4, 1), group_ids=torch.tensor([0, 0, 1, 1]))
    centred, _ = compute_advantages("reinforce_pp_baseline", **inputs, whiten=False)
    assert centred[:, 0].tolist() == [0.5, -0.5, 0.0, 0.0]
    # Scaled by the unbiased std of (0.5, -0.5, 0, 0): sqrt(0.5 / 3); not re-centred.
    scaled, _ = compute_advantages("reinforce_pp_baseline", **inputs, whiten=True)
    std = math.sqrt(0.5 / 3)
    assert scaled[:, 0].tolist() == pytest.approx([0.5 / (std + EPS), -0.5 / (std + EPS), 0.0, 0.0], abs=1e-6)


def test_clip_advantages_known_values():
    advantages = torch.tensor([[2.0, -3.0, 0.5], [0.0, -0.75, 1.0]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    clipped, fraction = clip_advantages(advantages, mask, 1.0)
    assert clipped.tolist() == [[1.0, -1.0, 0.5], [0.0, -0.75, 1.0]]
    assert fraction.item() == 2 / 5  # 2 and -3 lay outside [-1, 1]; 1.0 on the bound does not count
    same, none = clip_advantages(advantages, mask, None)
    assert same is advantages and none.item() == 0.0


@pytest.mark.parametrize(
    "name,options",
    [
        ("grpo", {"norm_by_std": True}),
        ("grpo", {"norm_by_std": False}),
        ("rloo", {}),
        ("reinforce_pp_baseline", {}),
        ("opo", {}),
        ("gpg", {}),
        ("grpo_passk", {"norm_by_std": True}),
        ("grpo_passk", {"norm_by_std": False}),
        ("optimal_token_baseline", {}),
    ],
)
def test_all_equal_groups_get_exactly_zero(name, options):
    inputs = batch()
    # group 10 all 0.1 (its float mean is not exactly 0.1), group 99 alone, group 4 varies, group 7 all 1.
    inputs["scores"] = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.0, 0.7, 1.0, 1.0])
    inputs["token_rewards"] = outcome_token_rewards(inputs["scores"], inputs["response_mask"])
    advantages, _ = compute_advantages(name, **{**inputs, **options})
    assert torch.isfinite(advantages).all()
    constant_rows = [0, 1, 2, 5, 6, 7]
    assert torch.equal(advantages[constant_rows], torch.zeros_like(advantages[constant_rows]))
    learning = inputs["response_mask"].bool().clone()
    learning[[0, 1, 2, 5, 6, 7]] = False
    if name == "grpo_passk":
        learning[4] = False  # only the group's best response learns
    if name == "optimal_token_baseline":
        learning[4, 4:] = False  # row 4 (score 0) alone past row 3's length: return 0, no baseline
    assert (advantages[learning] != 0).all()
    # A batch where every group is constant (the batch std is 0 too).
    inputs["scores"] = torch.tensor([0.3] * 3 + [1.0] * 2 + [5.0] + [0.0] * 2)
    inputs["token_rewards"] = outcome_token_rewards(inputs["scores"], inputs["response_mask"])
    advantages, _ = compute_advantages(name, **{**inputs, **options})
    assert torch.equal(advantages, torch.zeros_like(advantages))


def test_dtypes():
    inputs = batch()
    advantages, _ = compute_advantages("grpo", **{**inputs, "scores": inputs["scores"].double()})
    assert advantages.dtype == torch.float64
    advantages, _ = compute_advantages("rloo", **{**inputs, "scores": torch.tensor([1, 0, 1, 1, 0, 1, 0, 0])})
    assert advantages.dtype == torch.float32


def reference_opo(inputs):
    scores, mask = inputs["scores"].double().tolist(), inputs["response_mask"].tolist()
    lengths = [sum(row) for row in mask]
    out = [0.0] * len(scores)
    for rows in groups(inputs).values():
        if len({scores[i] for i in rows}) == 1:
            continue
        baseline = sum(lengths[i] * scores[i] for i in rows) / sum(lengths[i] for i in rows)
        for i in rows:
            out[i] = scores[i] - baseline
    return out


def test_opo_matches_loop():
    inputs = batch(HOLES)
    advantages, returns = compute_advantages("opo", **inputs)
    assert max_error(advantages, expand(reference_opo(inputs), inputs)) <= 1e-6
    assert torch.equal(returns, advantages)


def test_opo_weighs_longer_responses_more():
    inputs = dict(scores=torch.tensor([1.0, 0.0]), response_mask=response_mask((3, 1), 3), group_ids=torch.tensor([0, 0]))
    advantages, _ = compute_advantages("opo", **inputs)
    assert advantages[:, 0].tolist() == pytest.approx([0.25, -0.75])  # baseline (3 * 1 + 1 * 0) / 4


@pytest.mark.parametrize("zeros", [0, 3, 8])
def test_gpg_matches_loop(zeros):
    inputs = batch()
    inputs["scores"][:zeros] = 0.0
    advantages, _ = compute_advantages("gpg", **inputs)
    nonzero = sum(score != 0 for score in inputs["scores"].tolist())
    alpha = len(LENGTHS) / max(1, nonzero)
    expected = [alpha * value for value in reference_grpo(inputs, norm_by_std=False)]
    assert max_error(advantages, expand(expected, inputs)) <= 1e-6


def reference_passk(inputs, norm_by_std):
    scores = inputs["scores"].double().tolist()
    out = [0.0] * len(scores)
    for rows in groups(inputs).values():
        if len(rows) < 2:
            continue
        ranked = sorted(rows, key=lambda i: -scores[i])
        best, second = ranked[0], ranked[1]
        gap = scores[best] - scores[second]
        out[best] = gap / (statistics.stdev(scores[i] for i in rows) + EPS) if norm_by_std else gap
    return out


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_passk_matches_loop(norm_by_std):
    inputs = batch()
    advantages, _ = compute_advantages("grpo_passk", **{**inputs, "norm_by_std": norm_by_std})
    assert max_error(advantages, expand(reference_passk(inputs, norm_by_std), inputs)) <= 1e-6


def test_grpo_passk_tie_for_the_best_gives_zero():
    inputs = dict(scores=torch.tensor([1.0, 1.0, 0.0]), response_mask=torch.ones(3, 2), group_ids=torch.tensor([0, 0, 0]))
    advantages, _ = compute_advantages("grpo_passk", **inputs, norm_by_std=True)
    assert torch.equal(advantages, torch.zeros(3, 2))


@pytest.mark.parametrize("holes", [(), HOLES])
def test_remax_matches_loop(holes):
    inputs = batch(holes)
    advantages, returns = compute_advantages("remax", **inputs)
    expected_returns = reference_returns(inputs, gamma=1.0)
    baselines = inputs["reward_baselines"].double().tolist()
    mask = inputs["response_mask"].tolist()
    expected = [[g - b if keep else 0.0 for g, keep in zip(row, m)] for row, b, m in zip(expected_returns, baselines, mask)]
    assert max_error(returns, expected_returns) <= 1e-6
    assert max_error(advantages, expected) <= 1e-6


def reference_otb(inputs, with_is_weights):
    rewards, old, pi2, rho, mask = (
        inputs[k].double().tolist() for k in ("token_rewards", "old_log_probs", "sum_pi_squared", "rollout_is_weights", "response_mask")
    )
    returns = reference_returns(inputs, gamma=1.0)
    energy = []
    for i in range(len(rewards)):
        row, total = [0.0] * HORIZON, 0.0
        for t in range(HORIZON):
            if mask[i][t]:
                w = 1 - 2 * math.exp(old[i][t]) + pi2[i][t]
                total += w * rho[i][t] ** 2 if with_is_weights else w
                row[t] = total
        energy.append(row)
    out = [[0.0] * HORIZON for _ in rewards]
    for rows in groups(inputs).values():
        for t in range(HORIZON):
            valid = [i for i in rows if mask[i][t]]
            if len({returns[i][t] for i in valid}) <= 1:
                continue
            baseline = sum(returns[i][t] * energy[i][t] for i in valid) / (sum(energy[i][t] for i in valid) + OTB_EPS)
            for i in valid:
                out[i][t] = returns[i][t] - baseline
    return out, returns


@pytest.mark.parametrize("with_is_weights", [False, True])
@pytest.mark.parametrize("holes", [(), HOLES])
def test_optimal_token_baseline_matches_loop(holes, with_is_weights):
    inputs = batch(holes)
    if not with_is_weights:
        inputs["rollout_is_weights"] = None
    advantages, returns = compute_advantages("optimal_token_baseline", **inputs)
    expected, expected_returns = reference_otb({**batch(holes)}, with_is_weights)
    assert max_error(advantages, expected) <= 1e-6
    assert max_error(returns, expected_returns) <= 1e-6


@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_estimators_follow_the_rows_when_the_batch_is_reordered(name):
    # Every rank computes the advantages of the whole batch, so only the order of its rows may differ.
    inputs = batch(HOLES)
    order = torch.randperm(len(LENGTHS), generator=torch.Generator().manual_seed(3))
    shuffled = {key: value[order] if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}
    for original, reordered in zip(compute_advantages(name, **inputs), compute_advantages(name, **shuffled)):
        assert (original[order].double() - reordered.double()).abs().max().item() <= 1e-6
