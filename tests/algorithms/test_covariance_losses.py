"""Clip-Cov and KL-Cov against naive per-token loops: the selection (seeded for Clip-Cov), values,
gradients and metrics; padding never matters; the micro-batch splits where the loss is exact;
their config fields."""

from __future__ import annotations

import math

import pytest
import torch
from algorithm_batches import assert_matches_reference, response_mask, split_gradient, valid_cells

from megarl.algorithms.policy_losses import LOG_RATIO_LIMIT, policy_loss
from megarl.config import ConfigError, load_config

pytestmark = pytest.mark.cpu

LENGTHS = (4, 1, 7, 6, 5, 7, 2, 6, 3, 7)
HORIZON = 7
CLIP_COV = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_cov_ratio=0.1, clip_cov_lb=0.0, clip_cov_ub=1.5, seed=11)
KL_COV = dict(kl_cov_ratio=0.1, ppo_kl_coef=0.5)
SETTINGS = {"clip_cov": CLIP_COV, "kl_cov": KL_COV}


def batch(seed=0, spread=0.5):
    generator = torch.Generator().manual_seed(seed)
    shape = (len(LENGTHS), HORIZON)
    old = -3 * torch.rand(shape, generator=generator)
    new = old + spread * torch.randn(shape, generator=generator)
    advantages = torch.randn(shape, generator=generator)
    mask = response_mask(LENGTHS, HORIZON)
    return dict(log_probs=new.requires_grad_(), old_log_probs=old, advantages=advantages, response_mask=mask)


def reference(name, inputs, settings):
    """Per-token losses, gradients w.r.t. log_probs, the selected cells and the metrics, token by token."""
    log_probs, old, advantages = (inputs[k].detach().double().tolist() for k in ("log_probs", "old_log_probs", "advantages"))
    cells = list(valid_cells(inputs["response_mask"]))
    count = len(cells)
    mean_advantage = sum(advantages[i][t] for i, t in cells) / count
    mean_log_prob = sum(log_probs[i][t] for i, t in cells) / count
    cov = {(i, t): (advantages[i][t] - mean_advantage) * (log_probs[i][t] - mean_log_prob) for i, t in cells}
    ratio = {(i, t): math.exp(min(max(log_probs[i][t] - old[i][t], -LOG_RATIO_LIMIT), LOG_RATIO_LIMIT)) for i, t in cells}
    losses, gradients, held_low, held_high = {}, {}, {}, {}
    if name == "clip_cov":
        low, high = settings["clip_ratio_low"], settings["clip_ratio_high"]
        for i, t in cells:
            a, r = advantages[i][t], ratio[i, t]
            unclipped, clipped = -a * r, -a * min(max(r, 1 - low), 1 + high)
            losses[i, t] = max(unclipped, clipped)
            gradients[i, t] = 0.0 if clipped > unclipped else -a * r
            held_low[i, t], held_high[i, t] = clipped > unclipped and a < 0, clipped > unclipped and a > 0
        # The j-th valid token, row by row, has the j-th draw of the seeded generator.
        draws = torch.rand(count, generator=torch.Generator().manual_seed(settings["seed"]), dtype=torch.float64).tolist()
        priority = dict(zip(cells, draws))
        lb, ub = settings["clip_cov_lb"], settings["clip_cov_ub"]
        candidates = [cell for cell in cells if not (held_low[cell] or held_high[cell]) and lb < cov[cell] < ub]
        k = max(int(settings["clip_cov_ratio"] * count), 1)
        selected = set(sorted(candidates, key=priority.get)[:k])
        for cell in selected:
            losses[cell], gradients[cell] = 0.0, 0.0
    else:
        k = max(int(settings["kl_cov_ratio"] * count), 1)
        selected = set(sorted(cells, key=cov.get, reverse=True)[:k])
        candidates = cells
        coefficient = settings["ppo_kl_coef"]
        for i, t in cells:
            a, r, d = advantages[i][t], ratio[i, t], log_probs[i][t] - old[i][t]
            penalty, slope = (coefficient * abs(d), coefficient * math.copysign(1.0, d)) if (i, t) in selected else (0.0, 0.0)
            losses[i, t], gradients[i, t] = -a * r + penalty, -a * r + slope
    metrics = {
        "cov_selected_fraction": len(selected) / count,
        "approx_kl": sum(r - 1 - math.log(r) for r in ratio.values()) / count,
        "ratio_mean": sum(ratio.values()) / count,
    }
    if name == "clip_cov":
        metrics["clip_fraction_low"] = sum(held_low.values()) / count
        metrics["clip_fraction_high"] = sum(held_high.values()) / count
    return as_tensor(losses), as_tensor(gradients), selected, candidates, metrics


