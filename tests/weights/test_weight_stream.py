"""The weight stream under TP, PP (with VPP), EP and ETP layouts: every bucket holds exactly the
bridge exporter's HF tensors, for each dtype and on a second step after the weights changed (real
processes on gloo). Where SGLang's ``FlattenedTensorBucket`` loads, it reads the buckets and packs
the exporter's tensors into the same bytes."""

from __future__ import annotations

import json

import pytest

from megarl.config import resolve_model_path
from tests.distributed import REPO, run_python, run_torchrun

pytestmark = pytest.mark.multirank

WORKER = REPO / "tests" / "workers" / "stream_check.py"
# The tiny models hold about 1 MB of float32 weights: several buckets each.
BUCKET_MB = 0.1

LAYOUTS = {
    "single-te-names": ["--te-expert-names"],
    "tp2-sp": ["--tp", "2", "--sp"],
    "pp2": ["--pp", "2"],
    "pp2-vpp2": ["--pp", "2", "--vpp", "2"],
    "ep2": ["--ep", "2"],
    "tp2-ep2-etp1": ["--tp", "2", "--sp", "--ep", "2", "--etp", "1"],
}
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
]
_REPORTS: dict[tuple[str, str], dict] = {}


def report_for(model: str, layout: str, directory) -> dict:
    """Run the worker once per (model, layout) in this session and return its report."""
    if (model, layout) not in _REPORTS:
        path = directory / "report.json"
        args = [
            "--model", str(resolve_model_path(model)), "--bucket-mb", str(BUCKET_MB), "--report", str(path),
            *LAYOUTS[layout],
        ]
        if layout.startswith("single"):
            run_python(WORKER, args)
        else:
            run_torchrun(WORKER, args, nproc=2)
        _REPORTS[(model, layout)] = json.loads(path.read_text())
    return _REPORTS[(model, layout)]


@pytest.mark.parametrize("model,layout", CASES)
def test_buckets_equal_the_exporter_bitwise(model, layout, tmp_path):
    report = report_for(model, layout, tmp_path)
    for dtype, steps in report["dtypes"].items():
        for step, comparison in enumerate(steps):
            assert comparison == {
                "missing": [], "extra": [], "unequal": [], "count": comparison["count"], "order_matches": True,
            }, (dtype, step, comparison)
    assert min(report["num_buckets"].values()) > 1, report


def test_sglang_flattened_tensor_bucket_reads_the_buckets(tmp_path):
    report = report_for("bundled:tiny-moe", "tp2-sp", tmp_path)
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
