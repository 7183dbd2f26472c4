"""``model.freeze_moe_router`` on a policy in training (the ``router_freeze`` check of a layout job,
tests/workers/suite.py).

The policy is built as the trainer builds it with ``model.freeze_moe_router``, then takes one
optimizer step on packing_check's batch (the PPO loss with random advantages). The report (rank 0):
the frozen parameters' names; how many of them require a gradient, sit in a DDP gradient buffer or
in the optimizer's parameter groups (all 0); whether they are bit for bit the same after the step;
and how far the other parameters moved (the step did train).
"""

from __future__ import annotations

import torch

from megarl.config import AlgorithmConfig, ModelConfig, TrainConfig
from megarl.trainer.model import TrainModel
from megarl.trainer.policy import Policy, attach_hidden_states_heads
from packing_check import LENGTHS, MAX_RESPONSE, _batch

ROUTING = (".router.", ".shared_experts.gate_weight")
"""What a parameter's name holds when it routes tokens (Megatron's names)."""


def check(model_dir: str, layout, pg_collection) -> dict:
    train = TrainConfig(micro_batch_size=2, mini_batch_size=len(LENGTHS), global_batch_size=len(LENGTHS), use_distributed_optimizer=False)
    train.optimizer.lr = 1e-2
    model = TrainModel.build(
        model_dir, ModelConfig(path=model_dir, freeze_moe_router=True), layout, train, train.optimizer, pg_collection=pg_collection,
        backend="torch", after_load=attach_hidden_states_heads,
    )
    policy = Policy(model, AlgorithmConfig(), train, temperature=1.0, max_response_length=MAX_RESPONSE)
    named = {f"{index}.{name}": parameter for index, chunk in enumerate(model.chunks) for name, parameter in chunk.named_parameters()}
    routing = {name: parameter for name, parameter in named.items() if any(part in name for part in ROUTING)}
    before = {name: parameter.detach().clone() for name, parameter in named.items()}
    buffered = {id(parameter) for ddp in model.models for buffer in ddp.buffers + ddp.expert_parallel_buffers for parameter in buffer.params}
    optimized = {id(parameter) for group in model.optimizer.param_groups for parameter in group["params"]}
    batch = _batch(model, layout, replay=False)
    generator = torch.Generator().manual_seed(3)
    log_probs, _ = policy.log_probs(batch)
    batch.token_values.update(
        old_log_probs=log_probs, advantages=torch.randn(batch.tokens.shape, generator=generator), loss_weights=torch.ones(batch.tokens.shape)
    )
    metrics = policy.update(batch, step=0)
    return {
        "routing": sorted(routing),
        "requires_grad": sum(parameter.requires_grad for parameter in routing.values()),
        "in_grad_buffers": sum(id(parameter) in buffered for parameter in routing.values()),
        "in_optimizer": sum(id(parameter) in optimized for parameter in routing.values()),
        "others_in_optimizer": sum(id(parameter) in optimized for name, parameter in named.items() if name not in routing),
        "unchanged": all(torch.equal(parameter, before[name]) for name, parameter in routing.items()),
        "others_moved": max(float((parameter - before[name]).abs().max()) for name, parameter in named.items() if name not in routing),
        "skipped_steps": metrics["policy/skipped_steps"],
    }
