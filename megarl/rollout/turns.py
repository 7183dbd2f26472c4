"""One request per engine for the turns that many episodes ask for at about the same time.

Multi-turn episodes (:mod:`megarl.agents.episode`) each ask for one turn at a time, as their
environments answer; sent one HTTP request per turn, a round of hundreds of episodes costs an
engine hundreds of requests to parse, queue and answer, for a few tokens each (the bundled lookup
task: 2.1-3.4 s a step instead of 0.1). :class:`TurnBatcher` holds each turn for
:data:`GATHER_S` and sends the turns that arrived for the same engine and sampling in the meantime
as one batched ``/generate`` (SGLang's batched input: one item per turn, each with its own
``max_new_tokens`` and seed), so the engine generates them together as it does a single-turn round.
A turn's result does not depend on the batch it went in: each item carries its own seed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from megarl.rollout.sampling import Sample, SamplingParams

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

    def __init__(self, send: Callable[[Any, list[Request], SamplingParams], Awaitable[list[Sample]]], gather_s: float = GATHER_S):
        self._send = send
        self._gather_s = gather_s
        self._open: dict[tuple[Any, SamplingParams], list[tuple[Request, asyncio.Future]]] = {}

    async def generate(self, engine: Any, request: Request, sampling: SamplingParams) -> Sample:
        """The sample of ``request`` on ``engine``, generated in a batch with the turns that arrive
        within ``gather_s`` of the batch's first (on the running event loop)."""
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
