"""Packed micro-batches give the padded ones' log-probs, entropy and gradients under every layout
(real processes on gloo, the ``packing`` check of tests/workers/packing_check.py): dense and MoE,
single rank, TP2 with sequence parallelism, PP2 (and VPP), EP2, CP2; the MoE cases replay a random
engine routing, which each packed token must get."""

from __future__ import annotations

import pytest

from tests.hf_models import model_dir
from tests.jobs import layout_job

pytestmark = pytest.mark.multirank

CASES = [("bundled:tiny-dense", layout, False) for layout in ["single", "tp2-sp", "pp2", "pp2-vpp2", "cp2"]] + [
    ("bundled:tiny-moe", layout, True) for layout in ["single", "tp2-sp", "pp2", "ep2", "cp2"]
] + [("bundled:tiny-qwen2-moe", "single", False)]
TOLERANCE = 1e-6


def packing_jobs(directory, model, layout, replay):
    return [layout_job(model_dir(directory, model), layout, {"packing": {"replay": replay}})]


@pytest.mark.jobs(planner=packing_jobs)
@pytest.mark.parametrize("model,layout,replay", CASES)
def test_packed_equals_padded(model, layout, replay, jobs):
    report = jobs.report(packing_jobs(jobs.directory, model, layout, replay)[0].name)["packing"]
    assert report["log_prob_diff"] <= TOLERANCE
    assert report["entropy_diff"] <= TOLERANCE
    assert report["gradient_max"] > 1e-4
    assert report["gradient_diff"] <= TOLERANCE, report
