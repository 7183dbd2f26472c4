"""One forward/backward step of a tiny Megatron GPT model under a parallel layout (the
``gradients`` check of a layout job, tests/workers/suite.py).

Run once at world size 1 with ``save=True`` to record the initial weights, the loss and the
gradients in ``reference``; then under any layout to load the same weights (each rank slicing what
it owns), run the same global batch through Megatron's ``forward_backward_func`` (with Megatron's
DDP and ``finalize_model_grads``) and compare the loss and every local gradient with the
reference slice. The report is rank 0's.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

from megarl.models.builder import build_model, model_spec
from megarl.models.loader import load_hf_config

GLOBAL_BATCH = 8
SEQ_LENGTH = 16
MICRO_BATCH = 1


def global_name(local_name: str, chunk, ep_rank: int, num_local_experts: int) -> str:
    """Map a parameter name of this rank's chunk to its name in the single-rank model."""
    layer_match = re.match(r"decoder\.layers\.(\d+)\.", local_name)
    name = local_name
    if layer_match:
        layer = chunk.decoder.layers[int(layer_match.group(1))]
        name = f"decoder.layers.{layer.layer_number - 1}." + name[layer_match.end() :]
    expert_match = re.search(r"\.local_experts\.(\d+)\.", name)
    if expert_match:
        expert = ep_rank * num_local_experts + int(expert_match.group(1))
        name = name[: expert_match.start()] + f".local_experts.{expert}." + name[expert_match.end() :]
    return name


def local_slice(full: torch.Tensor, param, name: str, ranks: dict) -> torch.Tensor:
    """The part of the single-rank tensor ``full`` that this rank's ``param`` holds."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    rank, size = ranks["etp"] if ".experts." in name else ranks["tp"]
    dim = param.partition_dim
    if name.endswith("linear_fc1.weight"):
        # Gated MLP: Megatron keeps [gate shard; up shard] on each rank.
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim)[rank], up.chunk(size, dim)[rank]], dim=0)
    return full.chunk(size, dim)[rank]


def batch_for_rank(vocab_size: int, dp_rank: int, dp_size: int, cp_rank: int, cp_size: int):
    """This rank's share of one fixed global batch: sequences split over DP, each sequence split
    into 2*CP chunks of which CP rank r keeps chunks r and 2*CP-1-r."""
    generator = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, vocab_size, (GLOBAL_BATCH, SEQ_LENGTH + 1), generator=generator)
    loss_mask = (torch.rand(GLOBAL_BATCH, SEQ_LENGTH, generator=generator) > 0.2).float()
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    per_dp = GLOBAL_BATCH // dp_size
    rows = slice(dp_rank * per_dp, (dp_rank + 1) * per_dp)
    inputs, labels, loss_mask = inputs[rows], labels[rows], loss_mask[rows]
    positions = torch.arange(SEQ_LENGTH).expand_as(inputs)
    if cp_size > 1:
        chunks = SEQ_LENGTH // (2 * cp_size)
        keep = torch.cat(
            [
                torch.arange(cp_rank * chunks, (cp_rank + 1) * chunks),
                torch.arange((2 * cp_size - 1 - cp_rank) * chunks, (2 * cp_size - cp_rank) * chunks),
            ]
        )
        inputs, labels, loss_mask, positions = (t[:, keep] for t in (inputs, labels, loss_mask, positions))
    return [
        dict(tokens=inputs[i : i + MICRO_BATCH], labels=labels[i : i + MICRO_BATCH],
             loss_mask=loss_mask[i : i + MICRO_BATCH], position_ids=positions[i : i + MICRO_BATCH])
        for i in range(0, per_dp, MICRO_BATCH)
    ]


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    per_token_loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(output):
        loss_sum = (output.float() * batch["loss_mask"]).sum()
        num_tokens = batch["loss_mask"].sum().to(torch.int)
        return loss_sum, num_tokens, {"loss": torch.stack([loss_sum.detach(), num_tokens.float()])}

    return per_token_loss, loss_func


def check(model_dir: str, layout, pg_collection, reference: str, save: bool) -> dict | None:
    """Save the single-rank reference (``save``) or compare this layout's loss and gradients
    with it; the report on rank 0, None elsewhere."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.pipeline_parallel import get_forward_backward_func

    spec = model_spec(load_hf_config(model_dir), layout)
    chunks = build_model(spec, "torch", pg_collection)
    config = spec.transformer_config
    ranks = {"tp": (pg_collection.tp.rank(), pg_collection.tp.size()), "etp": (pg_collection.expt_tp.rank(), pg_collection.expt_tp.size())}
    ep_rank = pg_collection.ep.rank()
    num_local_experts = (config.num_moe_experts or 0) // layout.expert

    named = []  # (global name, local name, parameter)
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            named.append((global_name(name, chunk, ep_rank, num_local_experts), name, param))
    # Tied embeddings: a later pipeline stage holds its own copy of the embedding as output layer.
    aliases = {"output_layer.weight": "embedding.word_embeddings.weight"}

    saved = None if save else torch.load(reference)
    if saved is not None:
        with torch.no_grad():
            for gname, _, param in named:
                key = gname if gname in saved["weights"] else aliases[gname]
                param.copy_(local_slice(saved["weights"][key], param, gname, ranks))
    initial = {gname: param.detach().clone() for gname, _, param in named}

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False)
    models = [DistributedDataParallel(config, ddp_config, chunk, pg_collection=pg_collection) for chunk in chunks]
    config.finalize_model_grads_func = finalize_model_grads
    for model in models:
        model.zero_grad_buffer()

    batches = batch_for_rank(
        spec.hf_config.vocab_size, pg_collection.dp.rank(), pg_collection.dp.size(), pg_collection.cp.rank(), pg_collection.cp.size()
    )
    data_iterators = [iter(batches) for _ in models] if len(models) > 1 else iter(batches)
    seq_local = SEQ_LENGTH // layout.context
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=data_iterators,
        model=models if len(models) > 1 else models[0],
        num_microbatches=len(batches),
        seq_length=seq_local,
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )
    # Sum loss and tokens over the last pipeline stage of each data/context-parallel replica
    # (TP ranks hold the same values; count TP rank 0 only).
    totals = torch.zeros(2)
    if losses and pg_collection.tp.rank() == 0:
        totals = torch.stack([item["loss"] for item in losses]).sum(0)
    dist.all_reduce(totals)
    loss = (totals[0] / totals[1]).item()

    grads = {gname: param.main_grad.detach().clone() for gname, _, param in named}
    if save:
        torch.save(
            {"weights": initial, "grads": grads, "loss": loss,
             "tied": bool(getattr(spec.hf_config, "tie_word_embeddings", False))},
            reference,
        )
        return {"saved": reference, "loss": loss}
    worst_name, worst = "", 0.0
    for gname, _, param in named:
        key = gname if gname in saved["grads"] else aliases[gname]
        expected = local_slice(saved["grads"][key], param, gname, ranks)
        diff = (grads[gname] - expected).abs().max().item()
        if diff > worst:
            worst_name, worst = gname, diff
    worst_all = [None] * dist.get_world_size()
    dist.all_gather_object(worst_all, (worst, worst_name, len(named)))
    if dist.get_rank() != 0:
        return None
    return {
        "loss": loss,
        "reference_loss": saved["loss"],
        "max_grad_diff": max(w for w, _, _ in worst_all),
        "worst_param": max(worst_all)[1],
        "params_per_rank": [n for _, _, n in worst_all],
    }
