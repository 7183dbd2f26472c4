"""What a node's first rank starts before it imports Megatron and builds the model: the node's
rollout engines, and on the first rank the distillation teacher's engines (``algorithm.opd_type``
sglang), the reward scorer and (``agent.environment``) the environment workers or
(``agent.openai_agent``) the agent program workers; and, once the engines
and the tokenizer are there, the chat endpoint the programs call (:func:`start_chat_endpoint`) and
the joining of the nodes' engines, behind SGLang's router where asked (:func:`connect_nodes`).

An engine is a process of its own that imports torch and its model library, loads the model and
only then answers its health check; launched after the trainer's model was built, its start-up
(seconds on a CPU) was time every rank spent waiting. :class:`EarlyStart` launches the engines on
a background thread as soon as the config is checked, so that they come up on the machine's other
cores while the training processes import Megatron and build their shards;
:func:`megarl.trainer.run.setup` waits for them only where it hands them to the run. The scorer
(worker processes that import the reward function, or an in-process rule) starts at the same time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megarl.config import DTYPE_NAMES, AgentConfig, Config, resolve_model_path
from megarl.nodes import Node
from megarl.rewards.scorer import build_scorer
from megarl.rollout.group import EngineGroup
from megarl.rollout.sampling import SamplingParams

if TYPE_CHECKING:
    from megarl.rollout.router import Router
    # Imported where they start: this module is imported before the engines launch, and the chat
    # endpoint's server stack (FastAPI, transformers) would delay them by seconds.
    from megarl.agents.episode import EpisodeLimits
    from megarl.agents.openai_server import ChatEndpoint
    from megarl.agents.programs import ProgramPool
    from megarl.agents.workers import EnvironmentPool


class EarlyStart:
    """The engines, launching on a background thread (every node's first rank; engines given by
    ``rollout.engine_urls``: the first rank's), and the scorer and workers (first rank).

    Args:
        config: the run's config (checked).
        run_dir: the run directory; the engines' logs go to its ``engines/``.
        node: this process's node (it leads it).
    """

    def __init__(self, config: Config, run_dir: Path, node: Node):
        first = node.index == 0
        self._executor = concurrent.futures.ThreadPoolExecutor(3, thread_name_prefix="megarl-engine-start")
        self._engines = None
        if first or not config.rollout.engine_urls:
            self._engines = self._executor.submit(
                EngineGroup.from_config, config.rollout, resolve_model_path(config.model.path), log_dir=run_dir / "engines",
                **engine_settings(config), **node_settings(config, node),
            )
        self._teacher = self._executor.submit(start_teacher, config, run_dir, node) if first and config.algorithm.teacher_in_engines else None
        agent = config.agent
        self._environments = self._executor.submit(start_environments, agent) if first and agent.environment is not None else None
        self._programs = self._executor.submit(start_programs, agent) if first and agent.openai_agent is not None else None
        self._executor.shutdown(wait=False)
        self.scorer: Any = build_scorer(config.reward) if first else None
        """The reward scorer (``score(samples) -> ScoredBatch``; first rank)."""

    def engines(self) -> EngineGroup | None:
        """This node's engine group, once every engine is healthy; None on a node without engines.

        Raises:
            EngineStartError: an engine did not come up (the others were stopped).
        """
        return None if self._engines is None else self._engines.result()

    def teacher(self) -> EngineGroup | None:
        """The distillation teacher's engines (``algorithm.use_opd`` with ``opd_type`` sglang, first
        rank), once healthy; else None.

        Raises:
            EngineStartError: a teacher engine did not come up (the others were stopped).
        """
        return None if self._teacher is None else self._teacher.result()

    def environments(self) -> EnvironmentPool | None:
        """The environment workers of ``agent.environment``, once they loaded it; None without one.

        Raises:
            EnvironmentLoadError: the environment cannot be loaded (the workers were stopped).
        """
        return None if self._environments is None else self._environments.result()

    def programs(self) -> ProgramPool | None:
        """The agent program workers of ``agent.openai_agent``, once they imported it; None without one.

        Raises:
            EnvironmentLoadError: the program cannot be loaded (the workers were stopped).
        """
        return None if self._programs is None else self._programs.result()

    def tool_schemas(self) -> list[dict]:
        """The environment's tool declarations (none without an environment)."""
        environments = self.environments()
        return [] if environments is None else environments.tool_schemas()

    def close(self) -> None:
        """Stop what was started, for a set-up that fails before the run owns it: waits for the
        engines' start to end, then shuts them down."""
        for engines in (self._engines, self._teacher):
            with contextlib.suppress(Exception):
                if engines is not None:
                    engines.result().shutdown()
        for pool in (self._environments, self._programs):
            with contextlib.suppress(Exception):
                if pool is not None:
                    pool.result().close()
        with contextlib.suppress(Exception):
            if hasattr(self.scorer, "close"):
                self.scorer.close()


def engine_settings(config: Config) -> dict[str, Any]:
    """What the engines are told beyond the ``rollout`` section (:meth:`EngineGroup.from_config`'s
    overrides): their dtype (``rollout.dtype``, else ``model.dtype``) and, with
    ``algorithm.routing_replay`` r3, to return routed experts (launched engines get the flag,
    engines given by URL are checked for it, every generation asks for them)."""
    return {
        "dtype": DTYPE_NAMES[config.rollout.dtype or config.model.dtype],
        "return_routed_experts": config.algorithm.routing_replay == "r3",
    }


