"""The policy's hidden-states head in a model's output layer's place (the ``head`` check of a layout
job, tests/workers/suite.py).

Loads a model under a layout, records its parameters, its sharded checkpoint layout and the last
stage's logits shard, swaps the output layer for :class:`~megarl.trainer.policy.HiddenStatesHead`
and runs the same tokens again. The report (rank 0, every rank's findings): whether each rank's
parameters are the same objects under the same names, whether the checkpoint layout is the same
(keys, global shapes, offsets, replicas), the largest difference between the logits and the
hidden states times :attr:`TrainModel.output_weight` on the last stage, and the largest error of
the sum of squared probabilities from either (:mod:`megarl.trainer.sum_pi_squared`, the
vocabulary split over the tensor-parallel group) against the float64 reference on the gathered
logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megarl.models.builder import build_model, model_spec
from megarl.models.loader import load_hf_config, load_hf_weights
from megarl.trainer.model import TrainModel
from megarl.trainer.policy import attach_hidden_states_heads
from megarl.trainer.sum_pi_squared import sum_pi_squared, sum_pi_squared_from_hidden
from sum_pi_squared_check import TEMPERATURE, reference

BATCH = 2
SEQ_LENGTH = 16


def last_stage_outputs(chunks, tokens: torch.Tensor) -> list[torch.Tensor]:
    """What the model hands back for each sequence of ``tokens`` on the last pipeline stage
    (``[1, s, V / TP]`` logits, or ``[1, s, H]`` hidden states with the head); empty elsewhere."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch, torch.arange(SEQ_LENGTH).expand_as(batch), None)
        return output, lambda output_tensor, non_loss_data=True: output_tensor.detach()

    # One sequence per micro-batch: interleaved pipelines need at least PP micro-batches.
    micro_batches = list(tokens.split(1))
    iterators = [iter(micro_batches) for _ in chunks]
    with torch.no_grad():
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(micro_batches),
            seq_length=SEQ_LENGTH,
            micro_batch_size=1,
            forward_only=True,
            collect_non_loss_data=True,
        )


def checkpoint_layout(chunks) -> dict:
    """Each sharded checkpoint entry's global shape, offset and replica, by key."""
    layout = {}
    for index, chunk in enumerate(chunks):
        for key, entry in chunk.sharded_state_dict(metadata={"distrib_optim_sharding_type": "fully_reshardable"}).items():
            layout[f"chunk{index}.{key}"] = repr((getattr(entry, "global_shape", None), getattr(entry, "global_offset", None), entry.replica_id))
    return layout


def check(model_dir: str, layout, pg_collection) -> dict | None:
    """Swap the output layer for the head; the report on rank 0, None elsewhere."""
    spec = model_spec(load_hf_config(model_dir), layout)
    chunks = build_model(spec, "torch", pg_collection)
    load_hf_weights(chunks, spec, pg_collection, model_dir)
    for chunk in chunks:
        chunk.eval()
    tokens = torch.randint(0, spec.hf_config.vocab_size, (BATCH, SEQ_LENGTH), generator=torch.Generator().manual_seed(7))

    parameters = [(name, param) for chunk in chunks for name, param in chunk.named_parameters()]
    layout_before = checkpoint_layout(chunks)
    logits = last_stage_outputs(chunks, tokens)
    attach_hidden_states_heads(chunks, spec)
    hidden = last_stage_outputs(chunks, tokens)

    same_parameters = [(name, id(param)) for name, param in parameters] == [
        (name, id(param)) for chunk in chunks for name, param in chunk.named_parameters()
    ]
    model = TrainModel(spec=spec, chunks=chunks, models=[], optimizer=None, scheduler=None, pg_collection=pg_collection, train=None)
    worst = worst_sum_pi_squared = 0.0
    tp, vocab_size = pg_collection.tp, spec.hf_config.vocab_size
    options = dict(temperature=TEMPERATURE, vocab_size=vocab_size, group=tp)
    for before, after in zip(logits, hidden):
        worst = max(worst, (torch.nn.functional.linear(after, model.output_weight) - before).abs().max().item())
        shards = [torch.empty_like(before) for _ in range(tp.size())]
        dist.all_gather(shards, before.contiguous(), group=tp)
        expected = reference(torch.cat(shards, dim=-1), vocab_size, TEMPERATURE)
        for found in (sum_pi_squared(before, **options), sum_pi_squared_from_hidden(after, model.output_weight, **options)):
            worst_sum_pi_squared = max(worst_sum_pi_squared, (found.double() - expected).abs().max().item())
    found = {
        "same_parameters": same_parameters,
        "same_checkpoint_layout": layout_before == checkpoint_layout(chunks),
        "checkpoint_keys": len(layout_before),
        "outputs": len(hidden),
        "hidden_size": hidden[0].shape[-1] if hidden else None,
        "max_logit_diff": worst,
        "max_sum_pi_squared_error": worst_sum_pi_squared,
    }
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, found)
    return {"ranks": everyone, "hidden_size": spec.hf_config.hidden_size} if dist.get_rank() == 0 else None
