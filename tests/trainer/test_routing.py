"""Routing replay on Megatron's routers (real processes on gloo, the ``routing`` check of
tests/workers/routing_check.py): the experts the routers use equal the engine's token by token and
layer by layer, R2's recording replays exactly, replayed log-probs do not depend on the layout, and
full recomputation (the routers run again in the backward) leaves the replayed gradients as they were."""

from __future__ import annotations

import pytest

from tests.hf_models import model_dir
from tests.jobs import layout_job

pytestmark = pytest.mark.multirank

CASES = [
    ("bundled:tiny-moe", layout) for layout in ["single", "ep2", "tp2-sp", "tp2-ep2-etp1", "pp2", "pp2-vpp2", "cp2"]
] + [
    # Sigmoid router with an expert bias, group-limited top-k, a shared expert, a first dense layer.
    ("bundled:tiny-glm4-moe", layout) for layout in ["single", "ep2", "tp2-sp"]
] + [
    # Multi-latent attention in front of the same kind of router.
    ("bundled:tiny-deepseek-v3", layout) for layout in ["single", "tp2-ep2-etp1"]
]
LOG_PROB_TOLERANCE = 1e-5


def routing_jobs(directory, model, layout):
    jobs = [layout_job(model_dir(directory, model), layout, {"routing": {}})]
    if layout != "single":
        jobs.append(layout_job(model_dir(directory, model), "single", {"routing": {}}))
    return jobs


@pytest.mark.jobs(planner=routing_jobs)
@pytest.mark.parametrize("model,layout", CASES)
def test_routers_use_the_replayed_experts_under_every_layout(model, layout, jobs):
    report = jobs.report(routing_jobs(jobs.directory, model, layout)[0].name)["routing"]
    assert report["compared"] == report["expected_compared"], report["compared"]
    assert report["engine_mismatches"] == 0
    assert report["record_mismatches"] == 0
    assert report["replayed_record_mismatches"] == 0
    # Replaying the routers' own routing changes nothing.
    assert max(abs(a - b) for a, b in zip(report["own_log_probs"], report["replayed_record_log_probs"])) <= LOG_PROB_TOLERANCE
    # The random engine routing is not what the routers choose: replay changed the log-probs.
    assert max(abs(a - b) for a, b in zip(report["own_log_probs"], report["replayed_log_probs"])) > 1e-3
    assert report["gradient_norm"] > 0 and report["recompute_gradient_diff"] <= 1e-6
    metrics = report["replay_metrics"]
    assert metrics["moe/routing_diff"] == 0.0
    assert metrics["moe/routing_diff_recomputed"] > 0.5
    if layout != "single":
        single = jobs.report(routing_jobs(jobs.directory, model, "single")[0].name)["routing"]
        for name in ("replayed_log_probs", "own_log_probs"):
            assert max(abs(a - b) for a, b in zip(report[name], single[name])) <= LOG_PROB_TOLERANCE, name
        for name, value in single["replay_metrics"].items():
            assert metrics[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
