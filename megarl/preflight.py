"""What a run checks before it imports torch or Megatron, starts an engine or builds a model.

``megarl.train`` runs :func:`check_run` on the first rank right after loading the config, and
``python -m megarl.config`` runs the same checks, so that a typo in a path, a reward file that does
not import or a damaged checkpoint is reported in about a second, not after the model is built
and the first rollout generated. Each problem is one line naming the setting, the file (and row
or line) and what to do; all the problems found are reported together.

What is checked: the config against the world size and the model (:func:`megarl.config.validate`);
the model directories (config.json, safetensors weights, a tokenizer); the first row of every data
file (readable, the prompt and answer fields present); the reward (a user function imports and
takes megarl's or verl's arguments; a reward model directory exists; a remote URL is http(s)); the
optional metric packages asked for; colocated engines that fit a node's GPUs; the distillation
teacher's directory, its tokenizer against the policy's and, built in Megatron, the training layout
against it. Then, once all of that passed, the two checks that import
torch: the advantage estimator and the policy loss the config names are registered
(:mod:`megarl.algorithms`), the checkpoint a resume would load is whole, and, with routing replay
(R3), the engines given by URL return routed experts; with SGLang's router, its package and flags,
and no R3 behind it; ``rollout.engine_kwargs`` against the engine's own arguments.

``megarl.sft`` runs :func:`check_sft_run` the same way: the model directory, the config
(:func:`megarl.config.sft.validate_sft`), every row of every conversation file, the metric
packages, then the checkpoint a resume would load.
"""

from __future__ import annotations

import json

from megarl.config import Config, ConfigError, ModelFacts, did_you_mean, layout_errors, resolve_data_path, resolve_model_path, validate
from megarl.config.sft import SFTConfig, validate_sft
from megarl.metrics import sink_problems

_TOKENIZER_FILES = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("vocab.txt",))
"""Any one of these sets of files makes a tokenizer transformers can load."""


def check_run(config: Config, world_size: int) -> list[str]:
    """Every problem with ``config``'s inputs for a run of ``world_size`` processes, one line each
    (empty: the run can start)."""
    problems = _model_problems(config)
    if not problems:
        try:
            validate(config, world_size, ModelFacts.from_hf_dir(resolve_model_path(config.model.path)))
        except ConfigError as error:
            problems.append(str(error))
    problems += _data_problems(config) + _reward_problems(config) + _agent_problems(config) + _engine_problems(config) + _teacher_problems(config, world_size)
    problems += sink_problems(config.logging)
    if not problems:
        # Last, once every cheap check passed: these import torch (the run imports it next anyway).
        problems += _algorithm_name_problems(config) + _resume_problems(config) + _routing_replay_problems(config) + _router_problems(config) + _reserved_gpu_problems(config)
        problems += _engine_kwargs_problems(config)
    return problems


def check_sft_run(config: SFTConfig, world_size: int) -> list[str]:
    """Every problem with a fine-tuning run's inputs (``megarl.sft``) for ``world_size`` processes,
    one line each, as :func:`check_run` finds them for RL; empty: the run can start. Every row of
    ``data.train_files`` is read here (a conversation is a few hundred bytes of JSON: reading all of
    them costs little beside tokenizing them), each file's first bad row named by file and line;
    token counts (``data.max_length``) need the tokenizer and are checked when the run loads them."""
    from megarl.data.conversations import check_conversation_file
    from megarl.data.datasets import DataError

    problems = model_dir_problems(config.model.path, "model.path", tokenizer_dir=config.model.tokenizer_path)
    if not problems:
        try:
            validate_sft(config, world_size, ModelFacts.from_hf_dir(resolve_model_path(config.model.path)))
        except ConfigError as error:
            problems.append(str(error))
    for name in config.data.train_files:
        try:
            check_conversation_file(resolve_data_path(name), config.data.messages_key)
        except DataError as error:
            problems.append(f"data.train_files: {error}")
    problems += sink_problems(config.logging)
    if not problems:
        # Last, once every cheap check passed: it imports torch (the run imports it next anyway).
        problems += _resume_problems(config)
    return problems


