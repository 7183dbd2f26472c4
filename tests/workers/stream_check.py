"""Stream a model's weights under a layout and compare every bucket with the bridge's exporter
(the ``buckets`` check of a layout job, tests/workers/suite.py).

One stream per dtype (kept, bfloat16, float16), two steps each: the weights as loaded, then after
every parameter got new values in new storage (the stream must read them through the plans it
made at construction). The report (rank 0) holds:
per dtype and step, the names the buckets miss or add and the tensors whose dtype, shape or bytes
differ from the exporter's (cast to the dtype); and, where SGLang's ``FlattenedTensorBucket`` can
be loaded, whether it reads our buckets and packs the exporter's tensors into the same bytes.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import re

import torch
import torch.distributed as dist

from megarl.models.exporter import export_hf_tensors
from megarl.weights.stream import WeightStream

DTYPES = {"keep": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A portable-spec expert weight, to be renamed as Transformer Engine's grouped MLP names it.
_LOCAL_EXPERT = re.compile(r"experts\.local_experts\.(\d+)\.linear_fc(\d)\.weight$")


class TransformerEngineExpertNames:
    """A model chunk whose expert weights carry TE's grouped-GEMM names, as ``TEGroupedMLP``
    registers them: ``mlp.experts.linear_fc1.weight3`` for local expert 3."""

    def __init__(self, chunk):
        self.chunk = chunk
        self.decoder = chunk.decoder

    def named_parameters(self):
        for name, param in self.chunk.named_parameters():
            yield _LOCAL_EXPERT.sub(r"experts.linear_fc\2.weight\1", name), param

    def named_buffers(self):
        return self.chunk.named_buffers()


@functools.cache
def sglang_tensor_bucket():
    """SGLang's ``tensor_bucket`` module, or the reason it cannot be loaded.

    It needs only torch; when the ``sglang`` package is installed without its dependencies its
    ``__init__`` fails, so the module is then loaded from its file on its own. Once per process:
    the failed import leaves ``sglang`` half-imported, and a second attempt fails differently.
    """
    try:
        return importlib.import_module("sglang.srt.weight_sync.tensor_bucket"), None
    except ImportError as error:
        reason = f"import failed: {error}"
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        return None, f"sglang is not installed ({reason})"
    path = f"{spec.submodule_search_locations[0]}/srt/weight_sync/tensor_bucket.py"
    module_spec = importlib.util.spec_from_file_location("sglang_tensor_bucket", path)
    try:
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except (ImportError, OSError) as error:
        return None, f"cannot load {path}: {error}"
    return module, None


def compare(buckets, exported: dict[str, torch.Tensor], dtype) -> dict:
    """Names, count, dtypes, shapes and bytes of the buckets against the exporter's tensors."""
    streamed = {}
    for bucket in buckets:
        for name, tensor in bucket.named_tensors():
            if name in streamed:
                return {"duplicate": name}
            streamed[name] = tensor
    unequal = []
    for name in sorted(streamed.keys() & exported.keys()):
        expected = exported[name] if dtype is None else exported[name].to(dtype)
        got = streamed[name]
        if got.dtype != expected.dtype or got.shape != expected.shape or not torch.equal(
            got.view(torch.uint8), expected.contiguous().view(torch.uint8)
        ):
            unequal.append(name)
    return {
        "missing": sorted(exported.keys() - streamed.keys()),
        "extra": sorted(streamed.keys() - exported.keys()),
        "unequal": unequal,
        "count": len(streamed),
        "order_matches": list(streamed) == list(exported),
    }


def sglang_check(buckets, exported: dict[str, torch.Tensor], dtype) -> str:
    module, reason = sglang_tensor_bucket()
    if module is None:
        return f"unavailable: {reason}"
    for index, bucket in enumerate(buckets):
        metadata = [
            module.FlattenedTensorMetadata(
                name=meta.name, shape=torch.Size(meta.shape), dtype=meta.dtype,
                start_idx=meta.start, end_idx=meta.end, numel=meta.end - meta.start,
            )
            for meta in bucket.metas
        ]
        theirs = module.FlattenedTensorBucket(flattened_tensor=bucket.buffer, metadata=metadata)
        for name, tensor in theirs.reconstruct_tensors():
            expected = exported[name] if dtype is None else exported[name].to(dtype)
            if tensor.dtype != expected.dtype or not torch.equal(tensor, expected):
                return f"bucket {index}: SGLang reconstructs {name} differently"
        packed = module.FlattenedTensorBucket(
            named_tensors=[
                (meta.name, exported[meta.name] if dtype is None else exported[meta.name].to(dtype))
                for meta in bucket.metas
            ]
        )
        if not torch.equal(packed.get_flattened_tensor(), bucket.buffer):
            return f"bucket {index}: SGLang packs the exporter's tensors into other bytes"
    return "ok"


def stream_step(stream: WeightStream):
    """One step's buckets, copied: a bucket's buffer is reused once the next is asked for."""
    return [
        type(bucket)(buffer=bucket.buffer.clone(), metas=bucket.metas) for bucket in stream.buckets()
    ]


def check(chunks, spec, pg_collection, bucket_mb: float, te_expert_names: bool = False) -> dict | None:
    """Stream the loaded ``chunks`` (whose weights it changes) and compare every bucket with the
    exporter; ``te_expert_names`` shows the stream Transformer Engine's grouped expert names. The
    report on rank 0, None elsewhere."""
    streamed_chunks = chunks
    if te_expert_names:
        streamed_chunks = [TransformerEngineExpertNames(chunk) for chunk in chunks]
    streams = {
        name: WeightStream(streamed_chunks, spec, pg_collection, bucket_mb=bucket_mb, dtype=dtype, dst=0)
        for name, dtype in DTYPES.items()
    }
    steps = []
    for step in range(2):
        if step:
            # New values in new storage, as an optimizer step after offloading leaves them.
            for chunk in chunks:
                for param in chunk.parameters():
                    param.data = param.data * 1.5 + 0.25
        exported = dict(export_hf_tensors(chunks, spec, pg_collection, dst=0))
        streamed = {name: stream_step(stream) for name, stream in streams.items()}
        if dist.get_rank() == 0:
            steps.append((streamed, exported))
        elif any(streamed.values()):
            raise AssertionError(f"rank {dist.get_rank()} yielded buckets; only the destination does")

    if dist.get_rank() != 0:
        return None
    streamed, exported = steps[-1]
    return {
        "dtypes": {
            name: [compare(buckets[name], exported, DTYPES[name]) for buckets, exported in steps]
            for name in DTYPES
        },
        "num_buckets": {name: len(buckets) for name, buckets in streamed.items()},
        "sglang": sglang_check(streamed["bfloat16"], exported, torch.bfloat16),
    }
