"""The weight stream under TP, PP (with VPP), EP and ETP layouts: every bucket holds exactly the
bridge exporter's HF tensors, for each dtype and on a second step after the weights changed (real
processes on gloo, shared with the other layout checks: tests/jobs.py). Where SGLang's
``FlattenedTensorBucket`` loads, it reads the buckets and packs the exporter's tensors into the
same bytes."""

from __future__ import annotations

import pytest

from tests.hf_models import model_dir
from tests.jobs import layout_job

pytestmark = pytest.mark.multirank

# The tiny models hold about 1 MB of float32 weights: several buckets each.
BUCKET_MB = 0.1

# single-te-names: one process, the stream sees Transformer Engine's grouped expert names.
# Megatron needs SP with TP on MoE models. tiny-dense ties its embeddings: with PP the output
# layer's copy on the last stage maps to the same HF tensor, which travels once.
CASES = [
    ("bundled:tiny-moe", "single-te-names"),
    ("bundled:tiny-dense", "pp2-vpp2"),
    ("bundled:tiny-moe", "tp2-sp"),
    ("bundled:tiny-moe", "pp2"),
    ("bundled:tiny-moe", "tp2-ep2-etp1"),
    ("bundled:tiny-qwen2-moe", "tp2-sp"),
    ("bundled:tiny-qwen2-moe", "ep2"),
    # The routers' expert bias (a buffer) travels with the weights; MTP layers do not.
    ("bundled:tiny-glm4-moe", "tp2-ep2-etp1"),
    ("glm4-moe-variant", "tp2-sp"),
    # Multi-latent attention, and the routers' expert bias (a buffer) streamed as a weight.
    ("bundled:tiny-deepseek-v3", "tp2-sp"),
    ("bundled:tiny-deepseek-v3", "ep2"),
    # The attention output bias; one key/value head split over two ranks (tests/hf_models.py).
    ("llama-attention-bias", "tp2-sp"),
    ("llama-1-kv-head", "tp2"),
]


def stream_jobs(directory, model, layout):
    te_expert_names = layout == "single-te-names"
    return [
        layout_job(
            model_dir(directory, model), "single" if te_expert_names else layout,
            {"buckets": {"bucket_mb": BUCKET_MB, "te_expert_names": te_expert_names}},
        )
    ]


def buckets_report(jobs, model: str, layout: str) -> dict:
    (job,) = stream_jobs(jobs.directory, model, layout)
    return jobs.report(job.name)["buckets"]


@pytest.mark.jobs(planner=stream_jobs)
@pytest.mark.parametrize("model,layout", CASES)
def test_buckets_equal_the_exporter_bitwise(model, layout, jobs):
    report = buckets_report(jobs, model, layout)
    for dtype, steps in report["dtypes"].items():
        for step, comparison in enumerate(steps):
            assert comparison == {
                "missing": [], "extra": [], "unequal": [], "count": comparison["count"], "order_matches": True,
            }, (dtype, step, comparison)
    assert min(report["num_buckets"].values()) > 1, report


@pytest.mark.jobs(planner=lambda directory: stream_jobs(directory, "bundled:tiny-moe", "tp2-sp"))
def test_sglang_flattened_tensor_bucket_reads_the_buckets(jobs):
    report = buckets_report(jobs, "bundled:tiny-moe", "tp2-sp")
    if report["sglang"].startswith("unavailable"):
        pytest.skip(f"SGLang's tensor_bucket: {report['sglang']}")
    assert report["sglang"] == "ok"


def fill_with_index(index, buffer):
    from megarl.weights.bucket import Bucket

    buffer.fill_(index)
    return Bucket(buffer=buffer, metas=[])


@pytest.mark.cpu
@pytest.mark.parametrize("recycle", [True, False])
def test_double_buffering_refills_or_replaces_the_released_buffer(recycle):
    import torch

    from megarl.weights.stream import double_buffered

    buffers = [torch.zeros(4, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8)]
    kept = []
    for index, bucket in enumerate(double_buffered(fill_with_index, 5, buffers, recycle=recycle)):
        assert bucket.buffer.eq(index).all()  # the bucket the consumer holds is never written under it
        kept.append(bucket.buffer)
    # Recycled: five buckets through the two buffers (the first holds bucket 4 at the end); else
    # every released buffer was replaced, so each bucket handed out still holds its own bytes.
    if recycle:
        assert {buffer.data_ptr() for buffer in kept} == {buffer.data_ptr() for buffer in buffers}
        assert kept[0].eq(4).all()
    else:
        assert [int(buffer[0]) for buffer in kept] == [0, 1, 2, 3, 4]
