"""Policy losses against naive per-token loops: values, gradients, metrics; masking never matters."""

from __future__ import annotations

import math

import pytest
import torch
from algorithm_batches import assert_matches_reference, response_mask, split_gradient, valid_cells, with_garbage

from megarl.algorithms.aggregation import MODES, aggregate_loss, normalizer
from megarl.algorithms.policy_losses import (
    GSPO_LOG_RATIO_MAX,
    LOG_RATIO_LIMIT,
    POLICY_LOSSES,
    entropy_bonus,
    policy_loss,
    sequence_log_ratio,
)

pytestmark = pytest.mark.cpu

LENGTHS = (4, 1, 3, 6, 5, 6, 2, 6)
HORIZON = 6
SETTINGS = {
    "ppo": dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=1.5),
    "gspo": dict(clip_ratio_low=0.03, clip_ratio_high=0.04, clip_ratio_c=None),
    "cispo": dict(clip_ratio_low=0.2, clip_ratio_high=0.28),
    "gpg": dict(),
    "sapo": dict(tau_pos=1.0, tau_neg=1.05),
    "gmpo": dict(clip_ratio_low=0.4, clip_ratio_high=0.4),
    "dppo_tv": dict(clip_ratio_low=0.05, clip_ratio_high=0.05, clip_ratio_c=1.5),
    "dppo_kl": dict(clip_ratio_low=0.02, clip_ratio_high=0.02, clip_ratio_c=1.5),
    # Bounds and ratios that select a few tokens of `batch` (tests/algorithms/test_covariance_losses.py).
    "clip_cov": dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_cov_ratio=0.2, clip_cov_lb=0.0, clip_cov_ub=5.0, seed=3),
    "kl_cov": dict(kl_cov_ratio=0.2, ppo_kl_coef=0.5),
}


def batch(seed=0, spread=0.5, sequence_advantages=False):
    generator = torch.Generator().manual_seed(seed)
    shape = (len(LENGTHS), HORIZON)
    old = -3 * torch.rand(shape, generator=generator)
    new = old + spread * torch.randn(shape, generator=generator)
    advantages = torch.randn(shape, generator=generator)
    if sequence_advantages:
        advantages = advantages[:, :1].expand(shape).clone()
    mask = response_mask(LENGTHS, HORIZON)
    return dict(log_probs=new.requires_grad_(), old_log_probs=old, advantages=advantages, response_mask=mask)


def clip(value, low, high):
    return min(max(value, low), high)


def valid_mean(values: dict) -> float:
    return sum(values.values()) / len(values)


def surrogate_reference(ratio, advantage, low, high, c):
    """One token of the clipped surrogate: (loss, d loss / d ratio, clipped_low, clipped_high, dual)."""
    unclipped, clipped = -advantage * ratio, -advantage * clip(ratio, 1 - low, 1 + high)
    loss = max(unclipped, clipped)
    clip_active = clipped > unclipped
    if c is not None and advantage < 0 and -advantage * c < loss:
        return -advantage * c, 0.0, False, False, True
    gradient = 0.0 if clip_active else -advantage
    return loss, gradient, clip_active and advantage < 0, clip_active and advantage > 0, False


