"""The ``rollout`` section: engines, sampling and weight updates, and the engines' layout against
the model.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal, Optional

from megarl.config.base import Range, Section, _divisors, _one_of
from megarl.config.model import ModelFacts


@dataclasses.dataclass(kw_only=True, slots=True)
class RolloutConfig(Section):
    """Generation: the engines, sampling, and how new weights reach them."""

    engine: Literal["auto", "hf", "sglang"] = "auto"
    """Rollout engine: SGLang on GPUs, the embedded transformers server (``hf``) anywhere; ``auto``
    is sglang when CUDA is present and sglang imports, else hf (verl: actor_rollout_ref.rollout.name)."""
    num_engines: Annotated[int, Range(ge=1)] = 1
    """Engine servers to launch, each over engine_tensor_parallel devices; ignored when engine_urls
    is set (OpenRLHF: --vllm_num_engines)."""
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
    engine, slime: --colocate)."""
    weight_transport: Literal["tensor", "nccl", "disk"] = "tensor"
    """How new weights reach the engines: same-host tensor handles (CUDA IPC, shared-memory files on
    CPU), an NCCL broadcast group (disaggregated engines), or safetensors files (the fallback)
    (OpenRLHF: --vllm_sync_backend)."""
    bucket_mb: Annotated[int, Range(ge=1)] = 512
    """Size cap of one weight-update bucket, MiB. 512 MiB is the measured knee: larger buckets add
    memory without raising throughput (docs/benchmarks.md, tools/bench_weight_sync.py)
    (slime: --update-weight-buffer-size)."""
    engine_urls: list[str] = dataclasses.field(default_factory=list)
    """Connect to engines already running at these URLs instead of launching them."""
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
    deterministic: bool = False
    """SGLang's deterministic inference (--enable-deterministic-inference): per-sample seeds are
    honoured and a rerun samples the same tokens, at some speed cost. The hf engine always is."""
    restart_budget: Annotated[int, Range(ge=0)] = 3
    """Engine restarts allowed during the run before it stops."""
    val_temperature: Annotated[float, Range(ge=0, note="0 is greedy")] = 0.0
    """Sampling temperature of validation; 0 is greedy (verl: rollout.val_kwargs.temperature)."""
    val_n_samples: Annotated[int, Range(ge=1)] = 1
    """Responses per validation prompt (verl: rollout.val_kwargs.n, slime: --n-samples-per-eval-prompt)."""
    seed: int = 1
    """Sampling seed (slime: --rollout-seed)."""

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
