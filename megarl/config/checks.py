"""The checks that read several sections at once, and :func:`validate`, which runs every check that
needs the model or the world size, listing every violation with its fix.

A rule lives with the section it guards: each section checks its declared ranges and its own
cross-field rules when it is built (:class:`~megarl.config.base.Section`); the training layout
against the model and the world size is :func:`~megarl.config.model.layout_errors`, beside
``ParallelConfig``; the engines' tensor parallelism against the model is
:meth:`RolloutConfig.layout_errors <megarl.config.rollout.RolloutConfig.layout_errors>`. The rules
here belong to no one section: the sequence (``data``'s lengths against ``parallel.context``, the
model's positions, ``train``'s token budget, ``rollout``'s stop tokens and ``algorithm``'s overlong
penalty), the batch hierarchy (``train``'s sizes against ``rollout``'s groups, the data-parallel
size and what ``algorithm`` needs of a group, ``data.val_files`` for ``train.eval_every``) and the
critic (``critic`` against ``algorithm`` and ``train.steps``) and the distillation teacher (``teacher``
against ``algorithm.use_opd``, ``algorithm.opd_type`` and ``rollout.temperature``).
"""

from __future__ import annotations

from megarl.config.base import ConfigError, _divisors, _one_of
from megarl.config.model import ModelFacts, layout_errors, layout_multiple
from megarl.config.root import Config
from megarl.config.teacher import TeacherConfig
from megarl.config.train import _steps_named


