"""The client against two real hf engine servers: generation, weight updates over every transport,
memory release, typed errors, partial samples resumed across a weight update."""

from __future__ import annotations

import concurrent.futures
import time

import pytest
import torch
import transformers
from safetensors.torch import load_file

from megarl.config import resolve_model_path
from megarl.rollout import EngineGroup, EngineRequestError, SamplingParams
from megarl.rollout.embedded.weights import HFWeightMap
from megarl.rollout.sampling import WeightSegment
from megarl.weights.bucket import Bucket
from tests.workers.engine_weights import read_weights

pytestmark = pytest.mark.multirank

MODEL = resolve_model_path("bundled:tiny-moe")
BASE = load_file(MODEL / "model.safetensors")
LOGPROB_TOLERANCE = 1e-5
PROMPTS = [[5, 9, 13, 4], [7, 8], [20, 21, 22, 23, 24, 25, 26], [3, 30, 31], [44, 45, 46, 47, 48], [10, 11, 12]]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    with EngineGroup.launch(
        "hf", MODEL, num_engines=2, hf_threads=1, log_dir=tmp_path_factory.mktemp("engine-logs"),
        request_timeout_s=60, health_check_interval_s=30, startup_timeout_s=120,
    ) as group:
        yield group


def perturbed(seed: int) -> dict[str, torch.Tensor]:
    draw = torch.Generator().manual_seed(seed)
    return {name: tensor + 0.05 * torch.randn(tensor.shape, generator=draw) for name, tensor in BASE.items()}


def buckets(weights: dict[str, torch.Tensor], per_bucket: int = 16) -> list[Bucket]:
    named = sorted(weights.items())
    return [Bucket.from_named_tensors(named[start : start + per_bucket]) for start in range(0, len(named), per_bucket)]


def reference(weights: dict[str, torch.Tensor]):
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    weight_map = HFWeightMap(model)
    for name, tensor in weights.items():
        weight_map.load(name, tensor)
    return model


def teacher_forced(model, prompt, response, temperature):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].float() / (temperature or 1.0)
    return torch.log_softmax(logits[len(prompt) - 1 : -1], -1).gather(1, torch.tensor(response)[:, None])[:, 0]


def test_generate_spreads_prompts_and_returns_samples_prompt_major(engines):
    samples = engines.generate(PROMPTS, SamplingParams(max_new_tokens=10, n=3, seed=1))
    assert [(sample.prompt_index, sample.sample_index) for sample in samples] == [(p, s) for p in range(len(PROMPTS)) for s in range(3)]
    for sample in samples:
        assert len(sample.logprobs) == len(sample.response_ids) <= 10
        assert sample.finish_reason == ("stop" if sample.response_ids[-1] == 2 else "length")
    assert len({tuple(sample.response_ids) for sample in samples}) > len(PROMPTS)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_logprobs_equal_a_teacher_forced_forward(engines, temperature):
    engines.update_weights(buckets(BASE), version="base")
    model = reference(BASE)
    samples = engines.generate(PROMPTS, SamplingParams(max_new_tokens=12, n=2, temperature=temperature, seed=2))
    for sample in samples:
        expected = teacher_forced(model, PROMPTS[sample.prompt_index], sample.response_ids, temperature)
        assert torch.allclose(torch.tensor(sample.logprobs), expected, atol=LOGPROB_TOLERANCE, rtol=0)


def test_seeded_generation_is_reproducible_and_independent_of_the_batch(engines):
    sampling = SamplingParams(max_new_tokens=12, n=4, seed=5)
    first = engines.generate(PROMPTS, sampling)
    assert engines.generate(PROMPTS, sampling) == first
    fewer = engines.generate(PROMPTS[:3], sampling)
    assert [sample.response_ids for sample in fewer] == [sample.response_ids for sample in first[:12]]
    assert torch.allclose(torch.tensor([lp for s in fewer for lp in s.logprobs]), torch.tensor([lp for s in first[:12] for lp in s.logprobs]), atol=1e-6, rtol=0)
    other_seed = engines.generate(PROMPTS, SamplingParams(max_new_tokens=12, n=4, seed=6))
    assert [sample.response_ids for sample in other_seed] != [sample.response_ids for sample in first]


