"""One request per engine for the turns that many episodes ask for at about the same time.

Multi-turn episodes (:mod:`megarl.agents.episode`) each ask for one turn at a time, as their
environments answer; sent one HTTP request per turn, a round of hundreds of episodes costs an
engine hundreds of requests to parse, queue and answer, for a few tokens each (the bundled lookup
task: 2.1-3.4 s a step instead of 0.1). :class:`TurnBatcher` holds each turn for
:data:`GATHER_S` and sends the turns that arrived for the same engine and sampling in the meantime
as one batched ``/generate`` (SGLang's batched input: one item per turn, each with its own
``max_new_tokens`` and seed), so the engine generates them together as it does a single-turn round.
A turn's result does not depend on the batch it went in: each item carries its own seed.

A turn that a pause in ``abort`` mode stops (a weight update of ``rollout.mode: async`` with
partial rollout) comes back with its tokens so far; :meth:`TurnBatcher.generate` sends it again at
once as the turn's input plus those tokens, for the rest of its limit, seeded with
:func:`~megarl.rollout.sampling.resume_seed` (the engines queue it until they continue), and
returns the whole turn, its ``weight_segments`` naming the weights of each part. An abort that no
pause explains (``pauses()`` unchanged since the turn was sent) is an error, as it is for rounds.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from megarl.rollout.errors import EngineRequestError
from megarl.rollout.sampling import Sample, SamplingParams, resume_seed

GATHER_S = 0.003
"""How long the first turn of a batch waits for others: an environment worker answers a step in
about 0.1 ms, so the turns of a round's episodes arrive within a few milliseconds of each other,
while generating one costs an engine tens of milliseconds."""

Request = tuple[int, int, Sequence[int], int, "int | None"]
"""``(prompt_index, sample_index, input_ids, max_new_tokens, seed)``, as :class:`~megarl.rollout.EngineGroup` sends them."""


class TurnBatcher:
    """Gathers turns per ``(engine, sampling)`` and sends each gathered batch with ``send``.

    Args:
        send: ``send(engine, requests, sampling)`` generates a batch on one engine and returns its
            samples in the order of ``requests``.
        gather_s: how long a batch stays open after its first turn.
    """

    def __init__(
        self,
        send: Callable[[Any, list[Request], SamplingParams], Awaitable[list[Sample]]],
        gather_s: float = GATHER_S,
        pauses: Callable[[], int] = lambda: 0,
    ):
        self._send = send
        self._gather_s = gather_s
        self._pauses = pauses
        self._open: dict[tuple[Any, SamplingParams], list[tuple[Request, asyncio.Future]]] = {}

    async def generate(self, engine: Any, request: Request, sampling: SamplingParams) -> Sample:
        """The whole turn of ``request`` on ``engine`` (sent again after an abort by a pause, see
        the module docstring), generated in batches with the turns that arrive within ``gather_s``
        of a batch's first (on the running event loop). ``send`` must return aborted samples as
        partial ones (``finish_reason`` ``abort``)."""
        route, index, input_ids, limit, seed = request
        pauses = self._pauses()
        sample = await self._gathered(engine, request, sampling)
        while sample.finish_reason == "abort":
            if self._pauses() == pauses:
                raise EngineRequestError(str(engine), "a turn came back aborted although no pause stopped the engines since it was sent")
            left = limit - len(sample.response_ids)
            if left < 1:
                return dataclasses.replace(sample, finish_reason="length")
            pauses = self._pauses()
            tokens = len(sample.response_ids)
            rest = (route, index, [*input_ids, *sample.response_ids], left, None if seed is None else resume_seed(seed, tokens))
            sample = sample.continued_by(await self._gathered(engine, rest, sampling))
        return sample

    async def _gathered(self, engine: Any, request: Request, sampling: SamplingParams) -> Sample:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        key = (engine, sampling)
        batch = self._open.setdefault(key, [])
        batch.append((request, future))
        if len(batch) == 1:
            loop.call_later(self._gather_s, lambda: loop.create_task(self._flush(key)))
        return await future

    async def _flush(self, key: tuple[Any, SamplingParams]) -> None:
        batch = [(request, future) for request, future in self._open.pop(key) if not future.done()]
        if not batch:
            return
        engine, sampling = key
        try:
            samples = await self._send(engine, [request for request, _ in batch], sampling)
        except BaseException as error:  # noqa: BLE001 - every turn of the batch gets the batch's error
            for _, future in batch:
                if not future.done():
                    future.set_exception(error)
            if not isinstance(error, Exception):
                raise
            return
        for (_, future), sample in zip(batch, samples):
            if not future.done():
                future.set_result(sample)
