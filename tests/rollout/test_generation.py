"""megarl/rollout/generation.py through a router: one request per sample with its routing key, and a
request the router could not deliver sent again (a router stand-in that answers as sglang-router
0.3.2 does; tests/rollout/test_router.py and tests/trainer/test_two_nodes.py drive the real one)."""

from __future__ import annotations

import concurrent.futures

import fastapi
import pytest

from megarl.rollout import protocol
from megarl.rollout.engine import Engine
from megarl.rollout.errors import EngineRequestError
from megarl.rollout.generation import Generation
from megarl.rollout.http_client import EngineClient
from megarl.rollout.router import ROUTING_KEY_HEADER
from megarl.rollout.sampling import SamplingParams, sample_seed
from megarl.rollout.supervision import EngineSupervisor
from tests.rollout.fake_engines import serving

pytestmark = pytest.mark.cpu


def router_stand_in(failures: list[tuple[int, str]], received: list):
    """Answers each ``/generate`` with the next of ``failures`` (status, text), then with one token:
    the request's seed modulo 100."""
    app, pending = fastapi.FastAPI(), iter(failures)

    @app.post(protocol.GENERATE)
    async def generate(request: fastapi.Request):
        body = await request.json()
        received.append((body, request.headers.get(ROUTING_KEY_HEADER)))
        failure = next(pending, None)
        if failure is not None:
            return fastapi.Response(failure[1], status_code=failure[0])
        token = body["sampling_params"]["sampling_seed"] % 100
        return [{"output_ids": [token], "meta_info": {"finish_reason": {"type": "stop"}, "output_token_logprobs": [[-0.5, token, None]]}}]

    return app


def generate_through(url: str, prompts, sampling) -> list:
    client = EngineClient(1)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        supervisor = EngineSupervisor([], pool=pool, reload=lambda engine: None, health_check_interval_s=60, health_timeout_s=5, restart_budget=0)
        router = Engine("sglang-router", "hf", 1, url=url)
        router.client = client
        generation = Generation(supervisor, [], router=router, request_timeout_s=10, routing=None, pauses=lambda: 0, redeliver_s=5)
        try:
            return client.run(generation.generate(prompts, sampling, False)).result()
        finally:
            client.close()


@pytest.mark.parametrize("failures", [[], [(500, "error sending request for url (http://127.0.0.1:1/generate)"), (503, "no_available_workers")]])
def test_every_sample_is_one_request_with_its_prompts_key_and_undelivered_ones_go_again(failures):
    received: list = []
    sampling = SamplingParams(n=2, max_new_tokens=1, seed=7)
    with serving(router_stand_in(failures, received)) as url:
        samples = generate_through(url, [[1, 2], [3]], sampling)
    assert [(sample.prompt_index, sample.sample_index) for sample in samples] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [sample.response_ids for sample in samples] == [[sample_seed(7, p, s) % 100] for p in range(2) for s in range(2)]
    delivered = received[len(failures):]
    assert len(delivered) == 4
    # One dict of sampling parameters and one prompt per request (the router refuses lists), keyed by prompt.
    assert all(isinstance(body["sampling_params"], dict) and len(body["input_ids"]) == 1 for body, _ in delivered)
    assert sorted(key for _, key in delivered) == ["7-0", "7-0", "7-1", "7-1"]


def test_an_engines_refusal_through_the_router_is_not_sent_again():
    received: list = []
    with serving(router_stand_in([(400, "the prompt is longer than the context")], received)) as url:
        with pytest.raises(EngineRequestError, match="HTTP 400: the prompt is longer"):
            generate_through(url, [[1, 2]], SamplingParams(n=1, max_new_tokens=1, seed=7))
    assert len(received) == 1


def prompt_scorer(name: str, received: list):
    """Answers a prompt-scoring ``/generate`` as SGLang does, each log-prob -token / 100."""
    app = fastapi.FastAPI()

    @app.post(protocol.GENERATE)
    async def generate(request: fastapi.Request):
        body = await request.json()
        received.append((name, len(body["input_ids"])))
        return [
            {"output_ids": [], "meta_info": {"input_token_logprobs": [[None, ids[start], None]] + [[-token / 100, token, None] for token in ids[start + 1 :]]}}
            for ids, start in zip(body["input_ids"], body["logprob_start_len"])
        ]

    return app


def test_prompt_scoring_splits_the_sequences_into_contiguous_even_shares_and_keeps_their_order():
    received: list = []
    sequences = [[1, 2, 3 + index] for index in range(5)]
    client = EngineClient(3)
    with serving(prompt_scorer("a", received)) as a, serving(prompt_scorer("b", received)) as b, serving(prompt_scorer("c", received)) as c:
        engines = [Engine(f"teacher-{index}", "hf", 1, url=url, index=index) for index, url in enumerate((a, b, c))]
        for engine in engines:
            engine.client = client
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            supervisor = EngineSupervisor(engines, pool=pool, reload=lambda engine: None, health_check_interval_s=60, health_timeout_s=5, restart_budget=0)
            generation = Generation(supervisor, engines, router=None, request_timeout_s=10, routing=None, pauses=lambda: 0, redeliver_s=5)
            try:
                scored = client.run(generation.prompt_log_probs(sequences, [1] * 5)).result()
                assert client.run(generation.prompt_log_probs([], [])).result() == []
            finally:
                client.close()
    assert sorted(received) == [("a", 2), ("b", 2), ("c", 1)]
    assert scored == [[-(3 + index) / 100] for index in range(5)]
