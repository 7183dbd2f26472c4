"""The hf engine's batched generation in one process: log-probs against a teacher-forced forward,
independence from the batch, seeds, stop tokens and limits, top-k, and the per-step hook
(finishing a row early, dropping the KV cache)."""

from __future__ import annotations

import pytest
import torch
import transformers

from megarl.config import resolve_model_path
from megarl.rollout.embedded.generate import BatchGenerator, Request

pytestmark = pytest.mark.cpu

MOE = resolve_model_path("bundled:tiny-moe")
EOS = 2
LOGPROB_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def moe():
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_pretrained(MOE, dtype=torch.float32).eval()


def request(prompt, **overrides):
    fields = dict(input_ids=prompt, max_new_tokens=12, temperature=1.0, top_p=1.0, top_k=-1, stop_token_ids=frozenset({EOS}), seed=7)
    return Request(**{**fields, **overrides})


def generator(model, seed=0):
    return BatchGenerator(model, context_length=model.config.max_position_embeddings, pad_token_id=0, random_seed=seed)


def prompts(count, seed=0):
    draw = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 52, (int(torch.randint(2, 14, (1,), generator=draw)),), generator=draw).tolist() for _ in range(count)]


def teacher_forced_logprobs(model, prompt, response, temperature):
    """``[len(response)]`` log-probs of ``response`` from one forward over prompt + response."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].float()
    logits = logits / (temperature if temperature > 0 else 1.0)
    logprobs = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return logprobs.gather(1, torch.tensor(response)[:, None])[:, 0]


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_logprobs_equal_a_teacher_forced_forward(moe, temperature):
    batch = prompts(12)
    results = generator(moe).generate([request(prompt, temperature=temperature, seed=index) for index, prompt in enumerate(batch)])
    for prompt, result in zip(batch, results):
        expected = teacher_forced_logprobs(moe, prompt, result.output_ids, temperature)
        assert torch.allclose(torch.tensor(result.logprobs), expected, atol=LOGPROB_TOLERANCE, rtol=0)
    if temperature == 0:
        for prompt, result in zip(batch, results):
            with torch.no_grad():
                logits = moe(torch.tensor([prompt + result.output_ids])).logits[0, len(prompt) - 1 : -1]
            assert result.output_ids == logits.argmax(-1).tolist()


def test_a_sample_does_not_depend_on_its_batch(moe):
    alone = generator(moe).generate([request([5, 9, 13, 4], seed=42)])[0]
    crowd = [request(prompt, seed=index) for index, prompt in enumerate(prompts(9, seed=3))]
    batched = generator(moe).generate(crowd[:4] + [request([5, 9, 13, 4], seed=42)] + crowd[4:])[4]
    assert batched.output_ids == alone.output_ids
    assert torch.allclose(torch.tensor(batched.logprobs), torch.tensor(alone.logprobs), atol=1e-6, rtol=0)


def test_the_samples_of_a_prompt_share_its_prefill_and_draw_as_if_alone(moe):
    # 3 prompts x 4 samples, interleaved with a prompt of its own; with the teacher-forced
    # log-probs below this also covers the cache rows the shared prefill repeats.
    shared = prompts(3, seed=5)
    batch = [request(prompt, seed=10 * index + sample) for sample in range(4) for index, prompt in enumerate(shared)]
    batch.insert(5, request([7, 8, 9], seed=99))
    prefill_rows = []
    hook = moe.register_forward_pre_hook(lambda module, args, kwargs: prefill_rows.append(kwargs["input_ids"].shape), with_kwargs=True)
    try:
        results = generator(moe).generate(batch)
    finally:
        hook.remove()
    assert prefill_rows[0][0] == 4 and all(shape == (len(batch), 1) for shape in prefill_rows[1:])
    for item, result in zip(batch, results):
        alone = generator(moe).generate([item])[0]
        assert result.output_ids == alone.output_ids
        assert torch.allclose(torch.tensor(result.logprobs), torch.tensor(alone.logprobs), atol=1e-6, rtol=0)
        expected = teacher_forced_logprobs(moe, item.input_ids, result.output_ids, 1.0)
        assert torch.allclose(torch.tensor(result.logprobs), expected, atol=LOGPROB_TOLERANCE, rtol=0)


def test_seeded_generation_is_reproducible(moe):
    batch = [request(prompt, seed=100 + index) for index, prompt in enumerate(prompts(6))]
    first = generator(moe, seed=1).generate(batch)
    second = generator(moe, seed=2).generate(batch)
    assert [result.output_ids for result in first] == [result.output_ids for result in second]
    reseeded = generator(moe).generate([request(prompt.input_ids, seed=prompt.seed + 1000) for prompt in batch])
    assert [result.output_ids for result in reseeded] != [result.output_ids for result in first]


def test_unseeded_requests_follow_the_engine_seed(moe):
    batch = [request(prompt, seed=None) for prompt in prompts(4)]
    assert [r.output_ids for r in generator(moe, seed=5).generate(batch)] == [r.output_ids for r in generator(moe, seed=5).generate(batch)]


def test_stop_tokens_and_length_limits(moe):
    greedy = generator(moe).generate([request([7, 8, 9], temperature=0.0, stop_token_ids=frozenset())])[0]
    assert greedy.finish_reason == {"type": "length", "length": 12} and len(greedy.output_ids) == 12
    stop_at = greedy.output_ids[3]
    stopped = generator(moe).generate([request([7, 8, 9], temperature=0.0, stop_token_ids=frozenset({stop_at}))])[0]
    first = greedy.output_ids.index(stop_at)
    assert stopped.output_ids == greedy.output_ids[: first + 1]
    assert stopped.finish_reason == {"type": "stop", "matched": stop_at}
    context = moe.config.max_position_embeddings
    near_end = generator(moe).generate([request([5] * (context - 3), max_new_tokens=50, stop_token_ids=frozenset())])[0]
    assert near_end.finish_reason == {"type": "length", "length": 3}
    with pytest.raises(ValueError, match="leaves no room|1 to"):
        generator(moe).generate([request([5] * context)])


def test_top_k_restricts_the_draw_but_not_the_reported_logprob(moe):
    prompt = [11, 12, 13]
    greedy = generator(moe).generate([request(prompt, temperature=0.0, stop_token_ids=frozenset())])[0]
    top1 = generator(moe).generate([request(prompt, temperature=0.5, top_k=1, stop_token_ids=frozenset())])[0]
    assert top1.output_ids == greedy.output_ids
    expected = teacher_forced_logprobs(moe, prompt, top1.output_ids, 0.5)
    assert torch.allclose(torch.tensor(top1.logprobs), expected, atol=LOGPROB_TOLERANCE, rtol=0)
    nucleus = generator(moe).generate([request(prompt, top_p=1e-6, stop_token_ids=frozenset())])[0]
    assert nucleus.output_ids == greedy.output_ids


def test_on_step_can_finish_a_row_early_and_drop_the_cache(moe):
    batch = [request(prompt, seed=200 + index, stop_token_ids=frozenset(), max_new_tokens=16) for index, prompt in enumerate(prompts(3))]
    plain = generator(moe).generate(batch)

    def abort_row_1_at_step_5_then_drop_the_cache(decoding):
        if decoding.steps == 5:
            decoding.finish(1, {"type": "abort", "message": "Aborted"})
            decoding.drop_cache()

    controlled = generator(moe).generate(batch, on_step=abort_row_1_at_step_5_then_drop_the_cache)
    assert controlled[1].output_ids == plain[1].output_ids[:5] and controlled[1].logprobs == plain[1].logprobs[:5]
    assert controlled[1].finish_reason == {"type": "abort", "message": "Aborted"}
    for row in (0, 2):  # the recomputed cache gives the same tokens, log-probs to float rounding
        assert controlled[row].output_ids == plain[row].output_ids and controlled[row].finish_reason == plain[row].finish_reason
        assert controlled[row].logprobs[:5] == plain[row].logprobs[:5]
        assert torch.allclose(torch.tensor(controlled[row].logprobs), torch.tensor(plain[row].logprobs), atol=LOGPROB_TOLERANCE, rtol=0)