def node_settings(config: Config, node: Node) -> dict[str, Any]:
    """Where this node's launched engines run, listen and what they are called. Not colocated,
    they take the node's GPUs after its ranks' (rank ``i`` of the node computes on GPU ``i``):
    ``torchrun --nproc_per_node 4`` with two TP-2 engines uses GPUs 0-3 to train and 4-7 to
    generate. With several nodes they are named ``{kind}-n{node}-{i}``, listen on every interface
    and are called at this node's address (one node: the loopback)."""
    if config.rollout.engine_urls:
        return {}
    settings: dict[str, Any] = {} if config.rollout.colocate else {"first_gpu": node.ranks}
    if node.count > 1:
        host, address = node.engine_host()
        settings.update(node=node.index, host=host, address=address, num_nodes=node.count)
    return settings


def start_teacher(config: Config, run_dir: Path, node: Node) -> EngineGroup:
    """The distillation teacher's engines (first rank): ``teacher.num_engines`` of
    ``rollout.engine``'s kind on ``teacher.path``, named ``teacher-{i}`` (logs in the run's
    ``engines/``), in the rollout engines' dtype, never colocated and never sent weights (a dead
    one is restarted on its model's own weights within ``rollout.restart_budget``), on this node's
    GPUs after the training ranks' and, not colocated, the rollout engines'; or ``teacher.engine_urls``."""
    teacher, rollout = config.teacher, config.rollout
    served = dataclasses.replace(
        rollout, num_engines=teacher.num_engines, engine_tensor_parallel=teacher.engine_tensor_parallel, engine_urls=list(teacher.engine_urls),
        colocate=False, router="none", engine_kwargs={} if teacher.engine_urls else rollout.engine_kwargs,
    )
    # Engines given by URL need no directory; the snapshot's base model is never written for a teacher.
    model_dir = resolve_model_path(teacher.path or config.model.path)
    return EngineGroup.from_config(
        served, model_dir, log_dir=run_dir / "engines", dtype=engine_settings(config)["dtype"], name="teacher", first_gpu=node.ranks + rollout.reserved_gpus(),
    )


def connect_nodes(config: Config, engines: EngineGroup | None, nodes: list[list[int]]) -> Router | None:
    """Join the nodes' engines into one rollout (collective; after every node's engines are up).

    On several nodes the first rank's group learns every other node's engines
    (:meth:`EngineGroup.add_remote_engines`). With ``rollout.router: sglang`` the first rank starts
    the router, every node's first rank registers its engines with it, and the first rank's
    generation goes through it.

    Args:
        engines: this node's engine group (each node's first rank), else None.
        nodes: the global ranks of each node that has engines (one node: ``[[0]]``).

    Returns:
        the router (first rank, ``rollout.router: sglang``), else None.

    Raises:
        EngineMisconfigured: the router package is not installed.
        EngineStartError: the router did not start, or an engine did not register.
    """
    import torch.distributed as dist

    first = dist.get_rank() == 0
    if len(nodes) > 1:
        addresses: list = [None] * dist.get_world_size()
        dist.all_gather_object(addresses, engines.addresses() if engines is not None else None)
        if first:
            engines.add_remote_engines([address for ranks in nodes[1:] for address in addresses[ranks[0]]])
    if config.rollout.router != "sglang":
        return None
    from megarl.rollout.router import Router

    router, url = None, [None]
    if first:
        host, address = Node.from_env().engine_host()
        router = Router.launch(
            policy=config.rollout.router_policy, extra_args=config.rollout.router_args, log_dir=config.logging.resolved_run_dir() / "engines",
            host=host, address=address, request_timeout_s=config.rollout.request_timeout_s,
        )
        url = [router.url]
    dist.broadcast_object_list(url, src=0)
    if engines is not None:
        engines.use_router(router if first else Router.connect(url[0]), generate=first)
    dist.barrier()
    return router


def start_environments(agent: AgentConfig) -> EnvironmentPool:
    """The environment workers ``agent`` asks for."""
    import megarl.agents.toy  # noqa: F401 - registers the bundled environments
    from megarl.agents.workers import EnvironmentPool

    return EnvironmentPool(agent.environment, env_kwargs=agent.environment_kwargs(), num_workers=agent.num_workers, step_timeout_s=agent.step_timeout_s)


def start_programs(agent: AgentConfig) -> ProgramPool:
    """The agent program workers ``agent`` asks for."""
    from megarl.agents.programs import ProgramPool

    return ProgramPool(agent.openai_agent, num_workers=agent.num_workers, episode_timeout_s=agent.episode_timeout_s)


def episode_limits(config: Config) -> EpisodeLimits:
    """How long every episode of the run may run (the ``agent`` section, ``data.max_response_length``)."""
    from megarl.agents.episode import EpisodeLimits

    return EpisodeLimits(
        max_turns=config.agent.max_turns, max_response_tokens=config.data.max_response_length, max_tokens_per_turn=config.agent.max_tokens_per_turn
    )


def start_chat_endpoint(config: Config, engines: EngineGroup, tokenizer) -> ChatEndpoint:
    """The chat endpoint of ``agent.openai_agent`` programs, serving in front of ``engines``: the
    run's limits, its tool-call parser (``hermes`` when ``agent.tool_parser`` is null) and no tools
    of its own (a program declares its tools in its requests); each episode is opened with its
    round's sampling."""
    from megarl.agents.openai_server import ChatEndpoint

    sampling = SamplingParams.from_config(config.rollout, max_new_tokens=config.data.max_response_length, seed=None)
    endpoint = ChatEndpoint(engines, tokenizer, sampling, episode_limits(config), config.agent.tool_parser or "hermes")
    endpoint.start()
    return endpoint