def reference(name, inputs, settings):
    """Per-token losses, gradients w.r.t. log_probs, and metrics of ``name``, token by token."""
    log_probs, old, advantages = (inputs[k].detach().double().tolist() for k in ("log_probs", "old_log_probs", "advantages"))
    low, high, c = settings["clip_ratio_low"], settings["clip_ratio_high"], settings.get("clip_ratio_c")
    mask = inputs["response_mask"].tolist()
    cells = list(valid_cells(inputs["response_mask"]))
    losses, gradients, flags, ratios = {}, {}, {}, {}
    for i, t in cells:
        token_ratio = math.exp(clip(log_probs[i][t] - old[i][t], -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
        a = advantages[i][t]
        if name == "cispo":
            weight = clip(token_ratio, 1 - low, 1 + high)
            losses[i, t], gradients[i, t] = -weight * a * log_probs[i][t], -weight * a
            flags[i, t] = (token_ratio < 1 - low, token_ratio > 1 + high, False)
            ratios[i, t] = token_ratio
            continue
        capped = False
        if name == "gspo":
            row = [log_probs[i][s] - old[i][s] for s in range(HORIZON) if mask[i][s]]
            capped = sum(row) / len(row) > GSPO_LOG_RATIO_MAX
            ratio = math.exp(min(sum(row) / len(row), GSPO_LOG_RATIO_MAX))
        else:
            ratio = token_ratio
        loss, d_ratio, clipped_low, clipped_high, dual = surrogate_reference(ratio, a, low, high, c)
        # d ratio / d log pi_t = ratio (ppo: r = exp(log pi - log pi_old); gspo-token: sg(s) pi / sg(pi)),
        # 0 where GSPO's log-ratio is capped.
        losses[i, t], gradients[i, t] = loss, 0.0 if capped else d_ratio * ratio
        flags[i, t] = (clipped_low, clipped_high, dual)
        ratios[i, t] = ratio
    token_ratios = {(i, t): math.exp(log_probs[i][t] - old[i][t]) for i, t in cells}
    metrics = {
        "clip_fraction_low": valid_mean({k: float(f[0]) for k, f in flags.items()}),
        "clip_fraction_high": valid_mean({k: float(f[1]) for k, f in flags.items()}),
        "dual_clip_fraction": valid_mean({k: float(f[2]) for k, f in flags.items()}),
        "approx_kl": valid_mean({k: r - 1 - math.log(r) for k, r in token_ratios.items()}),
        "ratio_mean": valid_mean(ratios),
    }
    return as_tensor(losses), as_tensor(gradients), metrics


def as_tensor(cells: dict) -> torch.Tensor:
    out = torch.zeros(len(LENGTHS), HORIZON, dtype=torch.float64)
    for (i, t), value in cells.items():
        out[i, t] = value
    return out


@pytest.mark.parametrize(
    "name,settings",
    [
        ("ppo", dict(clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=None)),
        ("ppo", dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=None)),
        ("ppo", SETTINGS["ppo"]),
        ("gspo", SETTINGS["gspo"]),
        ("gspo", dict(clip_ratio_low=0.03, clip_ratio_high=0.04, clip_ratio_c=1.1)),
        ("cispo", SETTINGS["cispo"]),
    ],
)
def test_loss_gradient_and_metrics_match_loop(name, settings):
    spread = 0.2 if name == "gspo" else 1.0
    inputs = batch(spread=spread, sequence_advantages=name == "gspo")
    loss, metrics = policy_loss(name, **inputs, **settings)
    expected_loss, expected_gradient, expected_metrics = reference(name, inputs, settings)
    assert_matches_reference(loss, metrics, inputs, expected_loss, expected_gradient, expected_metrics)
    # The batch reaches the branches under test.
    assert metrics["clip_fraction_low"] > 0 and metrics["clip_fraction_high"] > 0
    if settings.get("clip_ratio_c") is not None:
        assert metrics["dual_clip_fraction"] > 0


def test_cispo_keeps_the_gradient_of_clipped_tokens():
    inputs = batch(spread=1.0)
    loss, metrics = policy_loss("cispo", **inputs, **SETTINGS["cispo"])
    loss.sum().backward()
    valid = inputs["response_mask"].bool()
    assert metrics["clip_fraction_high"] > 0
    assert (inputs["log_probs"].grad[valid] != 0).all()


def test_cispo_refuses_a_dual_clip():
    with pytest.raises(ValueError, match="cispo has no dual clip"):
        policy_loss("cispo", **batch(), clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=3.0)


def test_gspo_token_with_seq_mean_token_mean_is_the_sequence_objective():
    """GSPO's paper objective, mean_i max(-A_i s_i, -A_i clip(s_i)) with s_i differentiable, has the
    same gradient as the token-level form aggregated with seq-mean-token-mean."""
    settings = dict(clip_ratio_low=0.03, clip_ratio_high=0.04)
    inputs = batch(spread=0.05, sequence_advantages=True)
    mask = inputs["response_mask"]
    loss, _ = policy_loss("gspo", **inputs, **settings)
    aggregate_loss(loss, mask, "seq-mean-token-mean", normalizer("seq-mean-token-mean", mask, HORIZON)).backward()
    token_gradient = inputs["log_probs"].grad.clone()
    inputs["log_probs"].grad = None
    ratio = torch.exp(sequence_log_ratio(inputs["log_probs"], inputs["old_log_probs"], mask))
    advantage = inputs["advantages"][:, 0]
    clipped = torch.clamp(ratio, 1 - settings["clip_ratio_low"], 1 + settings["clip_ratio_high"])
    torch.maximum(-advantage * ratio, -advantage * clipped).mean().backward()
    assert (token_gradient - inputs["log_probs"].grad).abs().max() <= 1e-6


def test_gspo_caps_the_log_ratio_above_at_10_with_no_gradient_and_no_floor_as_verl():
    inputs = batch(spread=0.1, sequence_advantages=True)
    mask = inputs["response_mask"]
    shift = torch.zeros_like(inputs["old_log_probs"])
    shift[0], shift[1] = -12.0, 30.0  # response 0: log s = +12 (capped); response 1: log s = -30 (kept)
    inputs["old_log_probs"] = inputs["old_log_probs"] + shift
    # Response 0 with A < 0 and response 1 with A > 0: in both the unclipped branch is the max.
    inputs["advantages"] = inputs["advantages"].abs()
    inputs["advantages"][0] *= -1
    loss, metrics = policy_loss("gspo", **inputs, clip_ratio_low=0.2, clip_ratio_high=0.2)
    loss.sum().backward()
    ratio = torch.exp(sequence_log_ratio(inputs["log_probs"].detach(), inputs["old_log_probs"], mask))
    valid = mask.bool()
    assert torch.allclose(loss[0][valid[0]], -inputs["advantages"][0][valid[0]] * math.exp(10.0))
    assert inputs["log_probs"].grad[0].abs().max() == 0
    assert torch.allclose(loss[1][valid[1]], -inputs["advantages"][1][valid[1]] * ratio[1], rtol=1e-5, atol=0) and ratio[1] < math.exp(-25)


@pytest.mark.parametrize("name", POLICY_LOSSES.names())
def test_masked_positions_change_nothing(name):
    clean_inputs = batch(spread=1.0)
    mask = clean_inputs["response_mask"]
    noisy_inputs = {
        **clean_inputs,
        **{
            key: with_garbage(clean_inputs[key].detach(), mask, seed)
            for seed, key in enumerate(("log_probs", "old_log_probs", "advantages"))
        },
    }
    noisy_inputs["log_probs"].requires_grad_()
    results = []
    for inputs in (clean_inputs, noisy_inputs):
        loss, metrics = policy_loss(name, **inputs, **SETTINGS[name])
        aggregated = [aggregate_loss(loss, mask, mode, normalizer(mode, mask, HORIZON)) for mode in MODES]
        torch.stack(aggregated).sum().backward()
        results.append((loss, metrics, aggregated, inputs["log_probs"].grad))
    (clean, clean_metrics, clean_aggregated, clean_grad), (dirty, dirty_metrics, dirty_aggregated, dirty_grad) = results
    assert torch.equal(clean, dirty)
    assert all(torch.equal(clean_metrics[key], dirty_metrics[key]) for key in clean_metrics)
    assert all(torch.equal(a, b) for a, b in zip(clean_aggregated, dirty_aggregated))
    assert torch.equal(clean_grad, dirty_grad)
    assert torch.equal(clean[mask == 0], torch.zeros_like(clean[mask == 0]))


@pytest.mark.parametrize("name", POLICY_LOSSES.names())
def test_extreme_ratios_stay_finite(name):
    inputs = batch()
    inputs["old_log_probs"] = torch.where(torch.rand(len(LENGTHS), HORIZON) < 0.5, -200.0, 0.0)
    inputs["log_probs"] = (-200.0 - inputs["old_log_probs"]).requires_grad_()
    settings = {**SETTINGS[name], "clip_ratio_c": None} if name != "cispo" else SETTINGS[name]
    loss, metrics = policy_loss(name, **inputs, **settings)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(inputs["log_probs"].grad).all()
    assert all(torch.isfinite(value) for value in metrics.values())


def test_sequence_log_ratio_matches_loop():
    inputs = batch()
    ratio = sequence_log_ratio(inputs["log_probs"], inputs["old_log_probs"], inputs["response_mask"])
    for i, length in enumerate(LENGTHS):
        differences = [inputs["log_probs"][i, t].item() - inputs["old_log_probs"][i, t].item() for t in range(length)]
        assert ratio[i].item() == pytest.approx(sum(differences) / length, abs=1e-6)
    empty = sequence_log_ratio(torch.ones(1, 3), torch.zeros(1, 3), torch.zeros(1, 3))
    assert empty.tolist() == [0.0]


def test_entropy_bonus_lowers_the_loss_of_high_entropy():
    entropy = torch.tensor([[1.0, 2.0, 1e6]])
    bonus = entropy_bonus(entropy, torch.tensor([[1.0, 1.0, 0.0]]), 0.1)
    assert torch.equal(bonus, torch.tensor([[-0.1, -0.2, 0.0]]))


def probability_batch(name, **options):
    """``batch`` whose log-probs are those of probabilities (<= 0), as DPPO's trust region reads p."""
    inputs = batch(**options)
    if name.startswith("dppo"):
        inputs["log_probs"] = inputs["log_probs"].detach().clamp(max=-1e-3).requires_grad_()
    return inputs


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def new_loss_reference(name, inputs, settings):
    """Per-token losses and gradients w.r.t. log_probs of gpg, sapo, gmpo, dppo_*, token by token
    (gmpo: the gradient of the sum over response i's tokens of its sequence loss)."""
    log_probs, old, advantages = (inputs[k].detach().double().tolist() for k in ("log_probs", "old_log_probs", "advantages"))
    mask = inputs["response_mask"].tolist()
    losses, gradients = {}, {}
    for i, t in valid_cells(inputs["response_mask"]):
        a, x = advantages[i][t], clip(log_probs[i][t] - old[i][t], -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
        ratio = math.exp(x)
        if name == "gpg":
            losses[i, t], gradients[i, t] = -a * log_probs[i][t], -a
        elif name == "sapo":
            tau = settings["tau_pos"] if a > 0 else settings["tau_neg"]
            gate = sigmoid(tau * (ratio - 1))
            losses[i, t], gradients[i, t] = -a * 4 / tau * gate, -a * 4 * gate * (1 - gate) * ratio
        elif name == "gmpo":
            low, high = settings["clip_ratio_low"], settings["clip_ratio_high"]
            row = [s for s in range(HORIZON) if mask[i][s]]
            clipped, free = [], {}
            for s in row:
                y = clip(log_probs[i][s] - old[i][s], -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)
                bounded = clip(y, -low, high)
                sign = (advantages[i][s] > 0) - (advantages[i][s] < 0)
                clipped.append(sign * min(sign * y, sign * bounded))
                free[s] = sign != 0 and sign * bounded >= sign * y
            rho = math.exp(sum(clipped) / len(row))
            advantage = sum(advantages[i][s] for s in row) / len(row)
            losses[i, t] = -advantage * rho
            gradients[i, t] = -advantage * rho if free[t] else 0.0
        else:
            low, high, c = settings["clip_ratio_low"], settings["clip_ratio_high"], settings["clip_ratio_c"]
            p, q = math.exp(log_probs[i][t]), math.exp(old[i][t])
            if name == "dppo_tv":
                inside = p - q <= high if a > 0 else p - q >= -low
            else:
                divergence = q * (old[i][t] - log_probs[i][t]) + (1 - q) * math.log((1 - q + 1e-8) / (1 - p + 1e-8))
                inside = (divergence <= high or p <= q) if a > 0 else (divergence <= low or p >= q)
            weight = min(ratio, c)
            losses[i, t], gradients[i, t] = (-a * weight * log_probs[i][t], -a * weight) if inside else (0.0, 0.0)
    return as_tensor(losses), as_tensor(gradients)


@pytest.mark.parametrize("name", ["gpg", "sapo", "gmpo", "dppo_tv", "dppo_kl"])
def test_new_losses_and_gradients_match_loop(name):
    inputs = probability_batch(name, spread=0.3 if name == "gmpo" else 1.0, sequence_advantages=name == "gmpo")
    loss, metrics = policy_loss(name, **inputs, **SETTINGS[name])
    expected_loss, expected_gradient = new_loss_reference(name, inputs, SETTINGS[name])
    assert (loss.detach().double() - expected_loss).abs().max() <= 1e-6
    loss.sum().backward()
    assert (inputs["log_probs"].grad.double() - expected_gradient).abs().max() <= 1e-6
    assert all(value.ndim == 0 and not value.requires_grad for value in metrics.values())
    # The batch reaches the branches under test.
    if name == "gmpo":
        assert metrics["clip_fraction_low"] > 0 and metrics["clip_fraction_high"] > 0
    if name.startswith("dppo"):
        assert 0 < metrics["trust_region_masked_fraction"] < 1 and metrics["truncated_fraction"] > 0


def test_dppo_metrics_and_no_truncation_without_clip_ratio_c():
    inputs = probability_batch("dppo_tv", spread=1.0)
    settings = {**SETTINGS["dppo_tv"], "clip_ratio_c": None}
    loss, metrics = policy_loss("dppo_tv", **inputs, **settings)
    mask = inputs["response_mask"].bool()
    expected, _ = new_loss_reference("dppo_tv", inputs, {**settings, "clip_ratio_c": math.inf})
    assert (loss.detach().double() - expected).abs().max() <= 1e-6
    assert metrics["truncated_fraction"] == 0
    assert metrics["trust_region_masked_fraction"].item() == pytest.approx((loss.detach()[mask] == 0).double().mean().item(), abs=1e-6)


def test_gmpo_with_seq_mean_token_mean_is_verls_mean_over_responses():
    inputs = batch(spread=0.3, sequence_advantages=True)
    mask = inputs["response_mask"]
    loss, _ = policy_loss("gmpo", **inputs, **SETTINGS["gmpo"])
    aggregated = aggregate_loss(loss, mask, "seq-mean-token-mean", normalizer("seq-mean-token-mean", mask, HORIZON))
    expected, _ = new_loss_reference("gmpo", inputs, SETTINGS["gmpo"])
    per_response = [expected[i, 0].item() for i in range(len(LENGTHS))]
    assert aggregated.item() == pytest.approx(sum(per_response) / len(per_response), abs=1e-6)


@pytest.mark.parametrize("name", ["gpg", "sapo", "gmpo", "dppo_tv", "dppo_kl"])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "token-sum"])
def test_micro_batch_and_rank_splits_give_the_full_batch_gradient(name, mode):
    """Rows split over micro-batches / ranks, each cut to its own padded length, with the global
    normaliser: the summed gradient is the full batch's."""
    inputs = probability_batch(name, spread=0.5, sequence_advantages=name == "gmpo")

    def gradient(parts):
        return split_gradient(inputs, lambda part: policy_loss(name, **part, **SETTINGS[name])[0], parts, LENGTHS, mode, HORIZON)

    full = gradient([list(range(len(LENGTHS)))])
    assert full.abs().max() > 0
    for parts in ([[0, 1, 2], [3, 4, 5, 6, 7]], [[0], [1, 2, 3, 4], [5, 6], [7]]):
        assert (gradient(parts) - full).abs().max() <= 1e-6
