"""Generation over every engine of a run: requests in, samples out.

Where a request goes:

- without a router, request ``(prompt i, sample j)`` goes to engine ``i % num_engines`` of all the
  run's engines (this node's, then every other node's, in node order), so a prompt's samples share
  one engine's prefix cache; the requests for one engine go out as one batched ``/generate``;
- with a router (``rollout.router: sglang``), every sample is one ``/generate`` to the router
  (it takes one ``sampling_params`` per request), carrying the header
  :data:`ROUTING_KEY_HEADER` ``{seed}-{prompt}`` (episodes: their route): the router's
  ``cache_aware`` policy keeps a prompt's samples together through their common prefix, its
  ``manual`` policy by the key. The engine batches the concurrent requests itself. A request the
  router could not deliver (an engine died under it; its node restarts it and the router gets it
  back) is sent again, for up to ``redeliver_s``.

A sample's seed depends only on its batch's ``sampling.seed`` and its place in the batch, so it
is the same sample whichever engine draws it and however the requests were grouped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from typing import Any, Awaitable, Callable, Iterable, Sequence

from megarl.rollout import protocol
from megarl.rollout.engine import Engine
from megarl.rollout.errors import EngineRequestError
from megarl.rollout.routed_experts import RoutingShape
from megarl.rollout.router import ROUTING_KEY_HEADER, undelivered
from megarl.rollout.sampling import Sample, SamplingParams, resume_seed, sample_seed
from megarl.rollout.supervision import EngineSupervisor
from megarl.rollout.turns import Request, TurnBatcher

log = logging.getLogger(__name__)

_REDELIVER_PAUSE_S = 0.2
"""Wait before a request the router could not deliver goes again (the router takes a dead engine
out, or its node restarts it, within seconds)."""


class Generation:
    """Turns generation calls into ``/generate`` requests on the engines or through the router.

    Args:
        supervisor: sends each request (and restarts, or waits for, an engine that died under it).
        engines: every engine of the run, in spreading order.
        router: the router in front of them, or None (requests spread over ``engines``).
        request_timeout_s: limit of one request.
        routing: the routed experts' shape when every generation returns them, else None.
        pauses: how many pauses the engines have been through (:class:`TurnBatcher`).
        redeliver_s: how long a request the router could not deliver is sent again.
    """

    def __init__(
        self, supervisor: EngineSupervisor, engines: Sequence[Engine], *, router: Engine | None, request_timeout_s: float,
        routing: RoutingShape | None, pauses: Callable[[], int], redeliver_s: float = 600.0,
    ):
        self.engines = list(engines)
        self.router = router
        self._supervisor = supervisor
        self._request_timeout_s = request_timeout_s
        self._redeliver_s = redeliver_s
        self._routing = routing
        self._turns = TurnBatcher(lambda engine, requests, sampling: self._generate_share(engine, requests, sampling, True), pauses=pauses)

    def spread_over(self, engines: Sequence[Engine]) -> None:
        """Spread requests over ``engines`` from now on (every node's, once they are known)."""
        self.engines = list(engines)

    def send_through(self, router: Engine) -> None:
        """Send every request through ``router`` from now on."""
        self.router = router

    def route(self, index: int) -> Engine:
        """Where request group ``index`` (a prompt, an episode) goes: the router, else engine ``index % num_engines``."""
        return self.router if self.router is not None else self.engines[index % len(self.engines)]

    async def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingParams, partial: bool) -> list[Sample]:
        """``sampling.n`` samples of every prompt, prompt-major (:meth:`EngineGroup.generate`)."""
        requests = [
            (prompt_index, sample_index, prompt, sampling.max_new_tokens, None if sampling.seed is None else sample_seed(sampling.seed, prompt_index, sample_index))
            for prompt_index, prompt in enumerate(prompt_token_ids)
            for sample_index in range(sampling.n)
        ]
        return await self._generate(requests, sampling, partial)

    async def resume(self, prompt_token_ids: Sequence[Sequence[int]], samples: Sequence[Sample], sampling: SamplingParams, partial: bool) -> list[Sample]:
        """The partial samples among ``samples`` continued, in the given order (:meth:`EngineGroup.submit_resume`)."""
        requests, done = [], {}
        for position, sample in enumerate(samples):
            remaining = sampling.max_new_tokens - len(sample.response_ids)
            if sample.finish_reason != "abort":
                done[position] = sample
            elif remaining < 1:
                done[position] = dataclasses.replace(sample, finish_reason="length")
            else:
                seed = None if sampling.seed is None else resume_seed(sample_seed(sampling.seed, sample.prompt_index, sample.sample_index), len(sample.response_ids))
                prompt = list(prompt_token_ids[sample.prompt_index]) + sample.response_ids
                requests.append((sample.prompt_index, position, prompt, remaining, seed))
        continued = done | {
            request[1]: samples[request[1]].continued_by(continuation)
            for request, continuation in zip(requests, await self._generate(requests, sampling, partial, keep_order=True))
        }
        return [continued[position] for position in range(len(samples))]

    async def turn(self, input_ids: Sequence[int], sampling: SamplingParams, *, max_new_tokens: int, seed: int | None, route: int) -> Sample:
        """One turn of episode ``route`` (:meth:`EngineGroup.generate_turn`), batched with other episodes' turns."""
        return await self._turns.generate(self.route(route), (route, 0, input_ids, max_new_tokens, seed), sampling)

    async def prompt_log_probs(self, token_ids: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[float]]:
        """The log-probs of every sequence's tokens after position ``starts[i]``
        (:meth:`EngineGroup.prompt_log_probs`): the sequences split into contiguous shares, one per
        engine, as even as the count allows (a prompt's samples, next to each other, share an
        engine's prefix cache), each one
        prompt-scoring ``/generate`` (:func:`~megarl.rollout.protocol.prompt_logprobs_body`), in parallel."""
        if not token_ids:
            return []
        share, extra = divmod(len(token_ids), len(self.engines))
        sizes = [share + (index < extra) for index in range(len(self.engines))]
        ends = list(itertools.accumulate(sizes))
        bounds = [(end - size, end) for size, end in zip(sizes, ends) if size]
        answers = await gather(
            self._prompt_log_probs(engine, token_ids[first:end], starts[first:end]) for engine, (first, end) in zip(self.engines, bounds)
        )
        return [values for answer in answers for values in answer]

    async def _prompt_log_probs(self, engine: Engine, token_ids: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[float]]:
        body = protocol.prompt_logprobs_body(token_ids, starts)
        answer = await self._supervisor.call_async(engine, "POST", protocol.GENERATE, body, timeout=self._request_timeout_s)
        try:
            return protocol.parse_prompt_logprobs_response(answer, token_ids, starts)
        except ValueError as error:
            raise EngineRequestError(engine.label, str(error)) from None

    async def _generate(self, requests: list[Request], sampling: SamplingParams, partial: bool, *, keep_order: bool = False) -> list[Sample]:
        """Send the requests, each to its prompt's engine (one batch per engine, in parallel). The
        samples come back sorted by ``(prompt_index, sample_index)``, or in the order of
        ``requests`` with ``keep_order``."""
        shares: dict[Engine, list[int]] = {}
        for position, request in enumerate(requests):
            shares.setdefault(self.route(request[0]), []).append(position)
        answers = await gather(self._generate_share(engine, [requests[position] for position in positions], sampling, partial) for engine, positions in shares.items())
        by_position = {position: sample for positions, share in zip(shares.values(), answers) for position, sample in zip(positions, share)}
        if keep_order:
            return [by_position[position] for position in range(len(requests))]
        return sorted(by_position.values(), key=lambda sample: (sample.prompt_index, sample.sample_index))

    async def _generate_share(self, engine: Engine, requests: list[Request], sampling: SamplingParams, partial: bool) -> list[Sample]:
        """The samples of ``requests`` from ``engine``: one batched request, or one request each through the router."""
        if engine is self.router:
            answers = await gather(self._request(engine, [request], sampling, partial, routing_key=self._routing_key(request, sampling)) for request in requests)
            return [sample for answer in answers for sample in answer]
        return await self._request(engine, requests, sampling, partial)

    @staticmethod
    def _routing_key(request: Request, sampling: SamplingParams) -> str:
        return f"{sampling.seed}-{request[0]}"

    async def _request(self, engine: Engine, requests: list[Request], sampling: SamplingParams, partial: bool, *, routing_key: str | None = None) -> list[Sample]:
        params = [
            protocol.sampling_body(sampling if limit == sampling.max_new_tokens else dataclasses.replace(sampling, max_new_tokens=limit), seed)
            for _, _, _, limit, seed in requests
        ]
        inputs = [input_ids for _, _, input_ids, _, _ in requests]
        if routing_key is None:
            body = protocol.generate_body(inputs, params, return_routed_experts=self._routing is not None)
            headers = None
        else:
            body = protocol.routed_generate_body(inputs[0], params[0], return_routed_experts=self._routing is not None)
            headers = {ROUTING_KEY_HEADER: routing_key}
        answer = await self._post(engine, body, headers)
        try:
            items = protocol.parse_generate_response(answer, len(requests), partial=partial, routing=self._routing, input_lengths=[len(ids) for ids in inputs])
        except ValueError as error:
            raise EngineRequestError(engine.label, str(error)) from None
        return [
            Sample(
                prompt_index=prompt_index, sample_index=sample_index, response_ids=item.output_ids, logprobs=item.logprobs,
                finish_reason=item.finish_reason, weight_version=item.weight_version, weight_segments=item.weight_segments,
                routed_experts=item.routed_experts,
            )
            for (prompt_index, sample_index, _, _, _), item in zip(requests, items)
        ]

    async def _post(self, engine: Engine, body: dict, headers: dict[str, str] | None) -> Any:
        """``/generate`` on ``engine``; through the router, again while it cannot deliver it (see the module docstring)."""
        give_up = time.monotonic() + self._redeliver_s
        while True:
            try:
                return await self._supervisor.call_async(engine, "POST", protocol.GENERATE, body, timeout=self._request_timeout_s, headers=headers)
            except EngineRequestError as error:
                if engine is not self.router or not undelivered(error) or time.monotonic() > give_up:
                    raise
                log.info("%s; sending it again", error)
                await asyncio.sleep(_REDELIVER_PAUSE_S)


async def gather(calls: Iterable[Awaitable]) -> list:
    """Every call's result once all have finished; the first error (in order) is raised after all finish."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results