def as_tensor(cells: dict) -> torch.Tensor:
    out = torch.zeros(len(LENGTHS), HORIZON, dtype=torch.float64)
    for (i, t), value in cells.items():
        out[i, t] = value
    return out


def cells_of(selected: torch.Tensor) -> set:
    return {tuple(cell) for cell in selected.nonzero().tolist()}


@pytest.mark.parametrize("name", ["clip_cov", "kl_cov"])
def test_loss_gradient_selection_and_metrics_match_loop(name):
    inputs = batch()
    loss, metrics = policy_loss(name, **inputs, **SETTINGS[name])
    expected_loss, expected_gradient, selected, candidates, expected_metrics = reference(name, inputs, SETTINGS[name])
    assert_matches_reference(loss, metrics, inputs, expected_loss, expected_gradient, expected_metrics)
    # The batch reaches the branches under test: several tokens selected, among more candidates.
    assert 1 < len(selected) < len(candidates)
    if name == "clip_cov":
        assert metrics["clip_fraction_low"] > 0 and metrics["clip_fraction_high"] > 0


def test_clip_cov_draw_is_seeded():
    inputs = batch()
    draws = {}
    for seed in range(6):
        loss, _ = policy_loss("clip_cov", **inputs, **{**CLIP_COV, "seed": seed})
        again, _ = policy_loss("clip_cov", **inputs, **{**CLIP_COV, "seed": seed})
        assert torch.equal(loss, again)
        draws[seed] = frozenset(reference("clip_cov", inputs, {**CLIP_COV, "seed": seed})[2])
        assert cells_of((loss == 0) & inputs["response_mask"].bool()) >= draws[seed]
    assert len(set(draws.values())) > 1


def padded(inputs: dict, left: int, right: int) -> dict:
    """``inputs`` with ``left`` masked columns before every row, ``right`` after, a masked row after
    every row, and garbage in every masked position: the valid tokens keep their order."""
    rows, width = len(LENGTHS), left + HORIZON + right
    mask = torch.zeros(2 * rows, width)
    mask[::2, left : left + HORIZON] = inputs["response_mask"]
    wide = {"response_mask": mask}
    for seed, key in enumerate(("log_probs", "old_log_probs", "advantages")):
        garbage = 1e3 * torch.randn(2 * rows, width, generator=torch.Generator().manual_seed(seed))
        grid = garbage.clone()
        grid[::2, left : left + HORIZON] = inputs[key].detach()
        wide[key] = torch.where(mask.bool(), grid, garbage)
    wide["log_probs"].requires_grad_()
    return wide


@pytest.mark.parametrize("name", ["clip_cov", "kl_cov"])
def test_padding_around_a_token_changes_nothing(name):
    inputs = batch()
    loss, metrics = policy_loss(name, **inputs, **SETTINGS[name])
    loss.sum().backward()
    wide = padded(inputs, left=2, right=3)
    wide_loss, wide_metrics = policy_loss(name, **wide, **SETTINGS[name])
    wide_loss.sum().backward()
    valid = wide["response_mask"].bool()
    assert torch.allclose(wide_loss[valid], loss[inputs["response_mask"].bool()], atol=1e-6, rtol=0)
    assert torch.allclose(wide["log_probs"].grad[valid], inputs["log_probs"].grad[inputs["response_mask"].bool()], atol=1e-6, rtol=0)
    assert (wide_loss[~valid] == 0).all() and (wide["log_probs"].grad[~valid] == 0).all()
    for key, value in metrics.items():
        assert wide_metrics[key].item() == pytest.approx(value.item(), abs=1e-6), key
    assert metrics["cov_selected_fraction"] > 0


