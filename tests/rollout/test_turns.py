"""Turns of many episodes gathered into one request per engine (megarl.rollout.turns)."""

from __future__ import annotations

import asyncio

import pytest

from megarl.rollout.sampling import Sample, SamplingParams
from megarl.rollout.turns import TurnBatcher

pytestmark = pytest.mark.cpu


def fake_send(batches):
    async def send(engine, requests, sampling):
        batches.append((engine, [request[2] for request in requests], sampling.temperature))
        if any(request[2] == ["boom"] for request in requests):
            raise RuntimeError("engine refused the batch")
        return [Sample(request[0], 0, [*request[2], request[3]], [0.0] * (len(request[2]) + 1), "stop", None, ()) for request in requests]

    return send


def test_turns_that_arrive_together_go_in_one_request_per_engine_and_sampling():
    batches = []
    batcher = TurnBatcher(fake_send(batches), gather_s=0.01)
    hot, cold = SamplingParams(max_new_tokens=4), SamplingParams(max_new_tokens=4, temperature=0.5)

    async def turns():
        return await asyncio.gather(
            batcher.generate("e0", (0, 0, [1], 4, None), hot),
            batcher.generate("e0", (1, 0, [2], 3, None), hot),
            batcher.generate("e1", (2, 0, [3], 4, None), hot),
            batcher.generate("e0", (3, 0, [4], 4, None), cold),
        )

    samples = asyncio.run(turns())
    # Each caller gets its own sample, whatever batch it went in.
    assert [sample.response_ids for sample in samples] == [[1, 4], [2, 3], [3, 4], [4, 4]]
    assert sorted(batches) == sorted([("e0", [[1], [2]], 1.0), ("e1", [[3]], 1.0), ("e0", [[4]], 0.5)])


def test_a_failed_batch_fails_each_of_its_turns_and_a_cancelled_turn_is_left_out():
    batches = []
    batcher = TurnBatcher(fake_send(batches), gather_s=0.01)
    sampling = SamplingParams(max_new_tokens=4)

    async def turns():
        failing = await asyncio.gather(
            batcher.generate("e0", (0, 0, ["boom"], 4, None), sampling), batcher.generate("e0", (1, 0, [2], 4, None), sampling),
            return_exceptions=True,
        )
        cancelled = asyncio.ensure_future(batcher.generate("e0", (2, 0, [7], 4, None), sampling))
        kept = asyncio.ensure_future(batcher.generate("e0", (3, 0, [8], 4, None), sampling))
        await asyncio.sleep(0)
        cancelled.cancel()
        return failing, await kept

    failing, kept = asyncio.run(turns())
    assert all(isinstance(result, RuntimeError) for result in failing)
    assert kept.response_ids == [8, 4] and batches[-1] == ("e0", [[8]], 1.0)


def test_a_turn_aborted_by_a_pause_is_sent_again_and_comes_back_whole():
    from megarl.rollout.errors import EngineRequestError
    from megarl.rollout.sampling import WeightSegment, resume_seed

    pauses = [0]
    sent = []

    async def send(engine, requests, sampling):
        sent.extend(requests)
        if len(sent) == 1:
            pauses[0] += 1  # a weight update paused the engines while the turn generated
            return [Sample(0, 0, [7, 8], [-0.1, -0.2], "abort", "0", (WeightSegment("0", 0, 2),))]
        return [Sample(0, 0, [9, 2], [-0.3, -0.4], "stop", "1", (WeightSegment("1", 0, 2),))]

    batcher = TurnBatcher(send, gather_s=0.001, pauses=lambda: pauses[0])
    sample = asyncio.run(batcher.generate("e0", (3, 0, [1, 5], 6, 11), SamplingParams(max_new_tokens=6)))
    assert sample.response_ids == [7, 8, 9, 2] and sample.logprobs == [-0.1, -0.2, -0.3, -0.4] and sample.finish_reason == "stop"
    assert sample.weight_segments == (WeightSegment("0", 0, 2), WeightSegment("1", 2, 4))
    # The continuation: the turn's input and its tokens so far, the rest of its limit, a resumed seed.
    assert sent[1] == (3, 0, [1, 5, 7, 8], 4, resume_seed(11, 2))

    async def aborts(engine, requests, sampling):
        return [Sample(0, 0, [7], [-0.1], "abort", "0", ()) for _ in requests]

    with pytest.raises(EngineRequestError, match="no pause"):
        asyncio.run(TurnBatcher(aborts, gather_s=0.001).generate("e0", (0, 0, [1], 4, None), SamplingParams(max_new_tokens=4)))