def _engine_problems(config: Config) -> list[str]:
    """Colocated SGLang engines fit the GPUs of a node (torchrun's ``LOCAL_WORLD_SIZE``, one GPU per
    rank): every node runs ``rollout.num_engines`` of them."""
    import os

    rollout, problems = config.rollout, []
    gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    launched_gpus = rollout.num_engines * rollout.engine_tensor_parallel
    if rollout.engine == "sglang" and rollout.colocate and not rollout.engine_urls and 0 < gpus < launched_gpus:
        problems.append(
            f"`rollout.num_engines` ({rollout.num_engines}) x `rollout.engine_tensor_parallel` ({rollout.engine_tensor_parallel}) = "
            f"{launched_gpus} GPUs per node, but a node runs {gpus} ranks (torchrun --nproc_per_node), one GPU each: colocated engines "
            f"share the node's GPUs; lower rollout.num_engines to {max(gpus // rollout.engine_tensor_parallel, 1)} (it counts engines per node)"
        )
    return problems


def _engine_kwargs_problems(config: Config) -> list[str]:
    """``rollout.engine_kwargs`` against the engine the run launches (``auto`` resolved, which
    imports torch): SGLang's own arguments, or what the ``hf`` engine honours
    (:func:`megarl.rollout.engine_args.engine_kwargs_problems`)."""
    rollout = config.rollout
    if not rollout.engine_kwargs or rollout.engine_urls:
        return []
    from megarl.rollout.engine import resolve_engine
    from megarl.rollout.engine_args import engine_kwargs_problems

    return engine_kwargs_problems(resolve_engine(rollout.engine), rollout.engine_kwargs)


def _reserved_gpu_problems(config: Config) -> list[str]:
    """SGLang engines that are not colocated take a node's GPUs after its ranks' (one each), and
    the distillation teacher's engines (``algorithm.opd_type`` sglang) the first node's GPUs after
    those: the node must have that many. A Megatron teacher takes none of its own."""
    rollout = config.rollout
    launches_teacher = config.algorithm.teacher_in_engines and config.teacher.path is not None
    if (rollout.colocate or rollout.engine_urls) and not launches_teacher:
        return []
    import os

    import torch

    from megarl.rollout.engine import resolve_engine

    if resolve_engine(rollout.engine) != "sglang":
        return []
    ranks, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
    engine_gpus = rollout.reserved_gpus()
    needed = ranks + engine_gpus
    if engine_gpus and needed > gpus:
        return [
            f"`rollout.colocate` (false): the engines take the GPUs after the node's {ranks} ranks', {rollout.num_engines} x "
            f"`rollout.engine_tensor_parallel` ({rollout.engine_tensor_parallel}) of them, {needed} GPUs in all, but this node has {gpus}: "
            "lower torchrun --nproc_per_node or rollout.num_engines, or set rollout.colocate=true"
        ]
    teacher = config.teacher
    teacher_gpus = teacher.num_engines * teacher.engine_tensor_parallel if launches_teacher else 0
    if teacher_gpus and needed + teacher_gpus > gpus:
        return [
            f"`teacher.num_engines` ({teacher.num_engines}) x `teacher.engine_tensor_parallel` ({teacher.engine_tensor_parallel}): the teacher's "
            f"engines take the first node's GPUs after the {needed} of its ranks and rollout engines, {needed + teacher_gpus} GPUs in all, "
            f"but it has {gpus}: lower torchrun --nproc_per_node, rollout.num_engines or teacher.num_engines, or give teacher.engine_urls"
        ]
    return []


