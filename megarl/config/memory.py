"""Device memory per GPU of a config's training layout, from a HF config.json alone: what
``python -m megarl.config --memory`` prints (:func:`memory_table`).

Parameter counts (:func:`parameter_counts`), from the config.json fields, for the families megarl
builds (GQA attention or DeepSeek's multi-latent attention; a SwiGLU MLP, routed experts with an
optional shared expert, first dense layers)::

    attention (GQA)  h (a d) + 2 h (g d) + (a d) h               a heads, g key/value heads, d head_dim
    dense MLP        3 h f                                       f intermediate_size
    routed experts   E x 3 h f_e per MoE layer                   E experts, f_e moe_intermediate_size
    shared expert    3 h f_s (+ h for Qwen2-MoE's gate)
    router           E h per MoE layer (+ E, an expert bias); norms 2 h per layer (+ 2 d with q/k norms: Qwen3, GLM use_qk_norm) + h
    biases           (a + 2 g) d on q, k, v for Qwen2 and where attention_bias is set
    embedding        V h, and V h again for an untied output layer

Per GPU: expert weights split over EP x ETP x PP, every other weight (attention, dense and shared
MLPs, embedding and output layer) over TP x PP (the embedding and output layer sit on the first
and last stage: with PP > 1 an even split understates those two stages), the router and norms over
PP only (TP replicates them). Bytes per parameter, megarl's Megatron set-up
(:mod:`megarl.trainer.model`, :mod:`megarl.trainer.optim`):

    parameters   model.dtype (2 for bf16)
    gradients    4 (grad_reduce_in_fp32)
    optimizer    4 (fp32 main weights; none when model.dtype is fp32) + 8 (Adam's two moments),
                 over the data-parallel replicas of the weight with train.use_distributed_optimizer:
                 world / (TP x PP) for dense weights (CP ranks hold replicas too), world / (EP x ETP x PP)
                 for experts

Activations of one micro-batch of T tokens (``train.max_tokens_per_micro_batch`` with
``train.dynamic_batch``, else ``micro_batch_size x (max_prompt_length + max_response_length)``), after
Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", eq. 2 with
flash attention: no ``a s^2`` term) at 2 bytes a value, t = TP with sequence parallelism else 1::

    per layer      34 T h / t bytes
    no recompute   L / PP layers of it, PP micro-batches in flight on the first stage of 1F1B
    full           2 T h / t a layer (its input) for L / PP layers, PP in flight, + one layer's 34 T h / t
    selective      as none, less the attention core's 5 T h / t (recomputed)
    logits         + 4 T V / TP without train.fused_linear_logprob

An estimate: MoE layers hold the routed tokens' expert activations (top-k copies of the MLP's part)
and allocator fragmentation is not counted; the measured peak belongs in docs/benchmarks.md.
The engines' share is ``rollout.mem_fraction`` of the device (SGLang's ``mem_fraction_static``:
their weights, ``2 x parameters / engine_tensor_parallel`` in bf16, and the KV cache), taken when
they launch, which is while the model is built: at start-up the engines, the parameters, the
gradients and the main weights are on the device together (Adam's moments appear at the first
optimizer step, when the engines have released their memory).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from megarl.config.base import ConfigError

GIB = 1024**3
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
"""Bytes of a parameter per ``model.dtype``."""


@dataclasses.dataclass(frozen=True)
class ParameterCounts:
    """A model's parameters by how the layout splits them."""

    experts: int
    """Routed experts' weights, all MoE layers."""
    split: int
    """Weights split over TP: attention, dense and shared MLPs, embedding and output layer."""
    replicated: int
    """Weights every TP rank holds whole: routers and norms."""

    @property
    def total(self) -> int:
        return self.experts + self.split + self.replicated


