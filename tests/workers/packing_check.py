"""Packed against padded micro-batches under a layout (the ``packing`` check of a layout job,
tests/workers/suite.py).

The policy is built as the trainer builds it (the hidden-states head and the fused log-prob
kernel). One batch of samples of different lengths goes through the log-prob pass and through one
update's forward and backward (the PPO loss aggregated per ``loss_agg_mode``, no optimizer step),
first padded (``train.micro_batch_size`` samples a micro-batch), then packed (a token budget: other
micro-batches, other splits over data-parallel ranks). The log-probs, the entropy, the sum of
squared probabilities of the old-log-prob pass (the policy's estimator is the optimal token
baseline) and every gradient must agree: aggregation is exact whatever the split, and packing changes nothing else.
With ``replay`` (an MoE model) both passes replay a random engine routing, which checks that each
packed token gets its own experts; with ``router_losses`` Megatron's load-balancing and z-losses
are on (padding, a pack's alignment and tail count in neither) and the packs hold the padded
micro-batches' samples (the losses are per micro-batch).

The report (rank 0) gives the largest differences over every rank, and the log-probs.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch
import torch.distributed as dist

from megarl.config import AlgorithmConfig, ModelConfig, TrainConfig, layout_multiple
from megarl.trainer.batch import TrainBatch, pack_routed_experts
from megarl.trainer.model import TrainModel, _micro_batch_loss
from megarl.trainer.policy import Policy, attach_hidden_states_heads

LENGTHS = [(5, 7), (9, 3), (4, 10), (6, 4), (3, 1), (7, 9), (2, 5), (8, 2)]
"""(prompt, response) tokens of the batch's samples."""
MAX_RESPONSE = 10


def _batch(model: TrainModel, layout, replay: bool) -> TrainBatch:
    hf_config = model.spec.hf_config
    generator = np.random.default_rng(11)
    prompts = [generator.integers(1, hf_config.vocab_size, prompt).tolist() for prompt, _ in LENGTHS]
    responses = [generator.integers(1, hf_config.vocab_size, response).tolist() for _, response in LENGTHS]
    batch = TrainBatch.from_samples(
        prompts, responses, [[0.0] * len(response) for response in responses], [index // 2 for index in range(len(LENGTHS))],
        [False] * len(LENGTHS), pad_token_id=0, pad_multiple=layout_multiple(layout.tensor, layout.sequence_parallel, layout.context),
    )
    if replay:
        config = model.spec.transformer_config
        experts, topk = config.num_moe_experts, config.moe_router_topk
        arrays = [
            np.stack([[generator.permutation(experts)[:topk] for _ in range(hf_config.num_hidden_layers)] for _ in range(prompt + response - 1)])
            .astype(np.uint8)
            for prompt, response in LENGTHS
        ]
        batch.routed_experts = pack_routed_experts(arrays, batch.sequence_lengths, batch.tokens.shape[1], model.routers.moe_layers, experts)
        batch.routed_lengths = torch.tensor([len(array) for array in arrays])
    return batch


def _gradients(model: TrainModel, policy: Policy, batch: TrainBatch) -> dict[str, torch.Tensor]:
    forward_step = model._forward_step(lambda micro: functools.partial(_micro_batch_loss, policy, micro))
    model.run(model.micro_batches(batch, torch.arange(batch.size), policy.fields), forward_step, forward_only=False)
    gradients = {f"{index}.{name}": param.main_grad.clone() for index, chunk in enumerate(model.models) for name, param in chunk.named_parameters()}
    model.zero_grad()
    return gradients


def check(model_dir: str, layout, pg_collection, loss_agg_mode: str = "seq-mean-token-mean", replay: bool = False, router_losses: bool = False) -> dict:
    padded_train = TrainConfig(
        micro_batch_size=2, mini_batch_size=len(LENGTHS), global_batch_size=len(LENGTHS), use_distributed_optimizer=False, packing=False
    )
    if router_losses:
        # Megatron's load-balancing and z-losses are per micro-batch: the packs hold the padded
        # micro-batches' samples, and padding must count in neither.
        packed_train = dataclasses.replace(padded_train, packing=True, balance_batch=False)
        model_config = ModelConfig(path=model_dir, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001)
    else:
        packed_train = dataclasses.replace(padded_train, packing=True, dynamic_batch=True, max_tokens_per_micro_batch=40)
        model_config = ModelConfig(path=model_dir)
    model = TrainModel.build(
        model_dir, model_config, layout, padded_train, padded_train.optimizer, pg_collection=pg_collection, backend="torch",
        after_load=attach_hidden_states_heads, routing_replay=replay,
    )
    algorithm = AlgorithmConfig(loss_agg_mode=loss_agg_mode, entropy_coeff=0.01, advantage_estimator="optimal_token_baseline")
    policy = Policy(model, algorithm, padded_train, temperature=1.0, max_response_length=MAX_RESPONSE)
    batch = _batch(model, layout, replay)
    generator = torch.Generator().manual_seed(5)
    results = {}
    for mode, train in (("padded", padded_train), ("packed", packed_train)):
        model.train = train
        with policy._replaying(replay):
            log_probs, entropy = policy.log_probs(batch)
            sum_pi_squared = policy.old_log_probs(batch)[0]["sum_pi_squared"]
        if mode == "padded":
            noise = 0.05 * torch.randn(batch.tokens.shape, generator=generator)
            batch.token_values.update(
                old_log_probs=torch.where(batch.response_mask, log_probs + noise, 0.0),
                advantages=torch.randn(batch.tokens.shape, generator=generator),
                loss_weights=torch.ones(batch.tokens.shape),
            )
        with policy._replaying(replay):
            gradients = _gradients(model, policy, batch)
        results[mode] = (log_probs, entropy, sum_pi_squared, gradients)
    padded, packed = results["padded"], results["packed"]
    (padded_log_probs, padded_entropy, padded_sum_pi_squared, padded_gradients) = padded
    (packed_log_probs, packed_entropy, packed_sum_pi_squared, packed_gradients) = packed
    mask = batch.response_mask
    largest = torch.tensor(
        [
            float((padded_log_probs - packed_log_probs)[mask].abs().max()),
            float((padded_entropy - packed_entropy)[mask].abs().max()),
            float((padded_sum_pi_squared - packed_sum_pi_squared)[mask].abs().max()),
            max(float((padded_gradients[name] - packed_gradients[name]).abs().max()) for name in padded_gradients),
            max(float(gradient.abs().max()) for gradient in padded_gradients.values()),
        ],
        dtype=torch.float64,
    )
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return {
        "log_prob_diff": float(largest[0]),
        "entropy_diff": float(largest[1]),
        "sum_pi_squared_diff": float(largest[2]),
        "gradient_diff": float(largest[3]),
        "gradient_max": float(largest[4]),
        "log_probs": padded_log_probs[mask].tolist(),
        "sum_pi_squared": padded_sum_pi_squared[mask].tolist(),
        "vocab_size": model.spec.hf_config.vocab_size,
    }