def _teacher_problems(config: Config, world_size: int) -> list[str]:
    """``teacher.path``: a model directory whose engines can split its heads (``algorithm.opd_type``
    sglang) or that the training layout fits (megatron: :func:`_megatron_teacher_problems`), and
    whose tokenizer is the policy's (the teacher scores the policy's token ids as they are): the
    same ``tokenizer.json`` vocabulary and added tokens when both directories hold one (else the
    same vocabulary size and special token ids in config.json), and a vocabulary that holds every
    id the policy can emit (a larger, padded one is fine). Engines given by URL are not read."""
    teacher = config.teacher
    if teacher.path is None or not config.algorithm.use_opd:
        return []
    problems = model_dir_problems(teacher.path, "teacher.path", needs_tokenizer=False, needs_safetensors=False)
    if problems:
        return problems
    where = f"teacher.path = {teacher.path!r}"
    teacher_dir, policy_dir = resolve_model_path(teacher.path), resolve_model_path(config.model.path)
    facts, policy_facts = ModelFacts.from_hf_dir(teacher_dir), ModelFacts.from_hf_dir(policy_dir)
    if config.algorithm.teacher_in_megatron:
        problems += _megatron_teacher_problems(config, world_size, facts, policy_facts)
    elif facts.num_attention_heads % teacher.engine_tensor_parallel:
        problems.append(f"`teacher.engine_tensor_parallel` ({teacher.engine_tensor_parallel}) must divide the teacher's attention heads ({facts.num_attention_heads})")
    longest = config.data.max_prompt_length + config.data.max_response_length
    if facts.max_position_embeddings < longest:
        problems.append(
            f"{where}: its context ({facts.max_position_embeddings} positions) is shorter than a prompt and its response "
            f"(data.max_prompt_length + data.max_response_length = {longest}): choose a teacher with a longer context or lower them"
        )
    policy_vocab = policy_facts.vocab_size
    if facts.vocab_size < policy_vocab:
        problems.append(
            f"{where}: its vocabulary ({facts.vocab_size}) is smaller than the policy's ({policy_vocab}), so it cannot score every token "
            "the policy samples: the teacher must share the policy's tokenizer"
        )
    policy_tokenizer = resolve_model_path(config.model.tokenizer_path) if config.model.tokenizer_path else policy_dir
    mismatch = _tokenizer_mismatch(teacher_dir, policy_tokenizer, policy_dir, same_vocab=facts.vocab_size == policy_vocab)
    if mismatch:
        problems.append(f"{where}: {mismatch}: the teacher must share the policy's tokenizer (it scores the policy's token ids); choose a teacher of the policy's family")
    return problems


def _megatron_teacher_problems(config: Config, world_size: int, facts: ModelFacts, policy_facts: ModelFacts) -> list[str]:
    """``algorithm.opd_type: megatron``: the teacher is built under the training layout
    (:meth:`ParallelConfig.for_model`: without expert parallelism when it is dense), so that layout
    must fit its heads, query groups, layers and experts as it fits the policy's. A rule the policy
    breaks in the same words is the policy's problem, reported once by :func:`validate`."""
    policy_errors = set(layout_errors(config.parallel, world_size, policy_facts))
    where = f"teacher.path = {config.teacher.path!r}"
    return [
        f"{where} (algorithm.opd_type megatron, built under the training layout): {error}"
        for error in layout_errors(config.parallel.for_model(facts), world_size, facts)
        if error not in policy_errors
    ]


