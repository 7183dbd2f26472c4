"""The rollout client: many engine servers behind one object.

::

    with EngineGroup.from_config(config.rollout, model_path) as engines:
        for step in range(steps):
            sampling = SamplingParams.from_config(config.rollout, max_new_tokens=..., seed=config.rollout.seed * 1_000_003 + step)
            samples = engines.generate(prompt_token_ids, sampling)   # prompt-major: prompt 0's n samples, then prompt 1's ...
            ...                                                      # rewards, training
            engines.update_weights(weight_stream_buckets, version=step + 1)

Where requests go (a prompt's samples on one engine, or through the router) is
:mod:`megarl.rollout.generation`'s; with :meth:`EngineGroup.submit_generate` several batches are in flight.

Several nodes: every node's first rank launches its node's engines in a group of its own, which
updates their weights, releases and resumes their memory and restarts them; the first rank's group
also generates on the other nodes' engines (:meth:`EngineGroup.add_remote_engines`) and pauses,
continues and flushes them, and the router (:meth:`EngineGroup.use_router`) stands in front of all.

Partial rollouts: with ``partial=True`` a sample that a pause (:meth:`EngineGroup.pause_generation`
in ``abort`` mode) or an abort stopped comes back with its tokens so far and ``finish_reason`` ``abort``;
:meth:`EngineGroup.submit_resume` resumes such samples (prompt + their tokens, the rest of ``max_new_tokens``,
seeds from :func:`~megarl.rollout.sampling.resume_seed`), their ``weight_segments`` saying which weights generated which tokens.

Every request goes through the group's :class:`~megarl.rollout.http_client.EngineClient` (asyncio,
on the group's own thread). Besides the client, the group is four parts, one job each:

- this client: weight updates, memory release and resume, pauses, cache flushes, reads;
- :class:`~megarl.rollout.generation.Generation`: where each request goes, and its samples;
- :class:`~megarl.rollout.weight_updates.WeightUpdater`: how an update reaches every engine over
  the group's transport, through the weight snapshot (:mod:`megarl.rollout.snapshot`);
- :class:`~megarl.rollout.supervision.EngineSupervisor`: starts the engines, watches their health,
  restarts a failed one with the current weights within ``restart_budget``, and stops them.

Faults. Every call raises a typed :class:`~megarl.rollout.errors.EngineError` naming the engine
(:class:`EngineTimeout` past ``request_timeout_s``); one to an engine that dies under it is sent again once it is restarted.

Shutdown: :meth:`EngineGroup.shutdown` (also on leaving ``with``, at exit, when a launch fails)
stops every launched engine, closes the HTTP client (ending its thread), deletes the snapshot.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Iterable, Literal, Sequence

from megarl.rollout import protocol
from megarl.rollout.engine import Engine, LaunchOptions, resolve_engine
from megarl.rollout.errors import EngineError
from megarl.rollout.generation import Generation, gather
from megarl.rollout.http_client import EngineClient
from megarl.rollout.routed_experts import RoutingShape
from megarl.rollout.sampling import Sample, SamplingParams
from megarl.rollout.snapshot import WeightSnapshot
from megarl.rollout.supervision import EngineSupervisor
from megarl.rollout.transports import TRANSPORTS
from megarl.rollout.weight_updates import WeightUpdater
from megarl.weights.bucket import Bucket

if TYPE_CHECKING:
    from megarl.rollout.router import Router

_GROUP_OPTIONS = (
    "weight_transport", "request_timeout_s", "health_check_interval_s", "health_timeout_s", "restart_budget", "snapshot_root", "return_routed_experts",
    "num_nodes", "remote_wait_s",
)
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
        num_nodes: nodes with as many engines each (the client's connections are sized for all).
        remote_wait_s: how long a request waits for another node's engine, or the router's, to
            serve again after a failure (its node restarts it).
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
        num_nodes: int = 1,
        remote_wait_s: float = 600.0,
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
        # Starts, restarts, updates; on the first rank also the waits for other nodes' engines.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2 * len(engines) * num_nodes + 2, thread_name_prefix="megarl-rollout")
        self._updates = WeightUpdater(engines, self._snapshot, self._pool, request_timeout_s)
        self._supervisor = EngineSupervisor(
            engines, pool=self._pool, reload=self._updates.load_snapshot,
            health_check_interval_s=health_check_interval_s, health_timeout_s=health_timeout_s, restart_budget=restart_budget,
            require_routed_experts=return_routed_experts, check_timeout_s=request_timeout_s, version=lambda: self._snapshot.version,
            remote_wait_s=remote_wait_s,
        )
        self._released: set[str] = set()
        self._client = EngineClient(len(engines) * num_nodes)
        self._pauses = 0
        self._generation = Generation(
            self._supervisor, engines, router=None, request_timeout_s=request_timeout_s, routing=self.routing, pauses=lambda: self._pauses,
            redeliver_s=remote_wait_s,
        )
        self.remote_engines: list[Engine] = []
        """The other nodes' engines (first rank, several nodes): generated on, paused, continued and flushed here."""
        for engine in engines:
            engine.client = self._client
        atexit.register(self.shutdown)

    @classmethod
    def launch(
        cls, engine: str, model_path: str | Path, *, num_engines: int = 1, tensor_parallel: int = 1, mem_fraction: float = 0.5,
        colocate: bool = True, deterministic: bool = False, seed: int = 1, first_gpu: int = 0, hf_threads: int | None = None,
        hf_step_delay_s: float = 0.0, dtype: str = "auto", engine_kwargs: dict | None = None, extra_args: Sequence[str] = (), startup_timeout_s: float = 600.0,
        log_dir: Path | None = None, node: int | None = None, host: str = "127.0.0.1", address: str | None = None, name: str | None = None, **group_options,
    ) -> EngineGroup:
        """Start ``num_engines`` servers on this machine and wait until all are healthy.

        Args:
            engine: ``hf``, ``sglang`` or ``auto`` (:func:`resolve_engine`).
            model_path: HF model directory.
            num_engines, tensor_parallel, mem_fraction, colocate, deterministic, seed, first_gpu,
                hf_threads, hf_step_delay_s, dtype, engine_kwargs, extra_args, startup_timeout_s, host, address:
                see :class:`LaunchOptions`.
            log_dir: where engine logs go (default: a new temporary directory).
            node: this node's index when a run has several: the engines are named
                ``{kind}-n{node}-{i}`` (their logs and ready files share the run directory).
            name: the engines' names before ``-{i}`` instead (``teacher``: another model's engines).
            **group_options: the keyword arguments of :class:`EngineGroup`.

        Raises:
            EngineStartError: an engine did not come up (every engine started is stopped).
        """
        kind = resolve_engine(engine)
        options = LaunchOptions(
            engine=kind, model_path=str(model_path), log_dir=Path(log_dir or tempfile.mkdtemp(prefix="megarl-engines-")),
            tensor_parallel=tensor_parallel, first_gpu=first_gpu, mem_fraction=mem_fraction, colocate=colocate,
            deterministic=deterministic, seed=seed, hf_threads=hf_threads, hf_step_delay_s=hf_step_delay_s, dtype=dtype, extra_args=tuple(extra_args),
            engine_kwargs=dict(engine_kwargs or {}), startup_timeout_s=startup_timeout_s, return_routed_experts=group_options.get("return_routed_experts", False),
            host=host, address=address,
        )
        prefix = name or (kind if node is None else f"{kind}-n{node}")
        engines = [Engine(f"{prefix}-{index}", kind, tensor_parallel, launch=options, index=index) for index in range(num_engines)]
        group = cls(engines, model_path=model_path, **group_options)
        try:
            group._supervisor.start()
        except BaseException:
            group.shutdown()
            raise
        return group

    @classmethod
    def connect(cls, urls: Sequence[str], *, engine: str, model_path: str | Path, tensor_parallel: int = 1, name: str | None = None, **group_options) -> EngineGroup:
        """Drive engines that are already running (not restarted by megarl when they fail).

        Args:
            urls: ``http://host:port`` of each engine.
            engine: their kind, ``hf`` or ``sglang`` (``auto``: :func:`resolve_engine`); ``name``: theirs (``{name}-{i}``; default the kind).
            model_path: the model they serve.
            tensor_parallel: their tensor-parallel size.
            **group_options: the keyword arguments of :class:`EngineGroup`.
        """
        kind = resolve_engine(engine)
        engines = [Engine(f"{name or kind}-{index}", kind, tensor_parallel, url=url.rstrip("/"), index=index) for index, url in enumerate(urls)]
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
            # Another node's restart: a start, then the weights.
            remote_wait_s=rollout.startup_timeout_s + rollout.request_timeout_s,
        )
        if rollout.engine_urls:
            # Launch options (dtype, hf_threads ...) do not apply to engines that are already running.
            group_overrides = {key: value for key, value in overrides.items() if key in _GROUP_OPTIONS}
            return cls.connect(
                rollout.engine_urls, engine=rollout.engine, model_path=model_path, tensor_parallel=rollout.engine_tensor_parallel,
                name=overrides.get("name"), **{**group_options, **group_overrides},
            )
        return cls.launch(
            rollout.engine, model_path, num_engines=rollout.num_engines, tensor_parallel=rollout.engine_tensor_parallel,
            mem_fraction=rollout.mem_fraction, colocate=rollout.colocate, seed=rollout.seed, log_dir=log_dir,
            deterministic=rollout.deterministic, hf_threads=rollout.engine_threads, hf_step_delay_s=rollout.hf_step_delay_s,
            startup_timeout_s=rollout.startup_timeout_s, engine_kwargs=rollout.engine_kwargs, **{**group_options, **overrides},
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
        return self._client.run(self._generation.generate(prompt_token_ids, sampling, partial))

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
        return self._client.run(self._generation.resume(prompt_token_ids, samples, sampling, partial))

    def prompt_log_probs(self, token_ids: Sequence[Sequence[int]], starts: Sequence[int]) -> list[list[float]]:
        """Score sequences without generating (a distillation teacher): the raw log-probs of each one's
        tokens after position ``starts[i]`` (``len(prompt) - 1``: its response's), spread over the
        engines (:meth:`Generation.prompt_log_probs`); raises as :meth:`generate` does."""
        self._supervisor.check()
        return self._client.run(self._generation.prompt_log_probs(token_ids, starts)).result()

    async def generate_turn(self, input_ids: Sequence[int], sampling: SamplingParams, *, max_new_tokens: int, seed: int | None, route: int) -> Sample:
        """One whole turn of a multi-turn episode (:mod:`megarl.agents.episode`), awaited on the group's
        loop (:meth:`run`), batched with other episodes' and resumed after a pause (:mod:`megarl.rollout.turns`):
        ``input_ids`` hold the earlier turns as sampled; ``sampling``'s ``n`` and ``seed`` are unused
        (``seed`` is this turn's); every turn of an episode goes where :meth:`route` sends ``route``."""
        self._supervisor.check()
        return await self._generation.turn(input_ids, sampling, max_new_tokens=max_new_tokens, seed=seed, route=route)

    def route(self, index: int) -> Engine:
        """Where the requests of prompt (or episode) ``index`` go: the router, else engine ``index %`` the run's engines."""
        return self._generation.route(index)

    def run(self, coroutine: Awaitable) -> concurrent.futures.Future:
        """Run ``coroutine`` on the group's event loop (where :meth:`generate_turn` is awaited)."""
        return self._client.run(coroutine)

    def add_remote_engines(self, engines: Sequence[tuple[str, str]]) -> None:
        """Generate on the other nodes' engines too (first rank of a run on several nodes).

        Args:
            engines: ``(name, url)`` of each, in node order (their nodes' :meth:`addresses`).
        """
        for name, url in engines:
            engine = Engine(name, self.kind, self.engines[0].tensor_parallel, url=url, index=len(self.remote_engines), remote=True)
            engine.client = self._client
            self.remote_engines.append(engine)
        self._generation.spread_over(self.engines + self.remote_engines)

    def addresses(self) -> list[tuple[str, str]]:
        """``(name, url)`` of this group's engines (a restarted engine keeps its URL)."""
        return [(engine.name, engine.url) for engine in self.engines]

    def use_router(self, router: Router, *, generate: bool) -> None:
        """Register this node's engines with ``router`` (a restarted one is removed and added again).

        Args:
            router: a :class:`~megarl.rollout.router.Router` (``url``, ``add_worker``, ``remove_worker``).
            generate: send every generation through it (first rank), one request per sample, with
                the in-flight slots of all the engines behind it.
        """
        for engine in self.engines:
            router.add_worker(engine.url)
        self._supervisor.re_register_with(router)
        if generate:
            front = Engine("sglang-router", self.kind, 1, url=router.url)
            front.client = self._client
            self._client.set_capacity(router.url, self._client.max_in_flight_per_engine * len(self.engines + self.remote_engines))
            self._generation.send_through(front)

    def pause_generation(self, mode: Literal["abort", "retract", "in_place"] = "abort") -> None:
        """Pause every engine (``/pause_generation``) until :meth:`continue_generation`.

        Args:
            mode: ``abort`` ends the running samples (they answer with their tokens so far:
                partial samples with ``partial=True``); ``in_place`` and ``retract`` hold them
                (their ``weight_segments`` then span the versions before and after an update).
        """
        self._supervisor.check()
        self._pauses += 1
        self._on_every_engine(protocol.PAUSE_GENERATION, protocol.pause_body(mode), remote=True)

    def continue_generation(self) -> None:
        """Let paused engines go on (``/continue_generation``): held samples continue, queued ones start."""
        self._supervisor.check()
        self._on_every_engine(protocol.CONTINUE_GENERATION, protocol.continue_body(), remote=True)

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
        """Drop every engine's prefix cache (the other nodes' too)."""
        self._supervisor.check()
        self._on_every_engine(protocol.FLUSH_CACHE, None, remote=True)

    def _on_every_engine(self, path: str, body: Any, *, remote: bool = False) -> None:
        """POST ``body`` to ``path`` on every engine of this node (``remote``: and of the other
        nodes) at once, restarting a dead one (waiting for a remote one); the first error is raised."""
        engines = self.engines + self.remote_engines if remote else self.engines
        calls = (self._supervisor.call_async(engine, "POST", path, body, timeout=self.request_timeout_s) for engine in engines)
        self._client.wait(gather(calls))

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