def _sequence_errors(config: Config, model_facts: ModelFacts) -> list[str]:
    data, cp = config.data, config.parallel.context
    sequence = data.max_prompt_length + data.max_response_length
    lengths = f"`data.max_prompt_length` + `data.max_response_length` ({data.max_prompt_length} + {data.max_response_length} = {sequence})"
    errors = []
    if cp > 1 and sequence % (2 * cp):
        padded = -(-sequence // (2 * cp)) * 2 * cp
        errors.append(
            f"{lengths} must be divisible by 2 x `parallel.context` ({2 * cp}): each CP rank holds two load-balanced "
            f"chunks; raise data.max_prompt_length by {padded - sequence}"
        )
    if sequence > model_facts.max_position_embeddings:
        errors.append(
            f"{lengths} exceeds the model's max_position_embeddings ({model_facts.max_position_embeddings}): lower them"
        )
    train, parallel = config.train, config.parallel
    # Packed, a sample is rounded up to the layout's multiple, and so is a pack of one.
    multiple = layout_multiple(parallel.tensor, parallel.sequence_parallel, cp) if train.packing else 1
    longest = -(-sequence // multiple) * multiple
    for budget in ("max_tokens_per_micro_batch", "forward_max_tokens_per_micro_batch"):
        tokens = getattr(train, budget)
        if train.dynamic_batch and tokens is not None and tokens < longest:
            rounded = f", rounded up to the layout's multiple {multiple}" if longest != sequence else ""
            errors.append(f"`train.{budget}` ({tokens}) must hold one full sequence, {lengths}{rounded}: set it to at least {longest}")
    if train.packing and config.model.moe_aux_loss_coeff and config.model.moe_router_load_balancing_type == "seq_aux_loss":
        errors.append(
            "`model.moe_router_load_balancing_type` (seq_aux_loss) balances each sequence, and with `train.packing` Megatron would "
            "take a whole pack for one sequence: use aux_loss or global_aux_loss, or set train.packing=false"
        )
    if config.algorithm.routing_replay != "none" and model_facts.num_experts == 0:
        errors.append(
            f"`algorithm.routing_replay` ({config.algorithm.routing_replay}) replays MoE routing, but the model is dense: "
            "set algorithm.routing_replay=none"
        )
    if config.model.freeze_moe_router and model_facts.num_experts == 0:
        errors.append("`model.freeze_moe_router` freezes MoE routers, but the model is dense: set model.freeze_moe_router=false")
    context_length = config.rollout.engine_kwargs.get("context_length")
    if isinstance(context_length, int) and not isinstance(context_length, bool) and not sequence <= context_length <= model_facts.max_position_embeddings:
        errors.append(
            f"`rollout.engine_kwargs.context_length` ({context_length}) must be >= {lengths} (the engines serve no longer sequence) "
            f"and <= the model's max_position_embeddings ({model_facts.max_position_embeddings})"
        )
    out_of_vocab = [token for token in config.rollout.stop_token_ids if token >= model_facts.vocab_size]
    if out_of_vocab:
        errors.append(f"`rollout.stop_token_ids` {out_of_vocab} are outside the model's vocabulary (size {model_facts.vocab_size}): remove them")
    algorithm = config.algorithm
    if algorithm.overlong_penalty and algorithm.overlong_buffer_length > data.max_response_length:
        errors.append(
            f"`algorithm.overlong_buffer_length` ({algorithm.overlong_buffer_length}) must be <= `data.max_response_length` "
            f"({data.max_response_length}): the penalty ramps over the last tokens before the limit"
        )
    return errors


def _batch_errors(config: Config, data_parallel: int) -> list[str]:
    train, rollout, algorithm = config.train, config.rollout, config.algorithm
    group = rollout.n_samples_per_prompt
    errors = []
    round_size = rollout.batch_size * group
    if train.global_batch_size < round_size:
        errors.append(
            f"`train.global_batch_size` ({train.global_batch_size}) must be >= `rollout.batch_size` ({rollout.batch_size}) x "
            f"`rollout.n_samples_per_prompt` ({group}) = {round_size}: the train batch holds at least one rollout round; "
            f"raise train.global_batch_size to {round_size} or lower rollout.batch_size"
        )
    if train.global_batch_size % group:
        errors.append(
            f"`train.global_batch_size` ({train.global_batch_size}) must be a multiple of `rollout.n_samples_per_prompt` "
            f"({group}) so that it holds whole groups: set it to {-(-train.global_batch_size // group) * group}"
        )
    if train.global_batch_size % train.mini_batch_size:
        fitting = [size for size in _divisors(train.global_batch_size) if size % data_parallel == 0]
        fix = f"set train.mini_batch_size to {_one_of(fitting[-4:])}" if fitting else f"make train.global_batch_size a multiple of DP ({data_parallel})"
        errors.append(
            f"`train.mini_batch_size` ({train.mini_batch_size}) must divide `train.global_batch_size` ({train.global_batch_size}): {fix}"
        )
    if train.mini_batch_size % data_parallel:
        errors.append(
            f"`train.mini_batch_size` ({train.mini_batch_size}) must be divisible by data parallel ({data_parallel}): "
            f"each rank trains mini_batch_size / DP samples; set it to a multiple of {data_parallel}"
        )
    elif not train.dynamic_batch and train.mini_batch_size % (train.micro_batch_size * data_parallel):
        errors.append(
            f"`train.micro_batch_size` ({train.micro_batch_size}) x data parallel ({data_parallel}) = "
            f"{train.micro_batch_size * data_parallel} must divide `train.mini_batch_size` ({train.mini_batch_size}): "
            f"set train.micro_batch_size to {_one_of(_divisors(train.mini_batch_size // data_parallel))}"
        )
    if group < 2:
        reasons = []
        if algorithm.advantage_estimator in ("grpo", "rloo", "reinforce_pp_baseline", "opo", "gpg", "grpo_passk", "optimal_token_baseline"):
            reasons.append(f"`algorithm.advantage_estimator` ({algorithm.advantage_estimator}) compares the samples of a prompt")
        if algorithm.reward_norm == "group":
            reasons.append("`algorithm.reward_norm` (group) normalises within each prompt's samples")
        if algorithm.dynamic_sampling:
            reasons.append("`algorithm.dynamic_sampling` drops groups whose scores are all equal")
        errors += [f"{reason}: `rollout.n_samples_per_prompt` ({group}) must be >= 2" for reason in reasons]
    if algorithm.advantage_estimator == "remax":
        # The greedy baselines are generated with each synchronous single-turn round.
        if rollout.mode == "async":
            errors.append("`algorithm.advantage_estimator` (remax) generates its greedy baselines in synchronous rounds: set rollout.mode=sync")
        if config.agent.enabled:
            errors.append("`algorithm.advantage_estimator` (remax) has no greedy baseline for multi-turn episodes: choose grpo or rloo")
        if algorithm.reward_norm != "none":
            errors.append(
                f"`algorithm.reward_norm` ({algorithm.reward_norm}) would put the scores on another scale than remax's greedy "
                "baselines (the reward function's own): set algorithm.reward_norm=none"
            )
    if train.eval_every and not config.data.val_files:
        errors.append(f"`train.eval_every` ({train.eval_every}) needs `data.val_files`: list validation files or set train.eval_every=0")
    if train.val_before_train and not config.data.val_files:
        errors.append("`train.val_before_train` needs `data.val_files`: list validation files or set train.val_before_train=false")
    if train.val_only and not config.data.val_files:
        errors.append("`train.val_only` needs `data.val_files`: list validation files or set train.val_only=false")
    return errors


def _critic_errors(config: Config) -> list[str]:
    critic, estimator = config.critic, config.algorithm.advantage_estimator
    if config.critic_enabled:
        if config.train.steps is not None and critic.warmup_steps >= config.train.steps:
            return [f"`critic.warmup_steps` ({critic.warmup_steps}) must be < {_steps_named(config.train)}: otherwise the policy never trains"]
        return []
    unused = []
    if critic.path is not None:
        unused.append("`critic.path`")
    if critic.warmup_steps:
        unused.append("`critic.warmup_steps`")
    if unused:
        return [
            f"{' and '.join(unused)} set but `algorithm.advantage_estimator` ({estimator}) trains no critic: "
            f"remove them or set algorithm.advantage_estimator=gae"
        ]
    return []


def _teacher_errors(config: Config) -> list[str]:
    """On-policy distillation and its teacher: one needs the other, in the form ``algorithm.opd_type``
    runs it in, and the teacher's log-probs (SGLang's ``input_token_logprobs``, or the Megatron
    teacher's, both of the raw logits) compare with the policy's only at temperature 1 (the
    trainer divides its logits by ``rollout.temperature``)."""
    algorithm, teacher = config.algorithm, config.teacher
    if not algorithm.use_opd:
        if teacher.configured:
            return ["the `teacher` section is set but `algorithm.use_opd` is false: set algorithm.use_opd=true or remove teacher.path / teacher.engine_urls"]
        return []
    errors = []
    if algorithm.opd_type == "megatron":
        errors += _megatron_teacher_errors(teacher)
    elif not teacher.configured:
        errors.append("`algorithm.use_opd` needs a teacher: set teacher.path (a HF model directory or bundled:NAME) or teacher.engine_urls")
    if config.rollout.temperature != 1:
        errors.append(
            f"`rollout.temperature` ({config.rollout.temperature}) must be 1 with `algorithm.use_opd`: the teacher's log-probs are "
            "those of its raw logits (SGLang's prompt log-probs apply no temperature, nor does the Megatron teacher), the policy's are at "
            "the sampling temperature"
        )
    return errors


def _megatron_teacher_errors(teacher: TeacherConfig) -> list[str]:
    """``algorithm.opd_type: megatron`` builds the teacher from its weights inside the trainer: it
    needs ``teacher.path``, and the engine settings have nothing to act on."""
    errors = []
    if teacher.path is None:
        errors.append(
            "`algorithm.opd_type` (megatron) builds the teacher in the trainer from its weights: set teacher.path "
            "(a HF model directory or bundled:NAME)"
        )
    if teacher.engine_urls:
        errors.append(
            "`teacher.engine_urls` is set but `algorithm.opd_type` (megatron) runs the teacher in the trainer, not in engines: "
            "remove teacher.engine_urls and set teacher.path, or set algorithm.opd_type=sglang"
        )
    defaults = TeacherConfig()
    for name in ("num_engines", "engine_tensor_parallel"):
        value = getattr(teacher, name)
        if value != getattr(defaults, name):
            errors.append(
                f"`teacher.{name}` ({value}) sets the teacher's engines, but `algorithm.opd_type` (megatron) launches none "
                f"(the teacher takes the training layout): remove teacher.{name} or set algorithm.opd_type=sglang"
            )
    return errors


def _offload_errors(config: Config) -> list[str]:
    """``train.offload`` frees the devices for engines that share them; engines on devices of their
    own (``rollout.colocate`` false, which ``rollout.mode: async`` needs) would gain nothing and
    every step would pay the copies, so the setting is refused rather than ignored."""
    if config.train.offload and not config.rollout.colocate:
        return [
            f"`train.offload` ({config.train.offload}) frees the GPUs for colocated engines, but `rollout.colocate` is false: "
            "set train.offload=[] (the engines have devices of their own)"
        ]
    return []


def validate(config: Config, world_size: int, model_facts: ModelFacts) -> None:
    """Check the config against itself, the model and the world size, before anything is built.

    With ``train.total_epochs`` the checks that need the run's length wait for :func:`resolve_steps`;
    call this again once it has set ``train.steps``.

    Args:
        config: a loaded config (each section already checked its own ranges).
        world_size: the number of training processes.
        model_facts: the policy model's dimensions (:meth:`ModelFacts.from_hf_dir`).

    Raises:
        ConfigError: listing every violation on its own line, each naming the fields, their values
            and the fix.
    """
    if world_size < 1:
        raise ConfigError(f"world size ({world_size}) must be >= 1")
    # A layout error is reported once; the batch checks then use the DP the layout would give.
    data_parallel = max(1, config.parallel.data_parallel(world_size))
    errors = (
        layout_errors(config.parallel, world_size, model_facts)
        + config.rollout.layout_errors(model_facts)
        + _sequence_errors(config, model_facts)
        + _batch_errors(config, data_parallel)
        + _critic_errors(config)
        + _teacher_errors(config)
        + _offload_errors(config)
    )
    if errors:
        raise ConfigError(f"invalid configuration for world size {world_size}:\n  - " + "\n  - ".join(errors))
