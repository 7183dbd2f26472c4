"""The rollout client: many engine servers behind one object.

::

    with EngineGroup.from_config(config.rollout, model_path) as engines:
        for step in range(steps):
            sampling = SamplingParams.from_config(config.rollout, max_new_tokens=..., seed=config.rollout.seed * 1_000_003 + step)
            samples = engines.generate(prompt_token_ids, sampling)   # prompt-major: prompt 0's n samples, then prompt 1's ...
            ...                                                      # rewards, training
            engines.update_weights(weight_stream_buckets, version=step + 1)

Prompts are spread round-robin over the engines, every sample of a prompt on the prompt's engine
(so SGLang's prefix cache serves the group), one batched ``/generate`` per engine, in parallel.
:meth:`EngineGroup.submit_generate` does the same without waiting: the caller may keep several
batches in flight and collect them as they complete (``concurrent.futures.as_completed``); a
sample's seed depends only on its batch's ``sampling.seed`` and its place in the batch, so it is
the same sample whichever way it was requested.

Partial rollouts: with ``partial=True`` a sample that a pause (:meth:`EngineGroup.pause_generation`
in ``abort`` mode) or an abort stopped comes back with its tokens so far and ``finish_reason``
``abort``; :meth:`EngineGroup.submit_resume` resumes such samples (prompt + their tokens, the
rest of ``max_new_tokens``, seeds from :func:`~megarl.rollout.sampling.resume_seed`) and returns
them whole, their ``weight_segments`` saying which weights generated which tokens.

Every request goes through one :class:`~megarl.rollout.http_client.EngineClient` per group: an
asyncio HTTP client on the group's own event-loop thread, many requests in flight over all engines.

Besides the client, the group is three parts, one job each:

- this client: generation, weight updates, memory release and resume, cache flushes, reads;
- :class:`~megarl.rollout.weight_updates.WeightUpdater`: how an update reaches every engine over
  the group's transport, through the weight snapshot (:mod:`megarl.rollout.snapshot`);
- :class:`~megarl.rollout.supervision.EngineSupervisor`: starts the engines, watches their health,
  restarts a failed one with the current weights within ``restart_budget``, and stops them.

Faults. Every call has a timeout and raises a typed :class:`~megarl.rollout.errors.EngineError`
naming the engine; a request that outlasts ``request_timeout_s`` raises :class:`EngineTimeout`.
A request to an engine that dies under it is sent again once the supervisor restarted it.

Shutdown: :meth:`EngineGroup.shutdown` (also on leaving ``with``, at exit, when a launch fails)
stops every launched engine, closes the HTTP client (ending its thread), deletes the snapshot.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Awaitable, Iterable, Literal, Sequence

from megarl.rollout import protocol
from megarl.rollout.engine import Engine, LaunchOptions, resolve_engine
from megarl.rollout.errors import EngineError, EngineRequestError
from megarl.rollout.http_client import EngineClient
from megarl.rollout.routed_experts import RoutingShape
from megarl.rollout.sampling import Sample, SamplingParams, resume_seed, sample_seed
from megarl.rollout.snapshot import WeightSnapshot
from megarl.rollout.supervision import EngineSupervisor
from megarl.rollout.transports import TRANSPORTS
from megarl.rollout.turns import TurnBatcher
from megarl.rollout.weight_updates import WeightUpdater
from megarl.weights.bucket import Bucket

_GROUP_OPTIONS = ("weight_transport", "request_timeout_s", "health_check_interval_s", "health_timeout_s", "restart_budget", "snapshot_root", "return_routed_experts")
"""The keyword arguments of :class:`EngineGroup` itself (the rest of :meth:`EngineGroup.launch`'s are launch options)."""


class EngineGroup:
    """Rollout engines behind one client; see the module docstring.

    Build it with :meth:`launch`, :meth:`connect` or :meth:`from_config`.

    Args:
        engines: the engines (all of one kind).
        model_path: the model the engines started from (its config files go into the snapshot).
        weight_transport: ``tensor``, ``nccl`` or ``disk`` (:mod:`megarl.rollout.transports`).
        request_timeout_s: limit of one engine request (a generate batch, one bucket's update).
        health_check_interval_s: seconds between health checks.
        health_timeout_s: limit of one health check.
        restart_budget: engine restarts allowed during the run.
        snapshot_root: where the latest weights are kept (default ``/dev/shm``, else the temp dir).
        return_routed_experts: every generation returns its samples' routed experts
            (``Sample.routed_experts``, routing replay R3); engines are checked to return them at start.
    """

    def __init__(
        self,
        engines: list[Engine],
        *,
        model_path: str | Path,
        weight_transport: str = "tensor",
        request_timeout_s: float = 600.0,
        health_check_interval_s: float = 10.0,
        health_timeout_s: float = 20.0,
        restart_budget: int = 3,
        snapshot_root: Path | None = None,
        return_routed_experts: bool = False,
    ):
        if weight_transport not in TRANSPORTS:
            raise ValueError(f"weight_transport {weight_transport!r} must be one of {TRANSPORTS}")
        if not engines:
            raise ValueError("an EngineGroup needs at least one engine")
        self.engines = engines
        self.kind = engines[0].kind
        self.weight_transport = weight_transport
        """How the next :meth:`update_weights` sends buckets; may be changed between updates."""
        self.request_timeout_s = request_timeout_s
        self.routing = RoutingShape.from_model_dir(model_path) if return_routed_experts else None
        """The shape of the routed experts the engines return (from the model's config.json); None: not asked for."""
        self._snapshot = WeightSnapshot(snapshot_root, Path(model_path))
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2 * len(engines) + 2, thread_name_prefix="megarl-rollout")
        self._updates = WeightUpdater(engines, self._snapshot, self._pool, request_timeout_s)
        self._supervisor = EngineSupervisor(
            engines, pool=self._pool, reload=self._updates.load_snapshot,
            health_check_interval_s=health_check_interval_s, health_timeout_s=health_timeout_s, restart_budget=restart_budget,
            require_routed_experts=return_routed_experts, check_timeout_s=request_timeout_s,
        )
        self._released: set[str] = set()
        self._client = EngineClient(len(engines))
        self._pauses = 0
        self._turns = TurnBatcher(lambda engine, requests, sampling: self._generate_share(engine, requests, sampling, True), pauses=lambda: self._pauses)
        for engine in engines:
            engine.client = self._client
        atexit.register(self.shutdown)

    @classmethod
    def launch(
        cls, engine: str, model_path: str | Path, *, num_engines: int = 1, tensor_parallel: int = 1, mem_fraction: float = 0.5,
        colocate: bool = True, deterministic: bool = False, seed: int = 1, first_gpu: int = 0, hf_threads: int | None = None,
        hf_step_delay_s: float = 0.0, dtype: str = "auto", extra_args: Sequence[str] = (), startup_timeout_s: float = 600.0,
        log_dir: Path | None = None, **group_options,
    ) -> EngineGroup:
        """Start ``num_engines`` servers on this machine and wait until all are healthy.

        Args:
            engine: ``hf``, ``sglang`` or ``auto`` (:func:`resolve_engine`).
            model_path: HF model directory.
            num_engines, tensor_parallel, mem_fraction, colocate, deterministic, seed, first_gpu,
                hf_threads, hf_step_delay_s, dtype, extra_args, startup_timeout_s: see :class:`LaunchOptions`.
            log_dir: where engine logs go (default: a new temporary directory).
            **group_options: the keyword arguments of :class:`EngineGroup`.

        Raises:
            EngineStartError: an engine did not come up (every engine started is stopped).
        """
        kind = resolve_engine(engine)
        options = LaunchOptions(
            engine=kind, model_path=str(model_path), log_dir=Path(log_dir or tempfile.mkdtemp(prefix="megarl-engines-")),
            tensor_parallel=tensor_parallel, first_gpu=first_gpu, mem_fraction=mem_fraction, colocate=colocate,
            deterministic=deterministic, seed=seed, hf_threads=hf_threads, hf_step_delay_s=hf_step_delay_s, dtype=dtype, extra_args=tuple(extra_args),
            startup_timeout_s=startup_timeout_s, return_routed_experts=group_options.get("return_routed_experts", False),
        )
        engines = [Engine(f"{kind}-{index}", kind, tensor_parallel, launch=options, index=index) for index in range(num_engines)]
        group = cls(engines, model_path=model_path, **group_options)
        try:
            group._supervisor.start()
        except BaseException:
            group.shutdown()
            raise
        return group

    @classmethod
    def connect(cls, urls: Sequence[str], *, engine: str, model_path: str | Path, tensor_parallel: int = 1, **group_options) -> EngineGroup:
        """Drive engines that are already running (not restarted by megarl when they fail).

        Args:
            urls: ``http://host:port`` of each engine.
            engine: their kind, ``hf`` or ``sglang`` (``auto``: :func:`resolve_engine`).
            model_path: the model they serve.
            tensor_parallel: their tensor-parallel size.
            **group_options: the keyword arguments of :class:`EngineGroup`.
        """
        kind = resolve_engine(engine)
        engines = [Engine(f"{kind}-{index}", kind, tensor_parallel, url=url.rstrip("/"), index=index) for index, url in enumerate(urls)]
        group = cls(engines, model_path=model_path, **group_options)
        try:
            group._supervisor.start()
        except BaseException:
            group.shutdown()
            raise
        return group

    @classmethod
    def from_config(cls, rollout, model_path: str | Path, *, log_dir: Path | None = None, **overrides) -> EngineGroup:
        """Launch (or connect to ``engine_urls``) as a :class:`megarl.config.RolloutConfig` says.

        Args:
            rollout: the ``rollout`` config section.
            model_path: the resolved model directory (``megarl.config.resolve_model_path``).
            log_dir: where engine logs go.
            **overrides: keyword arguments of :meth:`launch` / :class:`EngineGroup` that the
                config does not hold (``dtype``, ``snapshot_root`` ...); launch options are ignored
                when connecting to ``engine_urls``.
        """
        group_options = dict(
            weight_transport=rollout.weight_transport,
            request_timeout_s=rollout.request_timeout_s,
            health_check_interval_s=rollout.health_check_interval_s,
            health_timeout_s=rollout.health_timeout_s,
            restart_budget=rollout.restart_budget,
        )
        if rollout.engine_urls:
            # Launch options (dtype, hf_threads ...) do not apply to engines that are already running.
            group_overrides = {key: value for key, value in overrides.items() if key in _GROUP_OPTIONS}
            return cls.connect(
                rollout.engine_urls, engine=rollout.engine, model_path=model_path, tensor_parallel=rollout.engine_tensor_parallel,
                **{**group_options, **group_overrides},
            )
        return cls.launch(
            rollout.engine, model_path, num_engines=rollout.num_engines, tensor_parallel=rollout.engine_tensor_parallel,
            mem_fraction=rollout.mem_fraction, colocate=rollout.colocate, seed=rollout.seed, log_dir=log_dir,
            deterministic=rollout.deterministic, hf_threads=rollout.engine_threads, hf_step_delay_s=rollout.hf_step_delay_s,
            startup_timeout_s=rollout.startup_timeout_s,
            **{**group_options, **overrides},
        )

    @property
    def weight_version(self) -> str | None:
        """Version of the last complete weight update (``str(version)``), None before the first."""
        return self._snapshot.version

    @property
    def restarts(self) -> int:
        """Engine restarts so far; a resumed run sets it from its checkpoint (the budget is for the whole run)."""
        return self._supervisor.restarts

    @restarts.setter
    def restarts(self, count: int) -> None:
        self._supervisor.restarts = count

    @property
    def restart_budget(self) -> int:
        """Engine restarts allowed during the run (may be changed at any time)."""
        return self._supervisor.restart_budget

    @restart_budget.setter
    def restart_budget(self, count: int) -> None:
        self._supervisor.restart_budget = count

    def __enter__(self) -> EngineGroup:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingParams, *, partial: bool = False) -> list[Sample]:
        """Sample ``sampling.n`` responses for every prompt.

        Args:
            prompt_token_ids: the prompts' token ids.
            sampling: how to sample (see :mod:`megarl.rollout.sampling` for the log-probs).
            partial: return a sample that a pause or an abort stopped as a partial sample
                (``finish_reason`` ``abort``, its tokens so far; see :meth:`submit_resume`)
                instead of raising.

        Returns:
            ``len(prompts) * n`` samples, prompt-major (prompt 0's samples 0..n-1, then prompt 1's).

        Raises:
            EngineTimeout: an engine did not answer within ``request_timeout_s``.
            EngineRequestError: an engine refused the request (e.g. a prompt longer than its
                context), or aborted a sample and ``partial`` is False.
            RestartBudgetExhausted, EngineDead, EngineStartError: an engine failed for good.
        """
        return self.submit_generate(prompt_token_ids, sampling, partial=partial).result()

    def submit_generate(
        self, prompt_token_ids: Sequence[Sequence[int]], sampling: SamplingParams, *, partial: bool = False
    ) -> concurrent.futures.Future[list[Sample]]:
        """:meth:`generate` without waiting: the future holds its samples, or raises its error.

        Several batches may be in flight at once (each spread over the engines as :meth:`generate`
        spreads one); the samples are the ones :meth:`generate` would return for the same
        arguments. Cancelling the future closes the batch's connections; engines that already
        started on it finish it regardless.
        """
        self._supervisor.check()
        requests = [
            (prompt_index, sample_index, prompt, sampling.max_new_tokens, None if sampling.seed is None else sample_seed(sampling.seed, prompt_index, sample_index))
            for prompt_index, prompt in enumerate(prompt_token_ids)
            for sample_index in range(sampling.n)
        ]
        return self._client.run(self._generate(requests, sampling, partial))

    def submit_resume(
        self, prompt_token_ids: Sequence[Sequence[int]], samples: Sequence[Sample], sampling: SamplingParams, *, partial: bool = False
    ) -> concurrent.futures.Future[list[Sample]]:
        """Finish the partial samples among ``samples`` under the engines' current weights.

        Each partial sample (``finish_reason`` ``abort``) is sent again as a new request: its
        prompt followed by the tokens it has, ``max_new_tokens`` reduced by their number, to its
        prompt's engine, seeded with :func:`~megarl.rollout.sampling.resume_seed` of its own seed
        and its token count (unseeded when ``sampling.seed`` is None). The answer is appended to
        it (:meth:`Sample.continued_by`): no generated token is lost and its
        ``weight_segments`` keep the versions of the tokens it had. Finished samples pass
        through; a partial sample with no tokens left to generate finishes as ``length``.

        Args:
            prompt_token_ids: the prompts of the call that produced ``samples``.
            samples: that call's samples (any subset, any order).
            sampling: that call's sampling parameters.
            partial: a resumed sample stopped again comes back partial (to resume again).

        Returns:
            the samples in the given order, the partial ones continued.
        """
        self._supervisor.check()
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

        async def resume() -> list[Sample]:
            continued = done | {
                request[1]: samples[request[1]].continued_by(continuation)
                for request, continuation in zip(requests, await self._generate(requests, sampling, partial, keep_order=True))
            }
            return [continued[position] for position in range(len(samples))]

        return self._client.run(resume())

    async def generate_turn(self, input_ids: Sequence[int], sampling: SamplingParams, *, max_new_tokens: int, seed: int | None, route: int) -> Sample:
        """One whole turn of a multi-turn episode (:mod:`megarl.agents.episode`), awaited on the group's
        loop (:meth:`run`), batched with other episodes' and resumed after a pause (:mod:`megarl.rollout.turns`):
        ``input_ids`` hold the earlier turns as sampled; ``sampling``'s ``n`` and ``seed`` are unused
        (``seed`` is this turn's); the engine is ``route % num_engines`` for every turn of an episode."""
        self._supervisor.check()
        return await self._turns.generate(self.engines[route % len(self.engines)], (route, 0, input_ids, max_new_tokens, seed), sampling)

    def run(self, coroutine: Awaitable) -> concurrent.futures.Future:
        """Run ``coroutine`` on the group's event loop (where :meth:`generate_turn` is awaited)."""
        return self._client.run(coroutine)

    async def _generate(self, requests: list[tuple[int, int, Sequence[int], int, int | None]], sampling: SamplingParams, partial: bool, *, keep_order: bool = False) -> list[Sample]:
        """Send ``(prompt_index, sample_index, input_ids, max_new_tokens, seed)`` requests, each to
        its prompt's engine (one batch per engine, in parallel). The samples come back sorted by
        ``(prompt_index, sample_index)``, or in the order of ``requests`` with ``keep_order``."""
        shares: dict[Engine, list[int]] = {}
        for position, request in enumerate(requests):
            shares.setdefault(self.engines[request[0] % len(self.engines)], []).append(position)
        answers = await _all(self._generate_share(engine, [requests[position] for position in positions], sampling, partial) for engine, positions in shares.items())
        by_position = {position: sample for positions, share in zip(shares.values(), answers) for position, sample in zip(positions, share)}
        if keep_order:
            return [by_position[position] for position in range(len(requests))]
        return sorted(by_position.values(), key=lambda sample: (sample.prompt_index, sample.sample_index))

    async def _generate_share(self, engine: Engine, requests: list[tuple[int, int, Sequence[int], int, int | None]], sampling: SamplingParams, partial: bool) -> list[Sample]:
        params = [
            protocol.sampling_body(sampling if limit == sampling.max_new_tokens else dataclasses.replace(sampling, max_new_tokens=limit), seed)
            for _, _, _, limit, seed in requests
        ]
        inputs = [input_ids for _, _, input_ids, _, _ in requests]
        body = protocol.generate_body(inputs, params, return_routed_experts=self.routing is not None)
        answer = await self._supervisor.call_async(engine, "POST", protocol.GENERATE, body, timeout=self.request_timeout_s)
        try:
            items = protocol.parse_generate_response(answer, len(requests), partial=partial, routing=self.routing, input_lengths=[len(ids) for ids in inputs])
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

    def pause_generation(self, mode: Literal["abort", "retract", "in_place"] = "abort") -> None:
        """Pause every engine (``/pause_generation``) until :meth:`continue_generation`.

        Args:
            mode: ``abort`` ends the running samples (they answer with their tokens so far:
                partial samples with ``partial=True``); ``in_place`` and ``retract`` hold them
                (their ``weight_segments`` then span the versions before and after an update).
        """
        self._supervisor.check()
        self._pauses += 1
        self._on_every_engine(protocol.PAUSE_GENERATION, protocol.pause_body(mode))

    def continue_generation(self) -> None:
        """Let paused engines go on (``/continue_generation``): held samples continue, queued ones start."""
        self._supervisor.check()
        self._on_every_engine(protocol.CONTINUE_GENERATION, protocol.continue_body())

    def update_weights(self, buckets: Iterable[Bucket], version: int | str) -> None:
        """Load new weights into every engine, bucket by bucket, over the group's transport.

        Every bucket is also written to the snapshot, so that an engine restarted later (or one
        that fails during the update) is loaded with these weights. Each bucket is pushed to all
        engines before the next is read, so the stream may reuse its buffer.

        Args:
            buckets: the weight stream's buckets: the *whole* model, HF names.
            version: the new weight version (e.g. the step); engines report ``str(version)``.

        Raises:
            EngineRequestError: an engine refused the weights (unknown names, wrong shapes).
            RestartBudgetExhausted, EngineStartError: an engine that failed could not be restarted.
        """
        self._supervisor.check()
        with self._supervisor.paused():
            missed = self._updates.send(buckets, str(version), self.weight_transport)
            # Engines that missed part of it (dead, stalled, cut off by a failed broadcast) are
            # given the complete snapshot; one that fails that too is restarted.
            for engine, cause in missed.items():
                incarnation = engine.incarnation
                try:
                    self._updates.catch_up(engine, cause)
                except EngineError as error:
                    self._supervisor.recover(engine, incarnation, error)

    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        """Free the engines' GPU memory for training (colocated mode); health checks pause until resumed.

        Args:
            tags: regions to release, a subset of ``weights``, ``kv_cache``, ``cuda_graph``; None: all.
        """
        self._supervisor.check()
        body = protocol.memory_body(tags)
        if not self._released:
            self._supervisor.pause()
        self._released.update(tags or protocol.MEMORY_TAGS)
        self._on_every_engine(protocol.RELEASE_MEMORY, body)

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        """Take the released memory back (e.g. ``["weights"]`` before an update, then the rest).

        Args:
            tags: regions to resume; None: every region still released (SGLang fails on a region
                that is not released, so None never names one).
        """
        self._supervisor.check()
        if tags is None:
            tags = [tag for tag in protocol.MEMORY_TAGS if tag in self._released]
            if not tags:
                return
        self._on_every_engine(protocol.RESUME_MEMORY, protocol.memory_body(tags))
        if self._released:
            self._released.difference_update(tags)
            if not self._released:
                self._supervisor.resume()

    def flush_cache(self) -> None:
        """Drop every engine's prefix cache."""
        self._supervisor.check()
        self._on_every_engine(protocol.FLUSH_CACHE, None)

    def _on_every_engine(self, path: str, body: Any) -> None:
        """POST ``body`` to ``path`` on every engine at once (restarting a dead one); the first error is raised."""
        calls = (self._supervisor.call_async(engine, "POST", path, body, timeout=self.request_timeout_s) for engine in self.engines)
        self._client.wait(_all(calls))

    def health(self) -> dict[str, bool]:
        """Whether each engine answers ``/health_generate`` within ``health_timeout_s`` (no restarts)."""
        return self._supervisor.health()

    def read_weight(self, name: str, engine_index: int = 0) -> list:
        """One weight as an engine holds it (``/get_weights_by_name``, every row), for checks.

        The ``hf`` engine takes HF checkpoint names and answers the exact values; SGLang takes the
        names of its own (fused) parameters.
        """
        engine = self.engines[engine_index]
        return engine.call("POST", protocol.GET_WEIGHTS_BY_NAME, protocol.get_weights_body(name, 1 << 62), timeout=self.request_timeout_s)

    def pids(self) -> dict[str, int]:
        """Process id of every launched engine's server."""
        return self._supervisor.pids()

    def shutdown(self) -> None:
        """Stop the monitor and every launched engine; delete the snapshot. Idempotent."""
        if self._supervisor.closed:
            return
        atexit.unregister(self.shutdown)
        self._supervisor.close()
        self._updates.close()  # leaves the broadcast group while its members still run
        self._supervisor.stop_engines()
        self._client.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._snapshot.close()


async def _all(calls: Iterable[Awaitable]) -> list:
    """Every call's result once all have finished; the first error (in order) is raised after all finish."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results
