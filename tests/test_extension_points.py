"""The four extension points, each shown with a trivial addition made here in the test (no product
file added or edited for it): a policy loss, an advantage estimator, a model family and a config
section. Each test's docstring counts the product files a real addition touches.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Literal

import pytest
import torch

from megarl.algorithms.advantages import ADVANTAGES, compute_advantages
from megarl.algorithms.policy_losses import POLICY_LOSSES, policy_loss
from megarl.config import Config, ConfigError, Range, Section, load_config, save_config
from megarl.models import families
from megarl.models.families import checked_family, family_of
from megarl.models.family import UnsupportedModel
from megarl.models.llama import LLAMA
from megarl.preflight import check_run
from megarl.trainer.policy import metric_names
from tests.distributed import REPO
from tests.hf_models import CONFIGS

pytestmark = pytest.mark.cpu

MOE_GRPO = REPO / "configs" / "moe_grpo.yaml"

# Two responses of three tokens, the second one token shorter.
RESPONSE_MASK = torch.tensor([[True, True, True], [True, True, False]])
SCORES = torch.tensor([1.0, -0.5])


def checked(tmp_path: Path, *overrides: str) -> list[str]:
    """The full check of a run on configs/moe_grpo.yaml with ``overrides``: load (keys, types,
    ranges), then the preflight (validate against the model and world size 2, the files, and
    last the registered names). Empty: the run can start."""
    return check_run(load_config(MOE_GRPO, [f"logging.run_dir={tmp_path / 'run'}", *overrides]), 2)


def plain_reinforce(log_probs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor):
    """REINFORCE without a ratio or a clip: l_t = -A_t log pi_t on valid tokens."""
    mask = response_mask.bool()
    loss = torch.where(mask, -advantages * log_probs, 0.0)
    return loss, {"log_prob_mean": (log_probs.detach() * mask).sum() / mask.sum()}


def test_a_new_policy_loss_is_one_decorated_function(tmp_path):
    """A new policy loss: 1 product file, a function decorated with ``@register_policy_loss(name)``
    in megarl/algorithms/policy_losses.py, + its tests. The config takes the name as it is
    (``algorithm.policy_loss`` is a string) and the preflight checks it against the registry; the
    trainer calls it by name with every input it has, and the loss receives those it declares.
    """
    assert checked(tmp_path, "algorithm.policy_loss=plain_reinforce")[0].startswith(
        "`algorithm.policy_loss` = 'plain_reinforce' is not a registered policy loss"
    )
    with POLICY_LOSSES.temporarily("plain_reinforce", plain_reinforce):
        assert checked(tmp_path, "algorithm.policy_loss=plain_reinforce") == []
        algorithm = load_config(MOE_GRPO, ["algorithm.policy_loss=plain_reinforce"]).algorithm
        log_probs = torch.tensor([[-0.5, -1.0, -2.0], [-0.1, -0.2, -9.0]], requires_grad=True)
        advantages = SCORES[:, None].expand(2, 3)
        # The inputs megarl/trainer/policy.py passes.
        per_token, metrics = policy_loss(
            algorithm.policy_loss,
            log_probs=log_probs,
            old_log_probs=log_probs.detach() - 0.1,
            advantages=advantages,
            response_mask=RESPONSE_MASK,
            clip_ratio_low=algorithm.clip_ratio_low,
            clip_ratio_high=algorithm.clip_ratio_high,
            clip_ratio_c=algorithm.clip_ratio_c,
        )
        expected = torch.tensor([[0.5, 1.0, 2.0], [-0.05, -0.1, 0.0]])
        torch.testing.assert_close(per_token, expected)
        per_token.sum().backward()
        torch.testing.assert_close(log_probs.grad, torch.where(RESPONSE_MASK, -advantages, 0.0))
        torch.testing.assert_close(metrics["log_prob_mean"], torch.tensor(-3.8 / 5))
        # The policy's update reports the loss's own metrics (the model sums them by these names).
        assert metric_names(algorithm) == ("log_prob_mean", "entropy", "kl_loss")
    assert metric_names(load_config(MOE_GRPO, []).algorithm) == (
        "clip_fraction_low", "clip_fraction_high", "dual_clip_fraction", "approx_kl", "ratio_mean", "entropy", "kl_loss"
    )
    assert "plain_reinforce" not in POLICY_LOSSES.names()


def score_everywhere(scores: torch.Tensor, response_mask: torch.Tensor):
    """No baseline: A_t = the response's score on each of its valid tokens; returns = advantages."""
    advantages = torch.where(response_mask.bool(), scores[:, None].float(), 0.0)
    return advantages, advantages


def test_a_new_advantage_estimator_is_one_decorated_function(tmp_path):
    """A new advantage estimator: 1 product file, a function decorated with
    ``@register_advantage(name)`` in megarl/algorithms/advantages.py, + its tests. One that needs a
    critic's values also edits ``Config.critic_enabled`` (megarl/config/root.py, which names gae),
    and one that compares the samples of a prompt may add its name to the check that a group holds
    at least 2 (megarl/config/checks.py): the config cannot ask the torch registry whether it does.
    """
    with ADVANTAGES.temporarily("score_everywhere", score_everywhere):
        assert checked(tmp_path, "algorithm.advantage_estimator=score_everywhere") == []
        config = load_config(MOE_GRPO, ["algorithm.advantage_estimator=score_everywhere"])
        assert not config.critic_enabled
        algorithm = config.algorithm
        token_rewards = torch.zeros(2, 3)
        token_rewards[0, 2], token_rewards[1, 1] = SCORES
        # The inputs megarl/trainer/experience.py passes.
        advantages, returns = compute_advantages(
            algorithm.advantage_estimator,
            scores=token_rewards.sum(-1),
            token_rewards=token_rewards,
            values=None,
            response_mask=RESPONSE_MASK,
            group_ids=torch.tensor([0, 0]),
            gamma=algorithm.gamma,
            lam=algorithm.lam,
            norm_by_std=algorithm.norm_adv_by_std,
        )
        torch.testing.assert_close(advantages, torch.tensor([[1.0, 1.0, 1.0], [-0.5, -0.5, 0.0]]))
        assert torch.equal(returns, advantages)
    assert "score_everywhere" not in ADVANTAGES.names()
    assert checked(tmp_path, "algorithm.advantage_estimator=score_everywhere") != []