def _tokenizer_mismatch(teacher_dir, policy_tokenizer_dir, policy_dir, *, same_vocab: bool) -> str | None:
    """How the teacher's tokenizer differs from the policy's, or None when it does not (see
    :func:`_teacher_problems`)."""
    teacher_file, policy_file = teacher_dir / "tokenizer.json", policy_tokenizer_dir / "tokenizer.json"
    if teacher_file.is_file() and policy_file.is_file():
        def tokens(path):
            loaded = json.loads(path.read_text())
            vocab = loaded.get("model", {}).get("vocab", {})
            pairs = vocab.items() if isinstance(vocab, dict) else ((entry[0], index) for index, entry in enumerate(vocab))
            return {int(index): token for token, index in pairs} | {int(added["id"]): added["content"] for added in loaded.get("added_tokens", [])}

        teacher_tokens, policy_tokens = tokens(teacher_file), tokens(policy_file)
        differing = sorted(index for index in teacher_tokens.keys() | policy_tokens.keys() if teacher_tokens.get(index) != policy_tokens.get(index))
        if differing:
            first = differing[0]
            return (
                f"its tokenizer.json differs from the policy's in {len(differing)} token ids (id {first}: "
                f"{teacher_tokens.get(first)!r} against the policy's {policy_tokens.get(first)!r})"
            )
        return None
    teacher_config, policy_config = (json.loads((directory / "config.json").read_text()) for directory in (teacher_dir, policy_dir))
    special = [key for key in ("bos_token_id", "eos_token_id", "pad_token_id") if teacher_config.get(key) != policy_config.get(key)]
    if not same_vocab or special:
        what = ", ".join(f"{key} {teacher_config.get(key)} against {policy_config.get(key)}" for key in special) or "its vocabulary size differs"
        return f"without a tokenizer.json on both sides to compare, its config.json differs from the policy's ({what})"
    return None


def _router_problems(config: Config) -> list[str]:
    """``rollout.router: sglang``: the package is installed, ``rollout.router_args`` leave megarl's
    own flags alone, and routing replay R3 is not asked for (sglang-router drops
    ``return_routed_experts`` from every request it forwards: tests/rollout/test_router.py)."""
    if config.rollout.router != "sglang":
        return []
    import importlib.util

    from megarl.rollout.router import INSTALL_HINT, PACKAGE, VERSION, fixed_args

    problems = []
    if importlib.util.find_spec("sglang_router") is None:
        problems.append(f"`rollout.router` (sglang): the {PACKAGE} package is not installed: {INSTALL_HINT}")
    fixed = fixed_args(config.rollout.router_args)
    if fixed:
        problems.append(f"`rollout.router_args`: {' '.join(fixed)} is set by megarl (the router's address and its engines); remove it")
    if config.algorithm.routing_replay == "r3":
        problems.append(
            f"`algorithm.routing_replay` (r3) cannot run behind `rollout.router` (sglang): {PACKAGE} {VERSION} drops return_routed_experts "
            "from the requests it forwards; set algorithm.routing_replay=r2 (the trainer's own routing, replayed) or rollout.router=none"
        )
    return problems


def _routing_replay_problems(config: Config, timeout: float = 5.0) -> list[str]:
    """With ``algorithm.routing_replay`` r3, every engine of ``rollout.engine_urls`` that answers its
    server information must say it returns routed experts (SGLang's ``/server_info``, before it
    ``/get_server_info``). An engine that does not answer is left to the run's start, which waits
    for it; the run checks the others again when it connects."""
    if config.algorithm.routing_replay != "r3":
        return []
    import urllib.error
    import urllib.request

    from megarl.rollout import protocol

    problems = []
    for url in config.rollout.engine_urls:
        info = None
        for path in protocol.SERVER_INFO_PATHS:
            try:
                with urllib.request.urlopen(url.rstrip("/") + path, timeout=timeout) as response:
                    info = json.loads(response.read())
                break
            except urllib.error.HTTPError as error:
                if error.code != 404:
                    break
            except (OSError, ValueError):
                break
        refusal = None if info is None else protocol.routed_experts_refusal(path, info)
        if refusal is not None:
            problems.append(f"`rollout.engine_urls`: {url} {refusal}")
    return problems