def parameter_counts(hf_config: dict[str, Any]) -> ParameterCounts:
    """The parameter counts of a HF ``config.json``'s model (formulas in the module docstring).

    Raises:
        ConfigError: a field the count needs is missing.
    """
    try:
        hidden, layers, heads = hf_config["hidden_size"], hf_config["num_hidden_layers"], hf_config["num_attention_heads"]
        vocab = hf_config["vocab_size"]
    except KeyError as error:
        raise ConfigError(f"config.json lacks {error.args[0]}, which the memory table needs") from None
    head_dim = hf_config.get("head_dim") or hidden // heads
    if hf_config.get("kv_lora_rank") is not None:
        attention = _mla_parameters(hf_config, hidden, heads)
        attention_norms = hf_config["kv_lora_rank"] + (hf_config.get("q_lora_rank") or 0)
    else:
        groups = hf_config.get("num_key_value_heads") or heads
        attention = 2 * hidden * heads * head_dim + 2 * hidden * groups * head_dim
        attention += (heads + 2 * groups) * head_dim if hf_config.get("attention_bias") or hf_config.get("model_type", "").startswith("qwen2") else 0
        attention_norms = 2 * head_dim if hf_config.get("model_type", "").startswith("qwen3") or hf_config.get("use_qk_norm") else 0
    experts = hf_config.get("num_experts") or hf_config.get("n_routed_experts") or hf_config.get("num_local_experts") or 0
    moe_layers = _moe_layers(hf_config, layers) if experts else 0
    dense_layers = layers - moe_layers
    expert_width = hf_config.get("moe_intermediate_size") or hf_config.get("intermediate_size")
    shared_width = hf_config.get("shared_expert_intermediate_size") or (hf_config.get("n_shared_experts") or 0) * expert_width if experts else 0
    shared = 3 * hidden * shared_width + (hidden if hf_config.get("shared_expert_intermediate_size") else 0)
    split = layers * attention + dense_layers * 3 * hidden * hf_config["intermediate_size"] + moe_layers * shared
    split += vocab * hidden * (1 if hf_config.get("tie_word_embeddings") else 2)
    # Sigmoid routers with an expert bias (DeepSeek-V3, GLM-4.5) hold E more values.
    router = experts * hidden + (experts if hf_config.get("model_type") in ("deepseek_v3", "glm4_moe") else 0)
    replicated = layers * (2 * hidden + attention_norms) + hidden + moe_layers * router
    return ParameterCounts(experts=moe_layers * experts * 3 * hidden * expert_width, split=split, replicated=replicated)


def _mla_parameters(hf_config: dict[str, Any], hidden: int, heads: int) -> int:
    """Multi-latent attention's projections (DeepSeek-V3): query (through ``q_lora_rank`` when set),
    the key/value latent with the rope key, its up projection, the output."""
    nope, rope, value = hf_config["qk_nope_head_dim"], hf_config["qk_rope_head_dim"], hf_config["v_head_dim"]
    query_rank, kv_rank = hf_config.get("q_lora_rank"), hf_config["kv_lora_rank"]
    query = hidden * heads * (nope + rope) if query_rank is None else hidden * query_rank + query_rank * heads * (nope + rope)
    return query + hidden * (kv_rank + rope) + kv_rank * heads * (nope + value) + heads * value * hidden


def _moe_layers(hf_config: dict[str, Any], layers: int) -> int:
    """Layers with routed experts: past ``first_k_dense_replace`` (DeepSeek, GLM), every
    ``decoder_sparse_step``-th not in ``mlp_only_layers`` (Qwen)."""
    first_dense = hf_config.get("first_k_dense_replace") or 0
    step = hf_config.get("decoder_sparse_step") or 1
    dense = set(hf_config.get("mlp_only_layers") or [])
    return sum(1 for layer in range(first_dense, layers) if layer not in dense and (layer + 1) % step == 0)


@dataclasses.dataclass(frozen=True)
class MemoryRow:
    """One line of the table: bytes per GPU."""

    name: str
    bytes: float
    offloaded: bool
    """Whether ``train.offload`` moves it to the host while the engines generate."""
    note: str = ""


def memory_rows(config, world_size: int, hf_config: dict[str, Any]) -> list[MemoryRow]:
    """The trainer's memory per GPU (the most loaded one) under ``config``'s layout and
    ``world_size`` (module docstring), one row per kind: parameters, gradients, the optimizer's fp32
    main weights (bf16 and fp16 models) and Adam moments, activations."""
    parallel, train = config.parallel, config.train
    counts = parameter_counts(hf_config)
    tp, pp, ep, etp = parallel.tensor, parallel.pipeline, parallel.expert, parallel.expert_tensor_size
    dense_per_gpu = counts.split / (tp * pp) + counts.replicated / pp
    experts_per_gpu = counts.experts / (ep * etp * pp)
    params = dense_per_gpu + experts_per_gpu
    dense_replicas = world_size // (tp * pp) if train.use_distributed_optimizer else 1
    expert_replicas = world_size // (ep * etp * pp) if train.use_distributed_optimizer else 1
    sharded = dense_per_gpu / dense_replicas + experts_per_gpu / expert_replicas
    sharding = f"over DP {dense_replicas} (dense) and {expert_replicas} (experts)" if train.use_distributed_optimizer else "not sharded"
    rows = [
        MemoryRow("parameters", BYTES[config.model.dtype] * params, "params" in train.offload, f"{params / 1e9:.2f}B of {counts.total / 1e9:.2f}B, {config.model.dtype}"),
        MemoryRow("gradients", 4 * params, "grads" in train.offload, "fp32"),
    ]
    if config.model.dtype != "fp32":
        rows.append(MemoryRow("optimizer: main weights", 4 * sharded, "optimizer" in train.offload, f"fp32, {sharding}"))
    rows += [
        MemoryRow("optimizer: Adam moments", 8 * sharded, "optimizer" in train.offload, f"fp32, {sharding}; made at the first step"),
        MemoryRow("activations", activation_bytes(config, hf_config), False, f"estimate, recompute {config.model.recompute}"),
    ]
    return rows