def test_clip_cov_zeroes_the_selected_tokens_and_is_ppo_elsewhere():
    inputs = batch()
    loss, _ = policy_loss("clip_cov", **inputs, **CLIP_COV)
    loss.sum().backward()
    gradient = inputs["log_probs"].grad.clone()
    inputs["log_probs"].grad = None
    ppo, _ = policy_loss("ppo", **inputs, clip_ratio_low=CLIP_COV["clip_ratio_low"], clip_ratio_high=CLIP_COV["clip_ratio_high"])
    ppo.sum().backward()
    selected = torch.zeros_like(gradient, dtype=torch.bool)
    for cell in reference("clip_cov", inputs, CLIP_COV)[2]:
        selected[cell] = True
    assert torch.equal(loss[~selected], ppo[~selected]) and torch.equal(gradient[~selected], inputs["log_probs"].grad[~selected])
    # The rule takes the gradient of tokens PPO trains on.
    assert (loss[selected] == 0).all() and (gradient[selected] == 0).all() and (inputs["log_probs"].grad[selected] != 0).all()


def test_kl_cov_adds_the_penalty_on_the_top_covariance_tokens_only():
    inputs = batch()
    loss, _ = policy_loss("kl_cov", **inputs, **KL_COV)
    loss.sum().backward()
    gradient = inputs["log_probs"].grad.clone()
    inputs["log_probs"].grad = None
    plain, _ = policy_loss("kl_cov", **inputs, **{**KL_COV, "ppo_kl_coef": 0.0})
    plain.sum().backward()
    mask = inputs["response_mask"].bool()
    # Without the penalty, -A r with no clip: the unbounded PPO surrogate.
    unclipped, _ = policy_loss("ppo", **inputs, clip_ratio_low=0.999999, clip_ratio_high=1e9)
    assert torch.allclose(plain, unclipped)
    selected = torch.zeros_like(mask)
    for cell in reference("kl_cov", inputs, KL_COV)[2]:
        selected[cell] = True
    log_ratio = (inputs["log_probs"] - inputs["old_log_probs"]).detach()
    assert torch.allclose(loss - plain, torch.where(selected, KL_COV["ppo_kl_coef"] * log_ratio.abs(), 0.0))
    assert torch.allclose(gradient - inputs["log_probs"].grad, torch.where(selected, KL_COV["ppo_kl_coef"] * log_ratio.sign(), 0.0))
    assert 1 < selected.sum() < mask.sum()


def split_gradients(name, inputs, settings, mode="token-mean"):
    """The gradient of the batch's loss in one micro-batch, then in two splits of its rows (each cut
    to its own padded length), with the whole batch's normaliser."""

    def gradient(parts):
        return split_gradient(inputs, lambda part: policy_loss(name, **part, **settings)[0], parts, LENGTHS, mode, HORIZON)

    rows = list(range(len(LENGTHS)))
    return gradient([rows]), [gradient(parts) for parts in ([rows[:3], rows[3:]], [[0], rows[1:5], rows[5:8], rows[8:]])]


def centred_batch():
    """``batch`` whose rows' valid advantages have mean 0 and valid log-probs mean -1: every set of
    rows has the batch's means, so every split computes the same covariances."""
    inputs = batch()
    mask = inputs["response_mask"].bool()
    lengths = mask.sum(-1, keepdim=True)
    log_probs = inputs["log_probs"].detach()
    row_mean = torch.where(mask, log_probs, 0.0).sum(-1, keepdim=True) / lengths
    advantage_mean = torch.where(mask, inputs["advantages"], 0.0).sum(-1, keepdim=True) / lengths
    inputs["old_log_probs"] = inputs["old_log_probs"] - row_mean - 1
    inputs["log_probs"] = (log_probs - row_mean - 1).requires_grad_()
    inputs["advantages"] = inputs["advantages"] - advantage_mean
    return inputs


