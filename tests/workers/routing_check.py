"""Routing replay under a layout (the ``routing`` check of a layout job, tests/workers/suite.py).

The policy is built as the trainer builds it (``TrainModel.build(routing_replay=True)``). An
"engine" routing is drawn at random (distinct experts per token and layer, nothing a router would
choose on its own) for every token but each sample's last, as SGLang returns it. Three passes, the
experts each router used read back from the routers themselves by a forward hook and placed at
their (row, column, MoE layer):

- replay: the routers must use the engine's experts, token by token, layer by layer;
- record (R2): the routers' own choice, recorded by :class:`megarl.trainer.routing.Routers`;
- replay of the record: the routers must use the recorded experts, and the log-probs must equal
  those of the recording pass;

and the gradients of a replayed pass with full activation recomputation (each router runs again
in the backward, ``REPLAY_BACKWARD``) must equal those without.

The report (rank 0) gives the mismatches, the tokens compared and the log-probs, which the test
compares across layouts.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.distributed as dist

from megarl.config import ModelConfig, TrainConfig
from megarl.trainer.batch import TrainBatch, pack_routed_experts
from megarl.trainer.model import TrainModel
from megarl.trainer.packing import to_grid

LENGTHS = [(5, 7), (9, 3), (4, 10), (6, 4)]
"""(prompt, response) tokens of the batch's samples: micro-batches of different lengths (12 and 16
padded; under VPP TrainModel pads them all to 16)."""


def _batch(hf_config, moe_layers: list[int], num_experts: int, topk: int) -> TrainBatch:
    generator = np.random.default_rng(7)
    prompts = [generator.integers(0, hf_config.vocab_size, prompt).tolist() for prompt, _ in LENGTHS]
    responses = [generator.integers(0, hf_config.vocab_size, response).tolist() for _, response in LENGTHS]
    batch = TrainBatch.from_samples(
        prompts, responses, [[0.0] * len(response) for response in responses], list(range(len(LENGTHS))), [False] * len(LENGTHS),
        pad_token_id=0, pad_multiple=4,
    )
    layers = hf_config.num_hidden_layers
    arrays = [
        np.stack([[generator.permutation(num_experts)[:topk] for _ in range(layers)] for _ in range(prompt + response - 1)]).astype(np.uint8)
        for prompt, response in LENGTHS
    ]
    batch.routed_experts = pack_routed_experts(arrays, batch.sequence_lengths, batch.tokens.shape[1], moe_layers, num_experts)
    batch.routed_lengths = torch.tensor([len(array) for array in arrays])
    return batch


class _ReadBack:
    """The experts every router used, by (row, column, MoE layer), from forward hooks."""

    def __init__(self, model: TrainModel):
        self.used: dict[tuple[int, int, int], list[int]] = {}
        routers = model.routers
        self._micro = None
        before = routers.before_forward

        def remember(chunk_model, micro):
            self._micro = micro
            before(chunk_model, micro)

        routers.before_forward = remember
        for chunk_routers in routers._routers:
            for index, router in chunk_routers:
                router.register_forward_hook(self._hook(index, routers))

    def _hook(self, index: int, routers):
        def hook(router, args, output):
            # Each token's place in the batch, in the routers' order (packed or padded).
            micro = self._micro
            rows, columns = routers._local(micro["token_rows"]).tolist(), routers._local(micro["token_columns"]).tolist()
            routing_map = output[1].reshape(len(rows), -1)
            for token, (row, column) in enumerate(zip(rows, columns)):
                if row >= 0:
                    self.used[(row, column, index)] = routing_map[token].nonzero().flatten().tolist()

        return hook

    def mismatches(self, expected: torch.Tensor, sequence_lengths: torch.Tensor) -> tuple[int, int]:
        """(positions whose used experts differ from ``expected [B, S, L, k]``, positions compared),
        over every rank, for the real tokens (the last one's routing is the filler: checked too)."""
        wrong = compared = 0
        for (row, column, index), experts in self.used.items():
            if column >= int(sequence_lengths[row]):
                continue
            compared += 1
            wrong += experts != sorted(expected[row, column, index].tolist())
        totals = torch.tensor([wrong, compared], dtype=torch.float64)
        dist.all_reduce(totals)
        return int(totals[0]), int(totals[1])


def _build(model_dir: str, layout, pg_collection, recompute: str = "none") -> TrainModel:
    train = TrainConfig(micro_batch_size=1, fused_linear_logprob=False, use_distributed_optimizer=False)
    model = ModelConfig(path=model_dir, recompute=recompute)
    return TrainModel.build(model_dir, model, layout, train, train.optimizer, pg_collection=pg_collection, backend="torch", routing_replay=True)


def _log_probs(model: TrainModel, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from megarl.kernels.logprob_entropy import logprob_entropy

    values, _ = logprob_entropy(output, labels, temperature=1.0, vocab_size=model.spec.hf_config.vocab_size, group=model.pg_collection.tp)
    return values


def _replayed_gradients(model: TrainModel, batch: TrainBatch) -> dict[str, torch.Tensor]:
    """The gradients of the response log-probs' sum, the batch's routing replayed."""

    def loss(micro, output):
        total = torch.where(micro["response_mask"], to_grid(micro, _log_probs(model, output, micro["labels"])), 0.0).sum()
        return total, micro["response_mask"].sum(), {"loss": total.detach().double()}

    with model.routers.replaying_routing():
        model.run(model.micro_batches(batch, torch.arange(batch.size), ()), model._forward_step(lambda micro: functools.partial(loss, micro)), forward_only=False)
    gradients = {name: param.main_grad.clone() for chunk in model.models for name, param in chunk.named_parameters()}
    model.zero_grad()
    return gradients


def check(model_dir: str, layout, pg_collection) -> dict | None:
    model = _build(model_dir, layout, pg_collection)
    routers = model.routers
    config = model.spec.transformer_config
    batch = _batch(model.spec.hf_config, routers.moe_layers, config.num_moe_experts, config.moe_router_topk)

    def log_probs(micro, output):
        return {"log_probs": to_grid(micro, _log_probs(model, output, micro["labels"]))}

    def forward(replay: torch.Tensor | None):
        batch.routed_experts = replay
        read_back = _ReadBack(model)
        with routers.measuring() as metrics:
            if replay is None:
                with routers.recording(tuple(batch.tokens.shape)) as recorded:
                    values = model.forward(batch, ("log_probs",), log_probs)["log_probs"]
            else:
                recorded = {}
                with routers.replaying_routing():
                    values = model.forward(batch, ("log_probs",), log_probs)["log_probs"]
        return values, read_back, recorded.get("routed_experts"), metrics

    engine = batch.routed_experts
    replayed, read_back, _, replay_metrics = forward(engine)
    engine_wrong, compared = read_back.mismatches(engine, batch.sequence_lengths)
    own, own_read_back, recorded, _ = forward(None)
    record_wrong, _ = own_read_back.mismatches(recorded, batch.sequence_lengths)
    again, again_read_back, _, _ = forward(recorded)
    replay_record_wrong, _ = again_read_back.mismatches(recorded, batch.sequence_lengths)
    # Full recomputation runs every router again in the backward passes, which the pipeline
    # schedule interleaves with the next micro-batches' forwards: the gradients must not change.
    batch.routed_experts = engine
    gradients = _replayed_gradients(model, batch)
    recomputed = _replayed_gradients(_build(model_dir, layout, pg_collection, recompute="full"), batch)
    gradient_diff = torch.tensor(max(float((gradients[name] - recomputed[name]).abs().max()) for name in gradients))
    dist.all_reduce(gradient_diff, op=dist.ReduceOp.MAX)
    if dist.get_rank() != 0:
        return None
    mask = batch.response_mask
    return {
        "compared": compared,
        "expected_compared": int(batch.sequence_lengths.sum()) * len(routers.moe_layers),
        "engine_mismatches": engine_wrong,
        "record_mismatches": record_wrong,
        "replayed_record_mismatches": replay_record_wrong,
        "replayed_log_probs": replayed[mask].tolist(),
        "own_log_probs": own[mask].tolist(),
        "replayed_record_log_probs": again[mask].tolist(),
        "replay_metrics": replay_metrics,
        "recompute_gradient_diff": float(gradient_diff),
        "gradient_norm": float(sum(value.square().sum() for value in gradients.values()) ** 0.5),
    }
