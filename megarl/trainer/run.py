"""Everything a training run holds, built once: :func:`setup` and :class:`Run`.

Every rank builds its shard of the policy (and critic), the weight streams and the data loader;
every node's first rank runs that node's rollout engines (weight updates, memory, restarts); the
first rank alone generates on all of them (through the router with ``rollout.router: sglang``),
runs the reward scorer and the metric sinks (it broadcasts what it generates and scores, see
:mod:`megarl.train`). A resumed run loads its checkpoint here and streams the restored weights
into the engines before the first rollout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
import transformers

from megarl import parallel, platform
from megarl.nodes import Node, node_ranks
from megarl.algorithms.kl import kl_controller
from megarl.algorithms.shaping import RunningMoments
from megarl.config import Config, ModelFacts, layout_multiple, resolve_model_path, resolve_steps, validate
from megarl.data.datasets import PromptDataset, PromptLoader, load_prompts
from megarl.models.builder import DTYPES
from megarl.models.specs import choose_backend
from megarl import checkpoint
from megarl.resume import agreed_resume, checkpoint_name
from megarl.trainer.critic import Critic, attach_value_heads
from megarl.trainer.launch import EarlyStart, connect_nodes, start_chat_endpoint
from megarl.metrics import MetricsLogger
from megarl.trainer.model import TrainModel
from megarl.trainer.offload import Offload
from megarl.trainer.policy import Policy, attach_hidden_states_heads
from megarl.trainer.reference import ReferencePolicy
from megarl.trainer.teacher import MegatronTeacher
from megarl.weights.stream import WeightStream

if TYPE_CHECKING:
    from megarl.trainer.async_rollout import AsyncRollout

log = logging.getLogger("megarl")

@dataclasses.dataclass
class Run:
    """A training run's state on one rank.

    Attributes:
        config: the resolved config.
        run_dir: where metrics, the resolved config and (by default) checkpoints go.
        pg_collection: Megatron's process groups.
        tokenizer: the policy's tokenizer.
        train_set, val_set: the prompts (``val_set`` None without validation files).
        loader: the training prompts, resumable.
        policy: the policy under training.
        reference: the initial policy for KL terms, or None when no KL term needs it.
        critic: the value model with GAE, else None.
        streams: the weight streams from the policy's shards to the engines: one to each node's
            first rank (one node, or engines given by URL: one, to the first rank).
        engines: this node's rollout engines (each node's first rank; None elsewhere); the first
            rank's also generates on every other node's.
        scorer: the reward scorer (first rank only).
        logger: the metric sinks (writes on the first rank only).
        kl_controller: the reward KL penalty's coefficient.
        reward_moments: running moments of ``algorithm.reward_norm: running``.
        launched_at: unix time the command started (the first thing ``megarl.train.main`` does):
            the end-of-run summary counts from it (:mod:`megarl.report`).
        start_step: the first step to run (after a resume, the step after the checkpoint's).
    """

    config: Config
    run_dir: Path
    pg_collection: Any
    tokenizer: Any
    train_set: PromptDataset
    val_set: PromptDataset | None
    loader: PromptLoader
    policy: Policy
    reference: ReferencePolicy | None
    critic: Critic | None
    streams: list[WeightStream]
    engines: Any
    scorer: Any
    logger: MetricsLogger
    kl_controller: Any
    reward_moments: RunningMoments
    launched_at: float
    start_step: int = 0
    last_checkpoint: Path | None = None
    """The newest checkpoint of this run: the one it resumed from, then each it saves."""
    saving: Path | None = None
    """The checkpoint a save in progress writes, None between saves (see :meth:`newest_checkpoint`)."""
    reward_failure_shown: bool = False
    """Whether the first sample that failed to score has been shown (once per run)."""
    weight_version: int = 0
    """The version of the weights last pushed to the engines (:meth:`sync_weights`); 0: the weights
    they launched with. A trained sample's staleness is measured against it."""
    rollout: AsyncRollout | None = None
    """``rollout.mode: async``: the producer that generates ahead of training (first rank)."""
    pending_prompts: list[int] = dataclasses.field(default_factory=list)
    """Prompts (positions in ``train_set``) drawn before the checkpoint resumed from but not trained
    yet: an async run generates them first."""
    rollout_rounds: int = 0
    """Rounds an async run has started (their sampling seeds and group ids follow from it)."""
    keep_rate: float = 1.0
    """Dynamic sampling's running estimate of the fraction of prompt groups its filter keeps: a
    synchronous step generates the prompts it will likely need in one call sized by it
    (:func:`megarl.trainer.loop.collect_batch`)."""
    scoring_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    """The scorer serves one caller at a time (the async producer scores while validation runs)."""
    environments: Any = None
    """``agent.environment``: the environment workers of multi-turn episodes
    (:class:`megarl.agents.workers.EnvironmentPool`, first rank); None: single-turn rollouts."""
    tools: tuple[dict, ...] = ()
    """The environment's tool declarations, rendered into every prompt (every rank)."""
    programs: Any = None
    """``agent.openai_agent``: the workers that run the agent program
    (:class:`megarl.agents.programs.ProgramPool`, first rank)."""
    endpoint: Any = None
    """``agent.openai_agent``: the chat endpoint the programs call, in front of the engines
    (:class:`megarl.agents.openai_server.ChatEndpoint`, first rank)."""
    environment_failure_shown: bool = False
    """Whether the first episode an environment or agent program failed has been shown (once per run)."""
    router: Any = None
    """``rollout.router: sglang``: the router process in front of every engine (first rank)."""
    teacher: Any = None
    """``algorithm.use_opd`` with ``opd_type`` sglang: the distillation teacher's engines (an
    :class:`~megarl.rollout.group.EngineGroup`, first rank)."""
    offload: Offload = dataclasses.field(default_factory=lambda: Offload([], ()))
    """``train.offload``: moves the policy's and the critic's state to the host and back (every rank)."""
    teacher_model: MegatronTeacher | None = None
    """``algorithm.use_opd`` with ``opd_type`` megatron: the distillation teacher's Megatron shard
    (every rank), which scores each step's batch after the old log-probs."""

    @property
    def plays_episodes(self) -> bool:
        """Whether rollouts are multi-turn episodes (an environment or an agent program; first rank)."""
        return self.environments is not None or self.programs is not None

    @property
    def is_first_rank(self) -> bool:
        return dist.get_rank() == 0

    @property
    def pad_multiple(self) -> int:
        """Sequence lengths are rounded up to this multiple (:func:`megarl.config.layout_multiple`)."""
        parallel = self.config.parallel
        return layout_multiple(parallel.tensor, parallel.sequence_parallel, parallel.context)

    @property
    def checkpoint_dir(self) -> Path:
        return self.config.resolved_checkpoint_dir()

    def score(self, samples: list[dict[str, Any]]) -> Any:
        """Score reward-function keyword arguments (first rank): the scorer's ``ScoredBatch``."""
        with self.scoring_lock:
            return self.scorer.score(samples)

    def train_state(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the models: data position, controllers, counters; in
        async mode also the prompts drawn but not trained yet (``pending_prompts``) and the rounds
        started, taken together with the data position."""
        return {
            **({"data": self.loader.state_dict()} if self.rollout is None else self.rollout.state_dict()),
            "kl_coefficient": self.kl_controller.value,
            "reward_moments": dataclasses.asdict(self.reward_moments),
            "consecutive_skips": self.policy.consecutive_skips,
            "critic_consecutive_skips": self.critic.consecutive_skips if self.critic is not None else 0,
            "engine_restarts": self._restarts_by_node(),
            "keep_rate": self.keep_rate,
            "freeze_moe_router": self.config.model.freeze_moe_router,
        }

    def load_train_state(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state["data"])
        self.pending_prompts = list(state.get("pending_prompts", []))
        self.rollout_rounds = state.get("rollout_rounds", 0)
        self.keep_rate = state.get("keep_rate", 1.0)
        self.kl_controller.value = state["kl_coefficient"]
        self.reward_moments = RunningMoments(**state["reward_moments"])
        self.policy.consecutive_skips = state["consecutive_skips"]
        if self.critic is not None:
            self.critic.consecutive_skips = state["critic_consecutive_skips"]
        if self.engines is not None:
            # rollout.restart_budget is for the whole run (per node), resumed or not; a checkpoint
            # written before runs on several nodes holds one count.
            restarts = state["engine_restarts"]
            by_node = restarts if isinstance(restarts, list) else [restarts]
            node = Node.from_env().index
            self.engines.restarts = by_node[node] if node < len(by_node) else 0

    def save(self, step: int) -> Path:
        """Save a checkpoint after ``step`` (collective); state offloaded to the host
        (``train.offload``) comes back to the device for it."""
        self.saving = self.checkpoint_dir / checkpoint_name(step)
        with self.offload.resident():
            self.last_checkpoint = checkpoint.save_checkpoint(
                self.checkpoint_dir,
                step,
                self.policy.model.models,
                self.policy.model.optimizer,
                self.policy.model.scheduler,
                train_state=self.train_state(),
                hf_dir=resolve_model_path(self.config.model.path),
                tokenizer_dir=self.config.model.tokenizer_path,
                keep_last=self.config.checkpoint.keep_last,
                extra_models=self._extra_models(),
            )
        self.saving = None
        return self.last_checkpoint

    def newest_checkpoint(self) -> Path | None:
        """What ``checkpoint.resume=auto`` goes on from after this run stops: the last checkpoint it
        saved or resumed from, or the one a save interrupted by Ctrl-C had already committed (the
        checkpoint's folder appears under its final name only once it is whole)."""
        if self.saving is not None and self.saving.is_dir():
            return self.saving
        return self.last_checkpoint

    def export_hf(self) -> Path:
        """Write the policy as a HF model directory, ``<run_dir>/hf`` (collective)."""
        with self.offload.resident():
            return self.policy.model.export_hf(self.run_dir / "hf", self.config.model)

    def _extra_models(self) -> dict[str, tuple] | None:
        if self.critic is None:
            return None
        model = self.critic.model
        return {"critic": (model.models, model.optimizer, model.scheduler)}

    def sync_weights(self, version: int) -> dict[str, float]:
        """Stream the policy's weights into the engines (collective: every rank drives the streams,
        each node's first rank hands its stream's buckets to its engines). On several nodes the
        update starts once every rank is here (the first rank paused generation before) and
        ends once every node's engines hold it (the first rank then lets generation go on).

        Returns:
            ``weights/sync_s`` and ``weights/sync_gbps`` (GB/s of bucket bytes, per node).
        """
        start = time.perf_counter()
        self.wait_for_nodes()
        for stream in self.streams:
            buckets = stream.buckets()
            if stream.is_destination and self.engines is not None:
                self.engines.update_weights(buckets, version=version)
            for _ in buckets:
                pass  # ranks without engines: the iteration drives the transfers
            if self.config.rollout.colocate:
                # The engines share the devices: the bucket buffers go back to them between updates.
                stream.release_buffers()
        self.wait_for_nodes()
        self.weight_version = version
        seconds = time.perf_counter() - start
        total = sum(meta.end - meta.start for metas in self.streams[0].bucket_metas for meta in metas)
        return {"weights/sync_s": seconds, "weights/sync_gbps": total / max(seconds, 1e-9) / 1e9}

    @property
    def several_nodes(self) -> bool:
        """Whether every node's first rank runs engines of its own (a stream to each)."""
        return len(self.streams) > 1

    def wait_for_nodes(self) -> None:
        """Return once every rank got here (collective), on several nodes; at once on one."""
        if self.several_nodes:
            dist.barrier()

    def _restarts_by_node(self) -> list[int]:
        """Engine restarts so far on each node (collective on several nodes)."""
        mine = self.engines.restarts if self.engines is not None else 0
        if not self.several_nodes:
            return [mine]
        gathered: list[tuple[int, int]] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(gathered, (Node.from_env().index, mine))
        by_node = [0] * (max(node for node, _ in gathered) + 1)
        for node, restarts in gathered:
            by_node[node] = max(by_node[node], restarts)
        return by_node

    def close(self) -> None:
        """Stop the producer, the engines (the teacher's too) and the scorer and close the sinks (also on errors).
        The scorer closes last: the async producer may be scoring a round until its engines are gone."""
        with contextlib.suppress(Exception):
            if self.rollout is not None:
                self.rollout.close()
        with contextlib.suppress(Exception):
            if self.engines is not None:
                self.engines.shutdown()
        with contextlib.suppress(Exception):
            if self.router is not None:
                self.router.stop()
        with contextlib.suppress(Exception):
            if self.teacher is not None:
                self.teacher.shutdown()
        with contextlib.suppress(Exception):
            if self.rollout is not None:
                self.rollout.join()
        for agent_part in (self.environments, self.programs, self.endpoint):
            with contextlib.suppress(Exception):
                if agent_part is not None:
                    agent_part.close()
        with contextlib.suppress(Exception):
            if self.scorer is not None and hasattr(self.scorer, "close"):
                self.scorer.close()
        self.logger.close()



def setup(config: Config, started: EarlyStart | None = None, *, launched_at: float) -> Run:
    """Build a run on this rank: process groups, data, models, weight stream, engines, scorer and
    sinks; resume from a checkpoint when ``checkpoint.resume`` finds one. With ``train.total_epochs``
    it sets ``config.train.steps`` once the prompts are counted (the run directory's config.yaml
    keeps the epochs).

    Args:
        launched_at: unix time the command started (:attr:`Run.launched_at`).
        started: on each node's first rank, the node's engines (and on the first rank the scorer
            and the environment or agent program workers), started before the heavy imports
            (:mod:`megarl.trainer.launch`); None there starts them once the process groups are
            up. The run owns them from here on (a set-up that fails stops them).

    Raises:
        ConfigError: the config does not fit the world size or the model.
    """
    try:
        detected = platform.init_distributed()
        node = Node.from_env()
        if node.leads and started is None:
            run_dir = config.logging.resolved_run_dir()
            run_dir.mkdir(parents=True, exist_ok=True)
            started = EarlyStart(config, run_dir, node)
        return _setup(config, started, detected, launched_at)
    except BaseException:
        if started is not None:
            started.close()
        raise


def _setup(config: Config, started: EarlyStart | None, detected: platform.Platform, launched_at: float) -> Run:
    world_size = dist.get_world_size()
    model_dir = resolve_model_path(config.model.path)
    model_facts = ModelFacts.from_hf_dir(model_dir)
    validate(config, world_size, model_facts)
    pg_collection = parallel.initialize(config.parallel)
    parallel.seed(config.model.seed)
    first = dist.get_rank() == 0
    run_dir = config.logging.resolved_run_dir()
    if first:
        run_dir.mkdir(parents=True, exist_ok=True)
    # The environment's tools go into every prompt, on every rank (the prompts' lengths decide
    # which are kept, and with them the run's length).
    shared = [started.tool_schemas() if first else None]
    if config.agent.enabled:
        dist.broadcast_object_list(shared, src=0)
    tools = tuple(shared[0] or ())

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(config.model.tokenizer_path or model_dir), local_files_only=True)
    train_set = load_prompts(config.data, tokenizer, "train", tools=tools)
    if config.train.steps is None:
        config.train.steps = resolve_steps(config, len(train_set))
        # The checks that need the run's length waited for it.
        validate(config, world_size, model_facts)
    val_set = load_prompts(config.data, tokenizer, "val", tools=tools) if config.data.val_files else None
    loader = PromptLoader(
        train_set, config.rollout.batch_size, shuffle=config.data.shuffle, seed=config.data.seed, file_weights=config.data.train_file_weights
    )

    dtype = DTYPES[config.model.dtype]
    backend = choose_backend(
        config.model.attention_backend, detected.has_transformer_engine, packed_fp32=config.train.packing and config.model.dtype == "fp32"
    )
    log.info(
        "%d processes on %s (%s); layers: %s; layout TP %d, PP %d, CP %d, EP %d, DP %d",
        world_size, detected.device.type, detected.backend, "Transformer Engine" if backend == "te" else "portable torch (SDPA)",
        config.parallel.tensor, config.parallel.pipeline, config.parallel.context, config.parallel.expert,
        config.parallel.data_parallel(world_size),
    )
    train, algorithm = config.train, config.algorithm
    warning = train.warmup_clamped()
    if warning and first:
        log.warning(warning)
    policy_model = TrainModel.build(
        str(model_dir), config.model, config.parallel, train, train.optimizer, pg_collection=pg_collection, backend=backend,
        after_load=attach_hidden_states_heads if train.fused_linear_logprob else None, routing_replay=algorithm.routing_replay != "none",
    )
    policy = Policy(policy_model, algorithm, train, temperature=config.rollout.temperature, max_response_length=config.data.max_response_length)
    needs_reference = algorithm.use_kl_loss or algorithm.use_kl_in_reward
    reference = ReferencePolicy(policy_model.chunks) if needs_reference else None
    critic = None
    if config.critic_enabled:
        critic_dir = resolve_model_path(config.critic.path) if config.critic.path else model_dir
        critic_model = TrainModel.build(
            str(critic_dir), config.model, config.parallel, train, config.critic.optimizer, pg_collection=pg_collection, backend=backend,
            after_load=attach_value_heads,
        )
        critic = Critic(
            critic_model, config.critic, loss_agg_mode=algorithm.loss_agg_mode, max_response_length=config.data.max_response_length, seed=train.seed
        )
    teacher_model = MegatronTeacher.build(config, pg_collection=pg_collection, backend=backend) if algorithm.teacher_in_megatron else None
    # Buckets handed to SGLang over CUDA IPC must not be rewritten while it may still read them.
    cuda_ipc = config.rollout.weight_transport == "tensor" and detected.device.type == "cuda"
    # Engines on every node (launched, several nodes): a stream to each node's first rank, fed from
    # its own node where it can be; engines given by URL are the first rank's alone.
    nodes = node_ranks()
    targets = nodes if len(nodes) > 1 and not config.rollout.engine_urls else [[0]]
    streams = [
        WeightStream(
            policy_model.chunks, policy_model.spec, pg_collection, bucket_mb=config.rollout.bucket_mb, dtype=dtype, dst=ranks[0],
            recycle_buffers=not cuda_ipc, nearby=ranks,
        )
        for ranks in targets
    ]

    scorer = None
    logger = MetricsLogger(config.logging, run_dir, enabled=first, run_settings=config.to_dict())
    environments = programs = endpoint = teacher = None
    engines = started.engines() if started is not None else None
    router = connect_nodes(config, engines, targets)
    if first:
        scorer, environments, programs, teacher = started.scorer, started.environments(), started.programs(), started.teacher()
        endpoint = start_chat_endpoint(config, engines, tokenizer) if programs is not None else None
    run = Run(
        config=config,
        run_dir=run_dir,
        pg_collection=pg_collection,
        tokenizer=tokenizer,
        train_set=train_set,
        val_set=val_set,
        loader=loader,
        policy=policy,
        reference=reference,
        critic=critic,
        streams=streams,
        engines=engines,
        router=router,
        teacher=teacher,
        teacher_model=teacher_model,
        offload=Offload([policy_model] + ([critic.model] if critic is not None else []), train.offload),
        scorer=scorer,
        environments=environments,
        programs=programs,
        endpoint=endpoint,
        tools=tools,
        logger=logger,
        kl_controller=kl_controller(algorithm.kl_ctrl, init_coef=algorithm.kl_coef, target=algorithm.kl_target, horizon=algorithm.kl_horizon),
        reward_moments=RunningMoments(),
        launched_at=launched_at,
    )
    try:
        resume_from, contents = agreed_resume(config.checkpoint.resume, run.checkpoint_dir, config.checkpoint.load_contents)
        if resume_from is not None:
            state = checkpoint.load_checkpoint(
                resume_from,
                policy_model.models,
                policy_model.optimizer,
                policy_model.scheduler,
                extra_models=run._extra_models(),
                contents=contents,
            )
            if contents == "all":
                run.load_train_state(state)
                run.start_step = state["step"] + 1
                run.last_checkpoint = resume_from
            # The engines start from the HF weights; give them the restored policy (the version the
            # step to run would have synced: 0 for a new run from the weights alone).
            run.sync_weights(version=run.start_step)
            log.info(
                "resumed from %s: the run goes on at step %d" if contents == "all" else "loaded the weights of %s: a new run starts at step %d",
                resume_from, run.start_step,
            )
        if first and config.rollout.mode == "async":
            from megarl.trainer.async_rollout import AsyncRollout

            run.rollout = AsyncRollout(run)
        elif first and config.rollout.mode == "sync" and run.pending_prompts:
            log.warning(
                "the checkpoint holds %d prompts an async run had drawn but not trained; rollout.mode sync goes on "
                "from the data position and skips them", len(run.pending_prompts),
            )
    except BaseException:
        run.close()
        raise
    return run
