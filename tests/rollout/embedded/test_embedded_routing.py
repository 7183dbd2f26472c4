"""The hf engine's routed experts against a plain forward: for every sample of a batch (prompts of
different lengths, left-padded, n samples sharing a prefill), the experts its routers chose for
every token equal, as sets per token and layer, the top-k of one transformers forward over the
sample's prompt + response; also for a row aborted mid-way and after a dropped KV cache (retract),
whose recomputation routes every earlier token again under the weights of then."""

from __future__ import annotations

import pytest
import torch
import transformers

from megarl.config import resolve_model_path
from megarl.rollout.embedded.generate import BatchGenerator, Request
from megarl.rollout.embedded.routing import _GATE_NAME, RouterRecorder
from megarl.rollout.embedded.scheduler import ABORTED
from tests.hf_models import router_choices

pytestmark = pytest.mark.cpu

EOS = 2
MODELS = ["bundled:tiny-moe", "bundled:tiny-qwen2-moe", "bundled:tiny-deepseek-v3", "bundled:tiny-glm4-moe"]
"""Qwen3-MoE, Qwen2-MoE (shared expert), DeepSeek-V3 and GLM-4.5 (sigmoid routers, group-limited
top-k, first layer dense: its rows stay 0)."""


@pytest.fixture(scope="module", params=MODELS)
def recorded(request):
    """(model, its recorder): one recorder per model, as the engine holds it."""
    model = transformers.AutoModelForCausalLM.from_pretrained(resolve_model_path(request.param), dtype=torch.float32).eval()
    return model, RouterRecorder(model)


@pytest.fixture
def model(recorded):
    return recorded[0]


@pytest.fixture
def generator(recorded):
    model, recorder = recorded
    return BatchGenerator(model, context_length=model.config.max_position_embeddings, pad_token_id=0, random_seed=0, recorder=recorder)


def request(prompt, seed, max_new_tokens=10):
    return Request(input_ids=prompt, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0, top_k=-1, stop_token_ids=frozenset({EOS}), seed=seed)


def moe_layers(model) -> list[int]:
    return sorted(int(_GATE_NAME.search(name).group(1)) for name, _ in model.named_modules() if _GATE_NAME.search(name))


def assert_routes_equal(model, routes: torch.Tensor, tokens: list[int]):
    """``routes`` ``[len(tokens), layers, topk]`` equal a plain forward's choices, as sets, in every
    MoE layer, and are 0 in the dense layers."""
    expected = router_choices(model, tokens)
    assert routes.shape == (len(tokens), model.config.num_hidden_layers, model.config.num_experts_per_tok)
    for layer in range(model.config.num_hidden_layers):
        if layer not in expected:
            assert not routes[:, layer].any()
            continue
        got, want = routes[:, layer].sort(-1).values, expected[layer].sort(-1).values
        assert torch.equal(got, want.to(got.dtype)), f"layer {layer}: tokens {(got != want).any(-1).nonzero().flatten().tolist()} differ"


def test_every_sample_of_a_batch_has_the_routes_of_a_plain_forward(model, generator):
    prompts = [[5, 9, 13, 4], [7, 8], [20, 21, 22, 23, 24, 25, 26], [3, 30, 31]]
    # Two samples of each prompt (one shared prefill) and a lone copy of the first prompt.
    requests = [request(prompt, seed=10 * index + copy) for index, prompt in enumerate(prompts) for copy in range(2)] + [request(prompts[0], seed=99)]
    results = generator.generate(requests)
    for req, result in zip(requests, results):
        assert_routes_equal(model, result.routed_experts, req.input_ids + result.output_ids[:-1])
    assert len(moe_layers(model)) >= 2


def test_a_row_aborted_mid_way_has_the_routes_of_its_tokens_so_far(model, generator):
    requests = [request([5, 9, 13, 4], seed=1, max_new_tokens=12), request([7, 8, 40], seed=2, max_new_tokens=12)]

    def abort_row_one(decoding):
        if decoding.steps == 3:
            decoding.finish(1, dict(ABORTED))

    results = generator.generate(requests, on_step=abort_row_one)
    assert results[1].finish_reason["type"] == "abort" and len(results[1].output_ids) == 3
    for req, result in zip(requests, results):
        assert_routes_equal(model, result.routed_experts, req.input_ids + result.output_ids[:-1])


def test_a_dropped_cache_routes_every_token_again_under_the_new_weights(model, generator):
    """At step 4 the router weights change and the cache is dropped (SGLang's retract across a
    weight update): the recomputation routes prompt and tokens so far under the new weights, so a
    row still generating then has the new weights' routes throughout; a row finished before keeps
    the old weights' routes."""
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    requests = [request([5, 9, 13, 4], seed=3, max_new_tokens=16), request([7, 8], seed=4, max_new_tokens=2)]
    gates = [module for name, module in model.named_modules() if _GATE_NAME.search(name)]

    def update_and_retract(decoding):
        if decoding.steps == 4:
            with torch.no_grad():
                draw = torch.Generator().manual_seed(5)
                for gate in gates:
                    gate.weight.add_(torch.randn(gate.weight.shape, generator=draw))
            decoding.drop_cache()

    try:
        results = generator.generate(requests, on_step=update_and_retract)
        assert len(results[0].output_ids) > 4 and len(results[1].output_ids) == 2
        assert_routes_equal(model, results[0].routed_experts, requests[0].input_ids + results[0].output_ids[:-1])
        model.load_state_dict(before)
        assert_routes_equal(model, results[1].routed_experts, requests[1].input_ids + results[1].output_ids[:-1])
    finally:
        model.load_state_dict(before)


def test_a_dense_model_has_no_router_to_record():
    dense = transformers.AutoModelForCausalLM.from_pretrained(resolve_model_path("bundled:tiny-dense"), dtype=torch.float32)
    with pytest.raises(ValueError, match="no MoE router.*without --enable-return-routed-experts"):
        RouterRecorder(dense)