def test_batches_in_flight_together_return_the_samples_of_sequential_calls(engines):
    requests = [(PROMPTS, SamplingParams(max_new_tokens=12, n=3, seed=21)), (PROMPTS[2:], SamplingParams(max_new_tokens=12, n=2, seed=22))]
    sequential = [engines.generate(prompts, sampling) for prompts, sampling in requests]
    in_flight = {engines.submit_generate(prompts, sampling): index for index, (prompts, sampling) in enumerate(requests)}
    collected = {in_flight[future]: future.result() for future in concurrent.futures.as_completed(in_flight)}
    for index, expected in enumerate(sequential):
        samples = collected[index]
        assert [(s.prompt_index, s.sample_index, s.response_ids, s.finish_reason, s.weight_version) for s in samples] == [
            (s.prompt_index, s.sample_index, s.response_ids, s.finish_reason, s.weight_version) for s in expected
        ]
        # The engine may batch the two requests together: the log-probs agree as they do across batch sizes.
        assert torch.allclose(torch.tensor([lp for s in samples for lp in s.logprobs]), torch.tensor([lp for s in expected for lp in s.logprobs]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("transport", ["tensor", "nccl", "disk"])
def test_update_weights_over_each_transport(engines, transport):
    weights = perturbed(seed=len(transport))
    engines.weight_transport = transport
    engines.update_weights(buckets(weights), version=f"{transport}-1")
    assert engines.weight_version == f"{transport}-1"
    for engine_index in range(2):
        held = read_weights(engines, weights, engine_index)
        unequal = [name for name, tensor in weights.items() if not torch.equal(held[name], tensor)]
        assert not unequal, f"engine {engine_index} after the {transport} update: {unequal[:3]}"
    model = reference(weights)
    samples = engines.generate(PROMPTS, SamplingParams(max_new_tokens=10, temperature=0.0))
    for sample in samples:
        prompt = PROMPTS[sample.prompt_index]
        with torch.no_grad():
            greedy = model(torch.tensor([prompt + sample.response_ids])).logits[0, len(prompt) - 1 : -1].argmax(-1).tolist()
        assert sample.response_ids == greedy and sample.weight_version == f"{transport}-1"
        assert torch.allclose(torch.tensor(sample.logprobs), teacher_forced(model, prompt, sample.response_ids, 0.0), atol=LOGPROB_TOLERANCE, rtol=0)


def test_a_refused_update_names_the_engine_and_leaves_the_engines_usable(engines):
    engines.weight_transport = "tensor"
    bad = buckets({**BASE, "model.layers.0.mlp.experts.99.up_proj.weight": torch.zeros(2)})
    with pytest.raises(EngineRequestError, match=r"rollout engine hf-\d .*tensors the model does not have"):
        engines.update_weights(bad, version="bad")
    engines.update_weights(buckets(BASE), version="base-again")
    assert engines.generate(PROMPTS[:1], SamplingParams(max_new_tokens=3))[0].weight_version == "base-again"


def test_a_misshapen_tensor_refuses_the_whole_bucket(engines):
    engines.weight_transport = "tensor"
    name = "model.layers.0.self_attn.o_proj.weight"
    before = engines.read_weight(name)
    bad = Bucket.from_named_tensors([(name, BASE[name] + 1.0), ("model.norm.weight", torch.zeros(3))])
    with pytest.raises(EngineRequestError, match=r"hf-\d .*wrong shape, e.g. model.norm.weight: got \[3\].*nothing was loaded"):
        engines.update_weights([bad], version="misshapen")
    assert engines.read_weight(name) == before


def test_release_resume_flush_and_health(engines):
    engines.release_memory()
    with pytest.raises(EngineRequestError, match=r"hf-\d.*weights are released"):
        engines.generate(PROMPTS, SamplingParams(max_new_tokens=3))
    engines.resume_memory(["weights"])
    assert len(engines.generate(PROMPTS, SamplingParams(max_new_tokens=3))) == len(PROMPTS)
    with pytest.raises(EngineRequestError, match=r"hf-\d.*\['weights'\] are not released"):
        engines.resume_memory(["weights"])
    engines.resume_memory()  # what is still released: the KV cache and the CUDA graphs
    engines.resume_memory()  # nothing left: no request
    assert len(engines.generate(PROMPTS, SamplingParams(max_new_tokens=3))) == len(PROMPTS)
    engines.flush_cache()
    assert engines.health() == {"hf-0": True, "hf-1": True}


def test_a_prompt_beyond_the_context_is_refused_by_name(engines):
    with pytest.raises(EngineRequestError, match=r"rollout engine hf-0 .*HTTP 400.*context is 256"):
        engines.generate([[5] * 300], SamplingParams(max_new_tokens=3))


LONG = 200
"""Tokens a partial-rollout sample may generate: long enough to be paused mid-way."""


def test_a_sample_aborted_at_a_weight_update_resumes_under_the_new_weights(engines):
    engines.weight_transport = "tensor"
    engines.update_weights(buckets(BASE), version="1")
    prompts, sampling = PROMPTS[:2], SamplingParams(max_new_tokens=LONG, n=4, seed=31)
    start = time.monotonic()
    unpaused = engines.generate(prompts, sampling)
    took = time.monotonic() - start
    for fraction in (0.3, 0.15, 0.5):  # the pause has to land while some samples still generate
        pending = engines.submit_generate(prompts, sampling, partial=True)
        time.sleep(took * fraction)
        engines.pause_generation("abort")
        partials = pending.result()
        if any(sample.finish_reason == "abort" and sample.response_ids for sample in partials):
            break
        engines.continue_generation()
    stopped = [position for position, sample in enumerate(partials) if sample.finish_reason == "abort"]
    assert stopped, "every sample finished before the pause"
    for sample, whole in zip(partials, unpaused):
        generated = len(sample.response_ids)
        assert sample.response_ids == whole.response_ids[:generated]  # the same seeds drew the same tokens
        assert sample.weight_segments == (WeightSegment("1", 0, generated),)
        if sample.finish_reason != "abort":
            assert sample == whole

    new_weights = perturbed(seed=17)
    engines.update_weights(buckets(new_weights), version="2")
    engines.continue_generation()
    resumed = engines.submit_resume(prompts, partials, sampling).result()
    old_model, new_model = reference(BASE), reference(new_weights)
    for position, (before, after) in enumerate(zip(partials, resumed)):
        if position not in stopped:
            assert after == before
            continue
        cut = len(before.response_ids)
        assert (after.prompt_index, after.sample_index) == (before.prompt_index, before.sample_index)
        assert after.response_ids[:cut] == before.response_ids and after.logprobs[:cut] == before.logprobs
        assert cut < len(after.response_ids) <= LONG and after.finish_reason in ("stop", "length")
        assert after.weight_version == "2"
        assert after.weight_segments == ((WeightSegment("1", 0, cut),) if cut else ()) + (WeightSegment("2", cut, len(after.response_ids)),)
        # Each segment's log-probs are those of the weights that generated it.
        prompt = PROMPTS[after.prompt_index]
        expected = torch.cat([
            teacher_forced(old_model, prompt, after.response_ids, 1.0)[:cut],
            teacher_forced(new_model, prompt, after.response_ids, 1.0)[cut:],
        ])
        assert torch.allclose(torch.tensor(after.logprobs), expected, atol=LOGPROB_TOLERANCE, rtol=0)