TOY = dataclasses.replace(LLAMA, name="toy_decoder", architectures=("ToyDecoderForCausalLM",))
"""A made-up architecture computed as Llama is (the shared decoder helpers serve it)."""


def toy_config(**options):
    config = CONFIGS["llama"]()
    config.architectures = ["ToyDecoderForCausalLM"]
    for key, value in options.items():
        setattr(config, key, value)
    return config


def test_a_new_model_family_is_one_row_of_the_table(monkeypatch):
    """A new model family: its :class:`~megarl.models.family.ModelFamily` (in its own module,
    megarl/models/<name>.py, when it needs functions of its own; else beside a relative, as Qwen2
    sits in llama.py) and 1 row of ``FAMILIES`` in megarl/models/families.py, + its tests. The
    lookups, the option checks, the weight mapping and the builder read the family from the table.
    """
    with pytest.raises(UnsupportedModel, match="no megarl model family serves architectures \\['ToyDecoderForCausalLM'\\]"):
        family_of(toy_config())
    monkeypatch.setattr(families, "FAMILIES", (*families.FAMILIES, TOY))
    assert family_of(toy_config()) is TOY and checked_family(toy_config()) is TOY
    assert TOY.config_fields(toy_config())["num_layers"] == 2
    assert "embedding.word_embeddings.weight" in {rule.megatron for rule in TOY.weight_rules(toy_config())}
    with pytest.raises(UnsupportedModel, match="hidden_act = 'gelu' is not supported by megarl's toy_decoder family"):
        checked_family(toy_config(hidden_act="gelu"))
    # The table serves each architecture once: a second row for it is refused at the first lookup.
    monkeypatch.setattr(families, "FAMILIES", (*families.FAMILIES, dataclasses.replace(TOY, name="toy_again")))
    with pytest.raises(ValueError, match="architecture ToyDecoderForCausalLM is served by both toy_decoder and toy_again"):
        family_of(toy_config())


@dataclasses.dataclass(kw_only=True, slots=True)
class CurriculumConfig(Section):
    """A made-up section: which prompts a curriculum keeps."""

    keep: Annotated[int, Range(ge=1)] = 4
    """Prompts kept per round, >= 1."""
    temperature: Annotated[float, Range(gt=0)] = 1.0
    """Sampling temperature over prompt difficulty, > 0."""
    order: Literal["easiest", "hardest"] = "easiest"
    """Which prompts come first."""


@dataclasses.dataclass(kw_only=True, slots=True)
class CurriculumRunConfig(Config):
    """The whole config with one more section."""

    curriculum: CurriculumConfig = dataclasses.field(default_factory=CurriculumConfig)
    """The made-up section."""


def test_a_new_config_section_is_one_file_and_one_field(tmp_path):
    """A new config section: 1 new product file, megarl/config/<name>.py (a ``Section`` with its
    fields, their ``Range`` bounds and its ``_rule_problems``), and 1 row, its field in ``Config``
    (megarl/config/root.py), + its tests; by the house habit its class is also exported from
    megarl/config/__init__.py. The loader, the key suggestions, the error wording, ``--print`` and
    saving need no change: the test loads its section through the real loader with a subclass of
    ``Config`` as the root.
    """
    path = tmp_path / "run.yaml"
    path.write_text("curriculum:\n  keep: 8\n  order: hardest\ntrain:\n  steps: 3\n")
    config = load_config(path, ["curriculum.temperature=5e-1"], root=CurriculumRunConfig)
    assert config.curriculum == CurriculumConfig(keep=8, temperature=0.5, order="hardest")
    assert config.train.steps == 3 and config.algorithm == load_config(None).algorithm
    saved = tmp_path / "saved.yaml"
    save_config(config, saved)
    assert load_config(saved, root=CurriculumRunConfig) == config

    path.write_text("curriculum:\n  kep: 8\n  temperature: 0\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, ["curriculum.keep=0", "curriculum.order=random", "curriculum.keep=many"], root=CurriculumRunConfig)
    assert str(error.value).splitlines() == [
        f"{path}: unknown key `curriculum.kep` — did you mean `curriculum.keep`?",
        "override `curriculum.order=random`: `curriculum.order` = 'random' must be one of 'easiest', 'hardest'",
        "override `curriculum.keep=many`: `curriculum.keep` = 'many' must be an integer",
        "override `curriculum.keep=0`: `curriculum.keep` (0) must be >= 1",
        f"{path}: `curriculum.temperature` (0.0) must be > 0",
    ]
    # The product's own Config has no such section.
    with pytest.raises(ConfigError, match="unknown key `curriculum.keep`"):
        load_config(None, ["curriculum.keep=8"])