def _algorithm_name_problems(config: Config) -> list[str]:
    """The advantage estimator and the policy loss ``config`` names, against the registries of
    :mod:`megarl.algorithms` (torch code: the config holds plain names so that it imports without
    torch), and ``algorithm.whiten_advantages`` false against an estimator without a ``whiten``."""
    from megarl.algorithms.advantages import ADVANTAGES
    from megarl.algorithms.policy_losses import POLICY_LOSSES

    chosen = (
        ("algorithm.advantage_estimator", config.algorithm.advantage_estimator, ADVANTAGES, "@register_advantage in megarl/algorithms/advantages.py"),
        ("algorithm.policy_loss", config.algorithm.policy_loss, POLICY_LOSSES, "@register_policy_loss in megarl/algorithms/policy_losses.py"),
    )
    problems = []
    for key, name, registry, how_to_add in chosen:
        registered = registry.names()
        if name not in registered:
            problems.append(
                f"`{key}` = {name!r} is not a registered {registry.kind}{did_you_mean(name, registered) or '.'} "
                f"Registered: {', '.join(registered)}; a new one is a function decorated with {how_to_add}"
            )
    estimator = config.algorithm.advantage_estimator
    if not config.algorithm.whiten_advantages and estimator in ADVANTAGES.names() and not ADVANTAGES.takes(estimator, "whiten"):
        whitening = [name for name in ADVANTAGES.names() if ADVANTAGES.takes(name, "whiten")]
        problems.append(
            f"`algorithm.whiten_advantages` (false) changes nothing for `algorithm.advantage_estimator` {estimator}, which has no batch "
            f"normalisation (only {', '.join(whitening)} do): drop it (for grpo's group std, set algorithm.norm_adv_by_std=false)"
        )
    return problems


def _resume_problems(config: Config | SFTConfig) -> list[str]:
    """The checkpoint a resume would load, read far enough to know it is whole (imports torch to
    read its index)."""
    from megarl.resume import CheckpointError, resolve_resume, resume_choice

    root = config.resolved_checkpoint_dir()
    resume, contents = resume_choice(config.checkpoint.resume, config.checkpoint.load_contents, root)
    try:
        path = resolve_resume(resume, root, set_aside=False)
    except CheckpointError as error:
        return [str(error)]
    if contents == "model" and path is not None and path.resolve().parent == root.resolve():
        return [
            f"`checkpoint.load_contents` (model) starts a new run at step 0, whose first save would set {path.name} aside in the same "
            f"directory ({path.parent}): give this run another checkpoint.dir or logging.name, or copy the checkpoint elsewhere"
        ]
    if contents == "all" and path is not None:
        # A frozen router has no optimizer state: the checkpoint's optimizer and this run's must agree.
        saved = bool(json.loads((path / "train_state.json").read_text()).get("freeze_moe_router", False))
        if saved != config.model.freeze_moe_router:
            return [
                f"checkpoint {path} was saved with `model.freeze_moe_router` {str(saved).lower()}, so its optimizer state "
                f"{'lacks' if saved else 'has'} the routers': set model.freeze_moe_router={str(saved).lower()} to resume it, or "
                f"checkpoint.load_contents=model (with checkpoint.resume={path}) to start a new run from its weights"
            ]
    return []


