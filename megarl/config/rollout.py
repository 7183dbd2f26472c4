"""The ``rollout`` section: engines, sampling and weight updates, and the engines' layout against
the model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Annotated, Any, Literal, Optional

from megarl.config.base import Range, Section, _divisors, _one_of
from megarl.config.model import ModelFacts


@dataclasses.dataclass(kw_only=True, slots=True)
class RolloutConfig(Section):
    """Generation: the engines, sampling, and how new weights reach them."""

    engine: Literal["auto", "hf", "sglang"] = "auto"
    """Rollout engine: SGLang on GPUs, the embedded transformers server (``hf``) anywhere; ``auto``
    is sglang when CUDA is present and sglang imports, else hf (verl: actor_rollout_ref.rollout.name)."""
    num_engines: Annotated[int, Range(ge=1)] = 1
    """Engine servers to launch on each node (torchrun --nnodes N: N x num_engines in all), each
    over engine_tensor_parallel devices, launched and supervised by the node's first rank;
    ignored when engine_urls is set (OpenRLHF: --vllm_num_engines, a total; slime:
    --rollout-num-gpus / --rollout-num-gpus-per-engine, a total)."""
    engine_tensor_parallel: Annotated[int, Range(ge=1)] = 1
    """Tensor parallel size inside each engine (verl: rollout.tensor_model_parallel_size, slime:
    --rollout-num-gpus-per-engine)."""
    batch_size: Annotated[int, Range(ge=1)] = 16
    """Prompts per rollout round (verl: data.train_batch_size, slime: --rollout-batch-size)."""
    n_samples_per_prompt: Annotated[int, Range(ge=1)] = 8
    """Responses sampled per prompt: the group of GRPO and RLOO (verl: rollout.n, slime:
    --n-samples-per-prompt)."""
    temperature: Annotated[float, Range(gt=0)] = 1.0
    """Sampling temperature; the trainer divides its logits by it too, so its log-probs match the
    engine's (verl: rollout.temperature, slime: --rollout-temperature)."""
    top_p: Annotated[float, Range(gt=0, le=1)] = 1.0
    """Nucleus sampling threshold, in (0, 1]; 1 disables it (slime: --rollout-top-p)."""
    top_k: Annotated[int, Range(ge=1, off=-1)] = -1
    """Top-k sampling; -1 disables it (slime: --rollout-top-k)."""
    stop_token_ids: Annotated[list[int], Range(ge=0)] = dataclasses.field(default_factory=list)
    """Token ids that end a response besides EOS (slime: --rollout-stop-token-ids)."""
    mem_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.5
    """Fraction of GPU memory SGLang may hold for weights and KV cache (SGLang: mem_fraction_static,
    verl: rollout.gpu_memory_utilization, slime: --sglang-mem-fraction-static)."""
    colocate: bool = True
    """Engines share the training devices and release their memory during the update (verl: hybrid
    engine, slime: --colocate); false: each node's engines take its GPUs after the training ranks'
    (torchrun --nproc_per_node 4 on 8 GPUs: GPUs 4-7 generate)."""
    weight_transport: Literal["tensor", "nccl", "disk"] = "tensor"
    """How new weights reach the engines: same-host tensor handles (CUDA IPC, shared-memory files on
    CPU), an NCCL broadcast group (disaggregated engines), or safetensors files (the fallback)
    (OpenRLHF: --vllm_sync_backend)."""
    bucket_mb: Annotated[int, Range(ge=1)] = 512
    """Size cap of one weight-update bucket, MiB. 512 MiB is the measured knee: larger buckets add
    memory without raising throughput (docs/benchmarks.md, tools/bench_weight_sync.py)
    (slime: --update-weight-buffer-size)."""
    engine_urls: list[str] = dataclasses.field(default_factory=list)
    """Connect to engines already running at these URLs instead of launching them (the first rank
    drives them all and sends them every update)."""
    router: Literal["none", "sglang"] = "none"
    """``sglang``: start SGLang's router (the sglang-router package) in front of every engine of
    every node and send each sample through it (cache-aware routing); weight updates, pauses and
    memory calls still go to each engine directly. ``none``: the first rank spreads prompts over
    the engines itself, a prompt's samples on one engine (slime: --use-router / sglang-router)."""
    router_policy: Literal["cache_aware", "round_robin", "random", "manual"] = "cache_aware"
    """The router's --policy: ``cache_aware`` sends a request where its prefix is cached, within
    load limits; ``manual`` sends every sample of a prompt to one engine by its routing key
    (``power_of_two`` is not offered: the router refuses it with fewer than two engines, and megarl
    starts it with none and adds them)."""
    router_args: list[str] = dataclasses.field(default_factory=list)
    """More command-line arguments for the router (python -m sglang_router.launch_router --help),
    e.g. ["--cache-threshold", "0.5"]."""
    request_timeout_s: Annotated[float, Range(gt=0)] = 600.0
    """Timeout of one engine request, seconds."""
    health_check_interval_s: Annotated[float, Range(gt=0)] = 10.0
    """Seconds between engine health checks."""
    health_timeout_s: Annotated[float, Range(gt=0)] = 20.0
    """An engine that does not answer a health check within this many seconds is restarted."""
    startup_timeout_s: Annotated[float, Range(gt=0)] = 600.0
    """Seconds an engine may take to start and load its model."""
    engine_threads: Annotated[Optional[int], Range(ge=1)] = None
    """CPU threads of each ``hf`` engine; null: torch's default (all cores). On a small shared CPU
    1 keeps the engine from competing with the training processes."""
    hf_step_delay_s: Annotated[float, Range(ge=0)] = 0.0
    """The ``hf`` engine waits this long after each decoding step, holding its model as a busy GPU
    would: models a GPU engine's per-token latency on CPU, for benchmarks (tools/bench_rollout.py)
    and tests of asynchronous rollout; 0 in real runs."""
    dtype: Optional[Literal["fp32", "bf16", "fp16"]] = None
    """The engines' compute dtype: the hf engine loads the model in it and casts the weights it is
    sent to it, SGLang gets --dtype; null: model.dtype (verl: actor_rollout_ref.rollout.dtype). An
    engine in another dtype than the trainer (bf16 against fp32) routes some tokens differently,
    the mismatch algorithm.routing_replay r3 removes. Ignored for engine_urls (they run as started)."""
    deterministic: bool = False
    """SGLang's deterministic inference (--enable-deterministic-inference): per-sample seeds are
    honoured and a rerun samples the same tokens, at some speed cost. The hf engine always is."""
    engine_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    """More settings for the engines megarl launches, by SGLang ``ServerArgs`` name, put on
    ``sglang.launch_server``'s command line: ``max_running_requests: 64`` -> ``--max-running-requests
    64``, true -> the bare flag, false -> left out, a list -> the flag and its items; e.g.
    chunked_prefill_size, context_length, attention_backend, disable_cuda_graph (CUDA graphs off
    for debugging, what vLLM's enforce_eager does). Checked at start against the installed SGLang's own
    argument parser (else the fields of its source): an unknown name is refused with the nearest
    valid one, a value its type or choices refuse too, and so is a setting megarl makes itself
    (tp_size, mem_fraction_static, dtype ...: named with the knob to use). The ``hf`` engine honours
    context_length (the longest prompt + response it serves) and disable_cuda_graph (it captures no
    CUDA graphs) and refuses the rest. The distillation teacher's engines get them too
    (megarl.rollout.engine_args; verl: actor_rollout_ref.rollout.engine_kwargs.sglang)."""
    restart_budget: Annotated[int, Range(ge=0)] = 3
    """Engine restarts allowed during the run before it stops."""
    val_temperature: Annotated[float, Range(ge=0, note="0 is greedy")] = 0.0
    """Sampling temperature of validation; 0 is greedy (verl: rollout.val_kwargs.temperature)."""
    val_n_samples: Annotated[int, Range(ge=1)] = 1
    """Responses per validation prompt; above 1 validation also reports pass@k (verl:
    rollout.val_kwargs.n, slime: --n-samples-per-eval-prompt)."""
    val_top_p: Annotated[float, Range(gt=0, le=1)] = 1.0
    """Nucleus threshold of validation, in (0, 1]; 1 disables it. Validation never uses the
    training top_p (verl: rollout.val_kwargs.top_p)."""
    val_top_k: Annotated[int, Range(ge=1, off=-1)] = -1
    """Top-k of validation; -1 disables it. Validation never uses the training top_k (verl:
    rollout.val_kwargs.top_k)."""
    seed: int = 1
    """Sampling seed (slime: --rollout-seed)."""
    mode: Literal["sync", "async"] = "sync"
    """``sync``: each step generates, then trains, then pushes the weights. ``async``: the engines
    generate the next steps' samples while the trainer trains, within max_staleness (verl:
    fully-async trainer, slime: train_async.py, AReaL: async RL). Needs colocate false: the
    engines keep their memory while the trainer trains."""
    max_staleness: Annotated[int, Range(ge=0, note="0 is on-policy")] = 1
    """Async mode: a sample is trained on only while the trainer's weight version minus the version
    of its oldest token is at most this; generation runs ahead only as far as that allows, and a
    sample past it is dropped (counted in rollout/dropped_stale) and its prompt generated again
    (AReaL: max_head_offpolicyness, verl: async_training.staleness_threshold, NeMo-RL:
    max_trajectory_age_steps)."""
    partial_rollout: bool = True
    """Async mode: at a weight update the engines pause (pause_mode) and the samples they were
    generating go on under the new weights, every token kept; false: the update waits until the
    samples in flight finish (verl: async_training.partial_rollout, slime: --partial-rollout)."""
    pause_mode: Literal["abort", "retract", "in_place"] = "abort"
    """How the engines pause for a weight update with partial_rollout (SGLang's
    /pause_generation modes): ``abort`` ends the requests in flight and the client sends each
    unfinished sample again as its prompt plus the tokens it has, max_new_tokens reduced (slime's
    way; works with every engine); ``retract`` keeps the requests in the engine and recomputes
    their KV cache under the new weights; ``in_place`` keeps the KV cache computed under the old
    weights (fastest, but the tokens after the update see stale keys and values)."""
    mask_offpolicy_in_partial_rollout: bool = False
    """Async mode: the loss skips the tokens of a sample that an older weight version generated
    than its last token's (slime: --mask-offpolicy-in-partial-rollout); false: they are trained,
    corrected by the loss like every off-policy token (algorithm.use_decoupled_loss)."""

    def _rule_problems(self) -> Iterator[tuple[str, str]]:
        if self.router == "sglang" and self.engine_urls:
            yield "router", (
                "(sglang) is for engines megarl launches (it registers and re-registers them); with `rollout.engine_urls` "
                "give the URL of a router you run as the one engine URL and set rollout.router=none"
            )
        if self.engine_kwargs and self.engine_urls:
            yield "engine_kwargs", (
                "sets the engines megarl launches, but the `rollout.engine_urls` engines run as they were started: "
                "start them with these settings and remove rollout.engine_kwargs"
            )
        for name, value in self.engine_kwargs.items():
            items = value if isinstance(value, list) else [value]
            if not items or not all(isinstance(item, (bool, int, float, str)) for item in items):
                yield f"engine_kwargs.{name}", (
                    f"({value!r}) must be a number, a string, true/false or a list of numbers or strings "
                    "(null or an empty list: remove the key to keep the engine's default)"
                )
        if self.mode == "async" and self.colocate:
            yield "colocate", (
                "(true) cannot be used with `rollout.mode` async: the engines generate while the trainer trains, so they "
                "cannot give their memory back during the update; set rollout.colocate=false (engines on their own devices)"
            )

    def reserved_gpus(self) -> int:
        """The GPUs of a node that its launched engines take after the ranks' (one each): none when
        they are colocated or given by URL, else ``num_engines`` x ``engine_tensor_parallel``."""
        return 0 if self.colocate or self.engine_urls else self.num_engines * self.engine_tensor_parallel

    def layout_errors(self, model_facts: ModelFacts) -> list[str]:
        """What keeps the engines from serving ``model_facts``' model: each engine splits the
        attention heads over its tensor-parallel ranks."""
        heads = model_facts.num_attention_heads
        if heads % self.engine_tensor_parallel:
            return [
                f"`rollout.engine_tensor_parallel` ({self.engine_tensor_parallel}) must divide the model's attention "
                f"heads ({heads}): set it to {_one_of(_divisors(heads))}"
            ]
        return []
