"""``train.offload``'s round trip on a real Megatron model and optimizer (the ``offload`` check of a
layout job, tests/workers/suite.py).

For each of two set-ups (bf16 with the distributed optimizer: parameters in the DDP buffers, fp32
main-parameter shards of their own; bf16 without it: parameters outside any buffer; fp32 with the
distributed optimizer, main parameters that are views of the buffers, is the end-to-end run of
tests/test_train.py) two models are built alike and take one update on the same batch
(the Adam moments exist from then on). Model A's parameters, gradients and optimizer state then go
to the host and back (:class:`megarl.trainer.offload.Offload`) while model B's stay; both take a
second update. The report (rank 0), per set-up: the storages still holding memory between
offload and restore (none may), the tensors that differ from before the round trip (none may, bit
for bit), the parameter and ``main_grad`` views that no longer alias their buffers, the bytes
moved, and whether A's second update (its metrics and its parameters after it) equals B's bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from megarl.config import ModelConfig, TrainConfig, layout_multiple
from megarl.trainer.batch import TrainBatch
from megarl.trainer.model import TrainModel
from megarl.trainer.offload import KINDS, Offload

LENGTHS = [(5, 7), (9, 3), (4, 10), (6, 4)]
"""(prompt, response) tokens of the batch's samples."""
SETUPS = {"bf16-distributed": ("bf16", True), "bf16": ("bf16", False)}


class SquaredOutput:
    """An objective for the check: the mean square of the last stage's output over response tokens."""

    fields = ()
    metrics = ()

    def loss(self, micro, output):
        mask = micro["response_mask"].unsqueeze(-1).to(output.dtype)  # output: [b, s, V]
        loss_sum = (output.float().square() * mask).mean(-1).sum()
        return loss_sum, micro["response_mask"].sum().int(), {}


def _batch(model: TrainModel, layout) -> TrainBatch:
    generator = np.random.default_rng(3)
    vocab = model.spec.hf_config.vocab_size
    prompts = [generator.integers(1, vocab, prompt).tolist() for prompt, _ in LENGTHS]
    responses = [generator.integers(1, vocab, response).tolist() for _, response in LENGTHS]
    return TrainBatch.from_samples(
        prompts, responses, [[0.0] * len(response) for response in responses], list(range(len(LENGTHS))), [False] * len(LENGTHS),
        pad_token_id=0, pad_multiple=layout_multiple(layout.tensor, layout.sequence_parallel, layout.context),
    )


def _state(offload: Offload) -> list[torch.Tensor]:
    """Copies of every tensor the round trip touches, views included (each parameter, each main_grad)."""
    return [tensor.detach().clone() for kind in KINDS for tensor in offload.views(kind)]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).contiguous().view(torch.uint8)


def _aliasing_failures(model: TrainModel) -> int:
    """Parameters and main_grads that are not views of their DDP buffers' storages."""
    failures = 0
    for ddp in model.models:
        for buffer in ddp.buffers + ddp.expert_parallel_buffers:
            for param in buffer.params:
                if buffer.param_data is not None and param.data.untyped_storage().data_ptr() != buffer.param_data.untyped_storage().data_ptr():
                    failures += 1
                if param.main_grad.untyped_storage().data_ptr() != buffer.grad_data.untyped_storage().data_ptr():
                    failures += 1
    return failures


def _setup(model_dir: str, layout, pg_collection, dtype: str, distributed: bool) -> dict:
    train = TrainConfig(
        micro_batch_size=2, mini_batch_size=len(LENGTHS), global_batch_size=len(LENGTHS), use_distributed_optimizer=distributed,
        fused_linear_logprob=False, packing=False, steps=2,
    )
    models = [
        TrainModel.build(model_dir, ModelConfig(path=model_dir, dtype=dtype), layout, train, train.optimizer, pg_collection=pg_collection, backend="torch")
        for _ in range(2)
    ]
    batch = _batch(models[0], layout)
    objective = SquaredOutput()
    for model in models:
        model.update(batch, objective, seed=0)
    offloaded, kept = models
    offload = Offload([offloaded], KINDS)
    before = _state(offload)
    storages = [tensor for kind in KINDS for tensor in offload.tensors(kind)]
    views = [tensor for kind in KINDS for tensor in offload.views(kind)]
    offload.to_host()
    still_held = sum(tensor.untyped_storage().size() != 0 for tensor in storages + views)
    offload.to_device()
    after = _state(offload)
    changed = sum(not torch.equal(_bits(first), _bits(second)) for first, second in zip(before, after))
    moved = offload.metrics()
    second = [model.update(batch, objective, seed=1) for model in models]
    parameters = [[param.detach().clone() for param in model.models[0].parameters()] for model in models]
    return {
        "storages": len(storages),
        "kinds": {kind: len(offload.tensors(kind)) for kind in KINDS},
        "still_held": still_held,
        "changed": changed,
        "compared": len(before),
        "not_aliased": _aliasing_failures(offloaded),
        "moved": moved,
        "second_update_equal": second[0] == second[1],
        "second_update": second[0],
        "parameters_equal": all(torch.equal(first, other) for first, other in zip(*parameters)),
    }


def check(model_dir: str, layout, pg_collection) -> dict:
    return {name: _setup(model_dir, layout, pg_collection, dtype, distributed) for name, (dtype, distributed) in SETUPS.items()}
