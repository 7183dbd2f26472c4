"""Packed micro-batches give the padded ones' log-probs, entropy, sum of squared probabilities
(within [1 / V, 1]) and gradients under every layout
(real processes on gloo, the ``packing`` check of tests/workers/packing_check.py): dense and MoE,
single rank, TP2 with sequence parallelism, PP2 (and VPP), EP2, CP2; the MoE cases replay a random
engine routing, which each packed token must get, or train with Megatron's router losses, which
must leave padding out."""

from __future__ import annotations

import pytest

from tests.hf_models import model_dir
from tests.jobs import layout_job

pytestmark = pytest.mark.multirank

REPLAY = {"replay": True}
ROUTER_LOSSES = {"router_losses": True}
CASES = [("bundled:tiny-dense", layout, {}) for layout in ["single", "tp2-sp", "pp2", "pp2-vpp2", "cp2"]] + [
    ("bundled:tiny-moe", layout, REPLAY) for layout in ["single", "tp2-sp", "pp2", "ep2", "cp2"]
] + [
    # Multi-latent attention; a sigmoid router with an expert bias and partial rotary positions.
    ("bundled:tiny-deepseek-v3", "single", REPLAY), ("bundled:tiny-glm4-moe", "single", REPLAY),
] + [("bundled:tiny-qwen2-moe", layout, ROUTER_LOSSES) for layout in ["single", "ep2"]]
TOLERANCE = 1e-6


def packing_jobs(directory, model, layout, options):
    return [layout_job(model_dir(directory, model), layout, {"packing": options})]


@pytest.mark.jobs(planner=packing_jobs)
@pytest.mark.parametrize("model,layout,options", CASES)
def test_packed_equals_padded(model, layout, options, jobs):
    report = jobs.report(packing_jobs(jobs.directory, model, layout, options)[0].name)["packing"]
    assert report["log_prob_diff"] <= TOLERANCE
    assert report["entropy_diff"] <= TOLERANCE
    assert report["sum_pi_squared_diff"] <= TOLERANCE
    assert all(1 / report["vocab_size"] - TOLERANCE <= value <= 1 + TOLERANCE for value in report["sum_pi_squared"])
    assert report["gradient_max"] > 1e-4
    assert report["gradient_diff"] <= TOLERANCE, report
