"""A HF checkpoint loaded into Megatron under a layout gives transformers' logits and exports back
to the same tensors (the ``logits`` check of a layout job, tests/workers/suite.py).

The report (rank 0) holds the max absolute logit difference against transformers (fp32) and the
export's comparison with the HF safetensors (missing, extra and unequal tensor names; the tensors
the family loads past, such as multi-token-prediction layers, are listed as ignored instead).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megarl.models.exporter import export_hf_tensors
from megarl.models.families import family_of
from megarl.models.loader import HFCheckpoint

BATCH = 2
SEQ_LENGTH = 16


def cp_positions(cp_rank: int, cp_size: int) -> torch.Tensor:
    chunk = SEQ_LENGTH // (2 * cp_size)
    return torch.cat(
        [
            torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk),
            torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk),
        ]
    )


def megatron_logits(chunks, spec, pg_collection, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full ``[batch, seq, vocab]`` logits on the last pipeline stage, None elsewhere."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    cp_size = pg_collection.cp.size()
    positions = cp_positions(pg_collection.cp.rank(), cp_size) if cp_size > 1 else torch.arange(SEQ_LENGTH)
    local_tokens = tokens[:, positions]

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch, positions.expand_as(batch), None)

        def collect(output_tensor, non_loss_data=False):
            return output_tensor.detach()

        return output, collect

    # One sequence per micro-batch: interleaved pipelines need at least PP micro-batches.
    micro_batches = list(local_tokens.split(1))
    iterators = [iter(micro_batches) for _ in chunks]
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=local_tokens.shape[1],
        micro_batch_size=1,
        forward_only=True,
        collect_non_loss_data=True,
    )
    if not outputs:
        return None
    logits = torch.cat(outputs, dim=0)  # [batch, seq/cp, vocab/tp]
    shards = [torch.empty_like(logits) for _ in range(pg_collection.tp.size())]
    dist.all_gather(shards, logits.contiguous(), group=pg_collection.tp)
    logits = torch.cat(shards, dim=-1)[..., : spec.hf_config.vocab_size]
    if cp_size > 1:
        pieces = [torch.empty_like(logits) for _ in range(cp_size)]
        dist.all_gather(pieces, logits.contiguous(), group=pg_collection.cp)
        full = torch.empty(BATCH, SEQ_LENGTH, logits.shape[-1])
        for rank, piece in enumerate(pieces):
            full[:, cp_positions(rank, cp_size)] = piece
        logits = full
    return logits


def check(chunks, spec, pg_collection, model_dir: str) -> dict | None:
    """Compare the logits of the loaded ``chunks`` with transformers' and their export with the
    checkpoint in ``model_dir``; the report on rank 0, None elsewhere."""
    for chunk in chunks:
        chunk.eval()
    tokens = torch.randint(0, spec.hf_config.vocab_size, (BATCH, SEQ_LENGTH), generator=torch.Generator().manual_seed(5))
    logits = megatron_logits(chunks, spec, pg_collection, tokens)
    # The last pipeline stage's first rank sends its logits to rank 0.
    last_stage_leader = dist.get_process_group_ranks(pg_collection.pp)[-1] if pg_collection.pp.size() > 1 else 0
    if dist.get_rank() == last_stage_leader and last_stage_leader != 0:
        dist.send(logits.contiguous(), 0)
    if dist.get_rank() == 0 and last_stage_leader != 0:
        logits = torch.empty(BATCH, SEQ_LENGTH, spec.hf_config.vocab_size)
        dist.recv(logits, last_stage_leader)

    exported = dict(export_hf_tensors(chunks, spec, pg_collection, dst=0))

    if dist.get_rank() != 0:
        return None
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference.eval()
    with torch.no_grad():
        expected = reference(tokens).logits
    checkpoint = HFCheckpoint(model_dir)
    ignored_prefixes = family_of(spec.hf_config).ignored_hf_tensors(spec.hf_config)
    ignored = {name for name in checkpoint.names() if name.startswith(ignored_prefixes)}
    names = checkpoint.names() - ignored
    unequal = []
    for name in sorted(names & exported.keys()):
        stored = checkpoint.read(name, 0, 0, checkpoint._handle(name).get_slice(name).get_shape()[0])
        if stored.dtype != exported[name].dtype or not torch.equal(stored, exported[name]):
            unequal.append(name)
    return {
        "max_logit_diff": (logits - expected).abs().max().item(),
        "missing": sorted(names - exported.keys()),
        "extra": sorted(exported.keys() - names),
        "unequal": unequal,
        "ignored": sorted(ignored),
        "exported": len(exported),
    }
