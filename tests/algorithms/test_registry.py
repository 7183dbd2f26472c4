"""The registry: names and aliases, errors that list the valid names, calls with a superset of inputs."""

from __future__ import annotations

import pytest

from megarl.algorithms.advantages import ADVANTAGES
from megarl.algorithms.kl import KL_ESTIMATORS
from megarl.algorithms.policy_losses import POLICY_LOSSES
from megarl.algorithms.registry import Registry

pytestmark = pytest.mark.cpu


def small_registry() -> Registry:
    registry = Registry("thing")

    @registry.register("double", "twice")
    def double(x, *, scale=1):
        return 2 * x * scale

    @registry.register("shift")
    def shift(x, offset):
        return x + offset

    return registry


def test_aliases_and_names():
    registry = small_registry()
    assert registry.get("double") is registry.get("twice")
    assert registry.names() == ["double", "shift", "twice"]


def test_duplicate_name_is_refused():
    registry = small_registry()
    with pytest.raises(ValueError, match="thing 'shift' is already registered"):
        registry.register("shift")(lambda x: x)


@pytest.mark.parametrize(
    "registry,expected",
    [
        (ADVANTAGES, "gae, gpg, grpo, grpo_passk, opo, optimal_token_baseline, reinforce_pp, reinforce_pp_baseline, remax, rloo"),
        (POLICY_LOSSES, "cispo, clip_cov, dppo_kl, dppo_tv, gmpo, gpg, gspo, kl_cov, ppo, sapo"),
        (KL_ESTIMATORS, "abs, k1, k2, k3, low_var_kl, mse"),
    ],
)
def test_unknown_name_lists_the_valid_ones(registry, expected):
    with pytest.raises(KeyError, match=f"unknown {registry.kind} 'nope'; choose one of {expected}"):
        registry.get("nope")


def test_call_passes_only_the_declared_inputs():
    registry = small_registry()
    assert registry.call("double", x=3, offset=100) == 6
    assert registry.call("shift", x=3, offset=1, scale=5) == 4


def test_takes_tells_the_declared_inputs():
    registry = small_registry()
    assert registry.takes("twice", "scale") and registry.takes("shift", "offset")
    assert not registry.takes("double", "offset")
    assert ADVANTAGES.takes("optimal_token_baseline", "sum_pi_squared") and not ADVANTAGES.takes("grpo", "sum_pi_squared")
    with pytest.raises(KeyError, match="unknown thing 'nope'"):
        registry.takes("nope", "x")


def test_call_refuses_an_input_no_function_takes():
    with pytest.raises(TypeError, match="no thing takes ofset; known inputs: offset, scale, x"):
        small_registry().call("shift", x=3, ofset=1)


@pytest.mark.parametrize("inputs", [{"x": 3}, {"x": 3, "offset": None}])
def test_call_refuses_a_missing_required_input(inputs):
    with pytest.raises(TypeError, match="thing 'shift' needs offset"):
        small_registry().call("shift", **inputs)


def test_variadic_functions_are_refused():
    with pytest.raises(TypeError, match="thing loose must name its inputs, not take kwargs"):

        @small_registry().register("loose")
        def loose(x, **kwargs):
            return x


def test_temporarily_registers_for_the_block_only():
    registry = small_registry()
    with pytest.raises(RuntimeError, match="inside"):
        with registry.temporarily("triple", lambda x: 3 * x):
            assert registry.call("triple", x=2) == 6
            raise RuntimeError("inside")
    assert registry.names() == ["double", "shift", "twice"]
    with pytest.raises(ValueError, match="thing 'shift' is already registered"):
        with registry.temporarily("shift", lambda x: x):
            pass
    assert registry.call("shift", x=3, offset=1) == 4
