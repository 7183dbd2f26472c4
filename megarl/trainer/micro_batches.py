"""A pass's micro-batches on this rank: the plan of :func:`megarl.data.batching.plan_micro_batches`
under the model's layout, made into padded or packed micro-batches.

The update cuts a mini-batch by ``train.micro_batch_size`` samples or, with
``train.dynamic_batch``, by ``train.max_tokens_per_micro_batch`` tokens. The passes without
gradients (old and reference log-probs, the critic's values, a Megatron teacher's log-probs) keep no
activations for a backward, so they may take larger micro-batches: they are cut by
``train.forward_micro_batch_size`` and ``train.forward_max_tokens_per_micro_batch`` instead
(:meth:`megarl.config.TrainConfig.forward_only`; null: the update's). Every sample's log-probs
are computed from its own tokens alone (causal attention within the sample, per-token layers), so
a different cut changes them by rounding only (other matrix shapes), never by what the sample
shares a micro-batch with.
"""

from __future__ import annotations

import functools

import torch

from megarl.config import TrainConfig
from megarl.data.batching import packed_tokens, plan_micro_batches
from megarl.trainer.batch import TrainBatch
from megarl.trainer.packing import pack_multiples, packed_micro_batch


def rank_micro_batches(
    batch: TrainBatch, rows: torch.Tensor, fields, *, train: TrainConfig, pg_collection, transformer_config, interleaved: bool
) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of ``rows`` (indices into ``batch``), with the token values named
    in ``fields``; every data-parallel rank gets the same number of them.

    Each also carries ``row_response_mask [b, S']``: the whole rows' masks, for normalisers that
    must see whole responses under context parallelism.

    Padded (:meth:`TrainBatch.micro_batch`) or, with ``train.packing``, packed
    (:func:`~megarl.trainer.packing.packed_micro_batch`).

    With virtual pipeline stages (``interleaved``) the count is a multiple of the pipeline size
    (the interleaved schedule runs micro-batches in groups of that many), and every micro-batch
    has the length of the longest: the interleaved schedule exchanges forward activations and
    backward gradients with the same peer in one call, and megatron-core 0.16's shape exchange
    before it pairs them up wrongly when micro-batches differ in length (gloo reports a size
    mismatch).

    Args:
        batch: the step's samples.
        rows: ``[n]`` the rows of the pass (a mini-batch, or the whole batch).
        fields: the token values each micro-batch carries.
        train: the micro-batch size or token budget (the update's, or
            :meth:`~megarl.config.TrainConfig.forward_only`'s), packing and balancing.
        pg_collection: the process groups (data-, tensor-, context- and pipeline-parallel).
        transformer_config: the model's Megatron ``TransformerConfig`` (sequence parallelism, the
            sizes that weigh a sample's cost).
        interleaved: the model has virtual pipeline stages.
    """
    lengths = batch.sequence_lengths[rows].tolist()
    rows = rows.tolist()
    cp_rank, cp_size = pg_collection.cp.rank(), pg_collection.cp.size()
    sample_multiple, pack_multiple = pack_multiples(pg_collection.tp.size(), transformer_config.sequence_parallel, cp_size)
    plan = plan_micro_batches(
        lengths, pg_collection.dp.size(), train, packing=train.packing, balanced=train.balance_batch,
        sample_multiple=sample_multiple, pack_multiple=pack_multiple, linear_cost=attention_linear_cost(transformer_config),
        count_multiple=pg_collection.pp.size() if interleaved else 1,
    )[pg_collection.dp.rank()]
    plan_rows = [[rows[index] for index in indices] for indices in plan]
    if train.packing:
        make = functools.partial(packed_micro_batch, sample_multiple=sample_multiple, pack_multiple=pack_multiple)
        lengths_of = [packed_tokens(indices, lengths, sample_multiple=sample_multiple, pack_multiple=pack_multiple) for indices in plan]
    else:
        make = TrainBatch.micro_batch
        lengths_of = [batch.micro_batch_length(micro_rows) for micro_rows in plan_rows]
    # Under VPP every micro-batch of the pass is as long as the longest (see above).
    length = max(lengths_of) if interleaved else None
    micro_batches = [make(batch, micro_rows, fields, cp_rank=cp_rank, cp_size=cp_size, length=length) for micro_rows in plan_rows]
    for micro in micro_batches:
        micro["row_response_mask"] = batch.response_mask[micro["rows"]]
    return micro_batches


def attention_linear_cost(config) -> float:
    """The linear coefficient ``c`` of a sample's cost ``L (c + L)`` for balancing
    (:func:`plan_micro_batches`): the projections and the MLP cost about ``4 h^2 + 3 h f``
    multiply-adds a token (``f`` the FFN width, the active experts' with MoE), causal attention
    ``2 h`` per pair of tokens over ``L^2 / 2`` pairs, ``h L^2``; so ``c = 4 h + 3 f``."""
    hidden = config.hidden_size
    ffn = config.ffn_hidden_size
    if config.num_moe_experts:
        ffn = (config.moe_ffn_hidden_size or ffn) * config.moe_router_topk + (config.moe_shared_expert_intermediate_size or 0)
    return 4 * hidden + 3 * ffn