def model_dir_problems(
    path: str, setting: str, *, tokenizer_dir: str | None = None, needs_tokenizer: bool = True, needs_safetensors: bool = True
) -> list[str]:
    """What a HF model directory lacks: config.json (valid JSON), safetensors weights (when
    ``needs_safetensors``: Megatron reads only those) and, when ``needs_tokenizer``, a tokenizer (in
    ``tokenizer_dir`` when given)."""
    directory = resolve_model_path(path)
    where = f"{setting} = {path!r}"
    if not directory.is_dir():
        return [f"{where}: {directory} is not a directory: give a HF model directory (config.json, *.safetensors, tokenizer files)"]
    problems = []
    config_file = directory / "config.json"
    try:
        json.loads(config_file.read_text())
    except FileNotFoundError:
        problems.append(f"{where}: {config_file} is missing: a model directory needs the HF config")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        problems.append(f"{where}: {config_file} is not valid JSON ({error})")
    if needs_safetensors and not any(directory.glob("*.safetensors")):
        problems.append(f"{where}: {directory} holds no *.safetensors weights (convert .bin weights with transformers' save_pretrained)")
    if needs_tokenizer:
        tokenizer = resolve_model_path(tokenizer_dir) if tokenizer_dir else directory
        if not any(all((tokenizer / name).is_file() for name in names) for names in _TOKENIZER_FILES):
            hint = "" if tokenizer_dir else " or set model.tokenizer_path"
            problems.append(
                f"{'model.tokenizer_path = ' + repr(tokenizer_dir) if tokenizer_dir else where}: {tokenizer} holds no tokenizer "
                f"(tokenizer.json, tokenizer.model or vocab.json + merges.txt): copy the tokenizer files there{hint}"
            )
    return problems


def _model_problems(config: Config) -> list[str]:
    problems = model_dir_problems(config.model.path, "model.path", tokenizer_dir=config.model.tokenizer_path)
    if config.critic_enabled and config.critic.path:
        problems += model_dir_problems(config.critic.path, "critic.path", needs_tokenizer=False)
    return problems


def _data_problems(config: Config) -> list[str]:
    from megarl.data.datasets import DataError, check_file

    problems = []
    for setting, files in (("data.train_files", config.data.train_files), ("data.val_files", config.data.val_files)):
        for name in files:
            try:
                check_file(resolve_data_path(name), config.data)
            except DataError as error:
                problems.append(f"{setting}: {error}")
    return problems


def _reward_problems(config: Config) -> list[str]:
    reward = config.reward
    if reward.type == "function":
        from megarl.rewards.functions import RewardFunctionError, calling_convention, load_function

        try:
            calling_convention(load_function(reward.function), reward.function, reward.batched)
        except RewardFunctionError as error:
            return [str(error)]
    if reward.type == "model":
        # transformers loads it (.bin weights too); a name that is no directory here may be a
        # Hub model transformers can find in its cache.
        if resolve_model_path(reward.model_path).exists():
            return model_dir_problems(reward.model_path, "reward.model_path", needs_safetensors=False)
        if not _looks_like_hub_name(reward.model_path):
            return [f"reward.model_path = {reward.model_path!r} does not exist: give a HF sequence-classification model directory"]
    if reward.type == "remote" and not reward.url.startswith(("http://", "https://")):
        return [f"reward.url = {reward.url!r} must be an http:// or https:// URL"]
    return []


def _agent_problems(config: Config) -> list[str]:
    """The environment loads (its file imports, the class has ``reset`` and ``step``) and takes its
    keyword arguments, or the agent program imports and takes ``(base_url, row)``; the tool-call
    parser exists."""
    agent = config.agent
    if not agent.enabled:
        return []
    import megarl.agents.toy  # noqa: F401 - registers the bundled environments
    from megarl.agents.environment import EnvironmentLoadError, check_env_kwargs, load_environment_class
    from megarl.agents.parsers import TOOL_PARSERS
    from megarl.agents.programs import load_agent_program

    problems = []
    if agent.tool_parser is not None and agent.tool_parser not in TOOL_PARSERS:
        problems.append(f"agent.tool_parser = {agent.tool_parser!r} is not a tool-call parser: use one of {', '.join(sorted(TOOL_PARSERS))}, or null")
    try:
        if agent.openai_agent is not None:
            load_agent_program(agent.openai_agent)
        else:
            check_env_kwargs(load_environment_class(agent.environment), agent.environment_kwargs(), f"agent.environment = {agent.environment!r}")
    except EnvironmentLoadError as error:
        problems.append(str(error))
    return problems


def _looks_like_hub_name(name: str) -> bool:
    """``organisation/model``: how the Hugging Face Hub names models."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")) and ":" not in name
