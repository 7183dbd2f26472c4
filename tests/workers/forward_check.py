"""The forward-only passes' own micro-batches (the ``forward`` check of a layout job,
tests/workers/suite.py).

The policy is built as the trainer builds it (the hidden-states head and the fused log-prob
kernel). packing_check's batch of eight samples of different lengths goes through the log-prob
pass (:meth:`TrainModel.forward`, as the old-log-prob, reference, critic and teacher passes do)
four times: with the update's micro-batches (``train.micro_batch_size`` 2, padded, no forward size
set), with ``train.forward_micro_batch_size`` 8 (one padded micro-batch), packed with
``train.forward_micro_batch_size`` 1, and packed under a token budget with
``train.forward_max_tokens_per_micro_batch`` large enough for all eight. The report (rank 0): the
micro-batches each pass ran, by their sample counts, and the largest difference of each pass's
log-probs from the first, with whether they are equal bit for bit.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from megarl.config import AlgorithmConfig, ModelConfig, TrainConfig
from megarl.trainer.model import TrainModel
from megarl.trainer.policy import Policy, attach_hidden_states_heads
from packing_check import LENGTHS, MAX_RESPONSE, _batch


def check(model_dir: str, layout, pg_collection) -> dict:
    update = TrainConfig(
        micro_batch_size=2, mini_batch_size=len(LENGTHS), global_batch_size=len(LENGTHS), use_distributed_optimizer=False, packing=False
    )
    passes = {
        "update": update,
        "padded_8": dataclasses.replace(update, forward_micro_batch_size=8),
        "packed_1": dataclasses.replace(update, packing=True, forward_micro_batch_size=1),
        "packed_budget": dataclasses.replace(
            update, packing=True, dynamic_batch=True, max_tokens_per_micro_batch=40, forward_max_tokens_per_micro_batch=400
        ),
    }
    model = TrainModel.build(
        model_dir, ModelConfig(path=model_dir), layout, update, update.optimizer, pg_collection=pg_collection, backend="torch",
        after_load=attach_hidden_states_heads,
    )
    policy = Policy(model, AlgorithmConfig(), update, temperature=1.0, max_response_length=MAX_RESPONSE)
    batch = _batch(model, layout, replay=False)
    mask = batch.response_mask
    report: dict = {}
    reference = None
    for name, train in passes.items():
        model.train = train
        sizes = []

        def compute(micro, output):
            sizes.append(len(micro["rows"]))
            return policy._token_log_probs(micro, output)

        log_probs = model.forward(batch, ("log_probs",), compute)["log_probs"]
        reference = log_probs if reference is None else reference
        largest = torch.tensor([float((log_probs - reference)[mask].abs().max())], dtype=torch.float64)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        report[name] = {"sizes": sizes, "diff": float(largest[0]), "bitwise": bool(torch.equal(log_probs, reference))}
    report["log_prob_min"] = float(reference[mask].min())
    return report