@pytest.mark.parametrize(
    "name,settings,make",
    [
        ("clip_cov", {**CLIP_COV, "clip_cov_lb": 1e3, "clip_cov_ub": 1e4}, batch),  # bounds no covariance reaches: no token selected
        ("clip_cov", {**CLIP_COV, "clip_cov_ratio": 1.0}, centred_batch),  # every candidate, and the same candidates in every split
        ("kl_cov", {**KL_COV, "kl_cov_ratio": 1.0}, batch),  # every token penalised
        ("kl_cov", {**KL_COV, "ppo_kl_coef": 0.0}, batch),  # no penalty
    ],
)
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_micro_batch_splits_give_the_full_gradient_where_the_selection_cannot_differ(name, settings, make, mode):
    full, splits = split_gradients(name, make(), settings, mode)
    assert full.abs().max() > 0
    for split in splits:
        assert (split - full).abs().max() <= 1e-6


@pytest.mark.parametrize("name", ["clip_cov", "kl_cov"])
def test_micro_batch_splits_change_the_selection_in_general(name):
    """k and the covariance's means are the micro-batch's, as in verl: a split selects otherwise."""
    full, splits = split_gradients(name, batch(), SETTINGS[name])
    assert all((split - full).abs().max() > 1e-3 for split in splits)


@pytest.mark.parametrize("name", ["clip_cov", "kl_cov"])
def test_no_valid_token_gives_zero_loss_and_finite_metrics(name):
    inputs = {**batch(), "response_mask": torch.zeros(len(LENGTHS), HORIZON)}
    loss, metrics = policy_loss(name, **inputs, **SETTINGS[name])
    assert (loss == 0).all() and all(torch.isfinite(value) for value in metrics.values())


def test_clip_cov_refuses_a_dual_clip():
    with pytest.raises(ValueError, match="clip_cov has no dual clip"):
        policy_loss("clip_cov", **batch(), **CLIP_COV, clip_ratio_c=3.0)


@pytest.mark.parametrize("name", ["clip_cov", "kl_cov"])
def test_metric_names_are_those_of_every_input(name):
    from megarl.trainer.policy import metric_names  # lazily: it imports Megatron (tests/kernels/conftest.py)

    algorithm = load_config(None, [f"algorithm.policy_loss={name}"]).algorithm
    _, metrics = policy_loss(name, **batch(), **SETTINGS[name])
    assert metric_names(algorithm) == (*metrics, "entropy", "kl_loss")
    assert "cov_selected_fraction" in metrics


def test_config_defaults_are_verls():
    algorithm = load_config(None, []).algorithm
    defaults = {name: getattr(algorithm, name) for name in ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio", "ppo_kl_coef")}
    assert defaults == dict(clip_cov_ratio=0.0002, clip_cov_lb=1.0, clip_cov_ub=5.0, kl_cov_ratio=0.0002, ppo_kl_coef=0.1)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["algorithm.policy_loss=clip_cov", "algorithm.clip_ratio_c=3"], "`algorithm.clip_ratio_c` (3.0) must be null with algorithm.policy_loss = clip_cov (Clip-Cov has no dual clip)"),
        (["algorithm.policy_loss=kl_cov", "algorithm.clip_ratio_c=3"], "`algorithm.clip_ratio_c` (3.0) must be null with algorithm.policy_loss = kl_cov (KL-Cov has no clip)"),
        (["algorithm.clip_cov_lb=5", "algorithm.clip_cov_ub=2"], "`algorithm.clip_cov_lb` (5.0) must be < clip_cov_ub (2.0): no covariance would lie between them"),
        (["algorithm.clip_cov_ratio=0"], "`algorithm.clip_cov_ratio` (0.0) must be in (0, 1]"),
        (["algorithm.kl_cov_ratio=1.5"], "`algorithm.kl_cov_ratio` (1.5) must be in (0, 1]"),
        (["algorithm.ppo_kl_coef=-0.1"], "`algorithm.ppo_kl_coef` (-0.1) must be >= 0"),
    ],
)
def test_config_refuses_settings_without_meaning(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert str(error.value).endswith(message)
    assert "\n" not in str(error.value)
