"""The ``rollout`` section: engines, sampling and weight updates.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from megarl.config.base import _require, _require_positive

@dataclasses.dataclass(kw_only=True, slots=True)
class RolloutConfig:
    """Generation: the engines, sampling, and how new weights reach them."""

    engine: Literal["auto", "hf", "sglang"] = "auto"
    """Rollout engine: SGLang on GPUs, the embedded transformers server (``hf``) anywhere; ``auto``
    is sglang when CUDA is present and sglang imports, else hf (verl: actor_rollout_ref.rollout.name)."""
    num_engines: int = 1
    """Engine servers to launch, each over engine_tensor_parallel devices; ignored when engine_urls
    is set (OpenRLHF: --vllm_num_engines)."""
    engine_tensor_parallel: int = 1
    """Tensor parallel size inside each engine (verl: rollout.tensor_model_parallel_size, slime:
    --rollout-num-gpus-per-engine)."""
    batch_size: int = 16
    """Prompts per rollout round (verl: data.train_batch_size, slime: --rollout-batch-size)."""
    n_samples_per_prompt: int = 8
    """Responses sampled per prompt: the group of GRPO and RLOO (verl: rollout.n, slime:
    --n-samples-per-prompt)."""
    temperature: float = 1.0
    """Sampling temperature; the trainer divides its logits by it too, so its log-probs match the
    engine's (verl: rollout.temperature, slime: --rollout-temperature)."""
    top_p: float = 1.0
    """Nucleus sampling threshold, in (0, 1]; 1 disables it (slime: --rollout-top-p)."""
    top_k: int = -1
    """Top-k sampling; -1 disables it (slime: --rollout-top-k)."""
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    """Token ids that end a response besides EOS (slime: --rollout-stop-token-ids)."""
    mem_fraction: float = 0.5
    """Fraction of GPU memory SGLang may hold for weights and KV cache (SGLang: mem_fraction_static,
    verl: rollout.gpu_memory_utilization, slime: --sglang-mem-fraction-static)."""
    colocate: bool = True
    """Engines share the training devices and release their memory during the update (verl: hybrid
    engine, slime: --colocate)."""
    weight_transport: Literal["tensor", "nccl", "disk"] = "tensor"
    """How new weights reach the engines: same-host tensor handles (CUDA IPC, shared-memory files on
    CPU), an NCCL broadcast group (disaggregated engines), or safetensors files (the fallback)
    (OpenRLHF: --vllm_sync_backend)."""
    bucket_mb: int = 512
    """Size cap of one weight-update bucket, MiB. 512 MiB is the measured knee: larger buckets add
    memory without raising throughput (docs/benchmarks.md, tools/bench_weight_sync.py)
    (slime: --update-weight-buffer-size)."""
    engine_urls: list[str] = dataclasses.field(default_factory=list)
    """Connect to engines already running at these URLs instead of launching them."""
    request_timeout_s: float = 600.0
    """Timeout of one engine request, seconds."""
    health_check_interval_s: float = 10.0
    """Seconds between engine health checks."""
    health_timeout_s: float = 20.0
    """An engine that does not answer a health check within this many seconds is restarted."""
    startup_timeout_s: float = 600.0
    """Seconds an engine may take to start and load its model."""
    engine_threads: Optional[int] = None
    """CPU threads of each ``hf`` engine; null: torch's default (all cores). On a small shared CPU
    1 keeps the engine from competing with the training processes."""
    deterministic: bool = False
    """SGLang's deterministic inference (--enable-deterministic-inference): per-sample seeds are
    honoured and a rerun samples the same tokens, at some speed cost. The hf engine always is."""
    restart_budget: int = 3
    """Engine restarts allowed during the run before it stops."""
    val_temperature: float = 0.0
    """Sampling temperature of validation; 0 is greedy (verl: rollout.val_kwargs.temperature)."""
    val_n_samples: int = 1
    """Responses per validation prompt (verl: rollout.val_kwargs.n, slime: --n-samples-per-eval-prompt)."""
    seed: int = 1
    """Sampling seed (slime: --rollout-seed)."""

    def __post_init__(self):
        _require_positive(
            self, "rollout", ("num_engines", "engine_tensor_parallel", "batch_size", "n_samples_per_prompt", "bucket_mb", "val_n_samples")
        )
        _require(self.temperature > 0, "rollout.temperature", f"({self.temperature}) must be > 0")
        _require(self.val_temperature >= 0, "rollout.val_temperature", f"({self.val_temperature}) must be >= 0 (0 is greedy)")
        _require(0 < self.top_p <= 1, "rollout.top_p", f"({self.top_p}) must be in (0, 1]")
        _require(self.top_k == -1 or self.top_k >= 1, "rollout.top_k", f"({self.top_k}) must be -1 (off) or >= 1")
        _require(all(token >= 0 for token in self.stop_token_ids), "rollout.stop_token_ids", f"({self.stop_token_ids}) must be >= 0")
        _require(0 < self.mem_fraction < 1, "rollout.mem_fraction", f"({self.mem_fraction}) must be in (0, 1)")
        _require(self.request_timeout_s > 0, "rollout.request_timeout_s", f"({self.request_timeout_s}) must be > 0")
        _require(self.health_check_interval_s > 0, "rollout.health_check_interval_s", f"({self.health_check_interval_s}) must be > 0")
        _require(self.health_timeout_s > 0, "rollout.health_timeout_s", f"({self.health_timeout_s}) must be > 0")
        _require(self.startup_timeout_s > 0, "rollout.startup_timeout_s", f"({self.startup_timeout_s}) must be > 0")
        _require(self.engine_threads is None or self.engine_threads >= 1, "rollout.engine_threads", f"({self.engine_threads}) must be >= 1, or null")
        _require(self.restart_budget >= 0, "rollout.restart_budget", f"({self.restart_budget}) must be >= 0")