def activation_bytes(config, hf_config: dict[str, Any]) -> float:
    """The activations of one micro-batch on the first pipeline stage (module docstring)."""
    data, train, parallel = config.data, config.train, config.parallel
    tokens = train.max_tokens_per_micro_batch if train.dynamic_batch else train.micro_batch_size * (data.max_prompt_length + data.max_response_length)
    hidden, layers = hf_config["hidden_size"], hf_config["num_hidden_layers"]
    split = parallel.tensor if parallel.sequence_parallel else 1
    layer = 34 * tokens * hidden / split
    stage_layers, in_flight = layers / parallel.pipeline, parallel.pipeline
    if config.model.recompute == "full":
        total = in_flight * stage_layers * 2 * tokens * hidden / split + layer
    elif config.model.recompute == "selective":
        total = in_flight * stage_layers * (34 - 5) * tokens * hidden / split
    else:
        total = in_flight * stage_layers * layer
    if not train.fused_linear_logprob:
        total += 4 * tokens * hf_config["vocab_size"] / parallel.tensor
    return total


def memory_table(config, world_size: int, hf_config: dict[str, Any], device_gib: float) -> str:
    """The table ``python -m megarl.config --memory`` prints: the trainer's rows, the engines' share
    of a ``device_gib`` GiB device, and the two sums that matter for colocated engines: the
    training peak (trainer alone: the engines released their memory) and the generation phase
    (engines + what the trainer keeps), with and without ``train.offload``, and the start-up (the
    model built beside the engines, which launch first, before Adam's moments exist); a sum over
    the device is marked ``OVER``."""
    rows = memory_rows(config, world_size, hf_config)
    rollout = config.rollout
    engine = rollout.mem_fraction * device_gib * GIB
    engine_weights = 2 * parameter_counts(hf_config).total / rollout.engine_tensor_parallel
    state = [row for row in rows if row.name != "activations"]
    lines = [f"per GPU, world size {world_size} (TP {config.parallel.tensor}, PP {config.parallel.pipeline}, EP {config.parallel.expert}, "
             f"ETP {config.parallel.expert_tensor_size}, DP {config.parallel.data_parallel(world_size)}), device {device_gib:g} GiB:"]
    lines += [_line(row.name, row.bytes, None, f"{row.note}{'; offloaded' if row.offloaded else ''}") for row in rows]
    lines.append(_line(
        "engines (rollout.mem_fraction)", engine, None, f"{rollout.mem_fraction:g} of the device: weights "
        f"{engine_weights / GIB:.1f} GiB (bf16, engine TP {rollout.engine_tensor_parallel}), KV cache {max(engine - engine_weights, 0) / GIB:.1f} GiB",
    ))
    training = sum(row.bytes for row in rows)
    kept = sum(row.bytes for row in state)
    kept_offloaded = sum(row.bytes for row in state if not row.offloaded)
    # The engines launch first and hold their share while the model is built; Adam's moments come later.
    start_up = sum(row.bytes for row in state if row.name != "optimizer: Adam moments") + engine
    lines += [
        _line("start-up", start_up, device_gib, "engines + parameters, gradients, main weights (the model is built beside the launched engines)"),
        _line("training peak", training, device_gib, "parameters + gradients + optimizer + activations (engines released)"),
        _line("generation, no offload", kept + engine, device_gib, f"engines + {kept / GIB:.1f} GiB the trainer keeps"),
        _line(
            "generation, train.offload", kept_offloaded + engine, device_gib,
            f"engines + {kept_offloaded / GIB:.1f} GiB (train.offload: {list(config.train.offload)}; {(kept - kept_offloaded) / GIB:.1f} GiB in host memory)",
        ),
    ]
    return "\n".join(lines)


def _line(name: str, size: float, device_gib: float | None, note: str) -> str:
    """A row of the table; a sum over the device (``device_gib``) is marked ``OVER``."""
    over = "OVER " if device_gib is not None and size > device_gib * GIB else ""
    return f"  {name:<31}{size / GIB:8.1f} GiB  {over}{note}"
