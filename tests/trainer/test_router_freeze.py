"""``model.freeze_moe_router``: the routing weights leave training (a tiny Qwen2-MoE policy in the
single-process job suite, tests/workers/router_freeze_check.py): no gradient, no gradient buffer, no
optimizer state, unchanged by an optimizer step that moves every other weight; the shared experts'
gates with the routers. A dense model, and an expert-bias update rate, are refused by the config
(tests/test_config.py)."""

from __future__ import annotations

import pytest

from tests.hf_models import model_dir
from tests.jobs import layout_job

pytestmark = pytest.mark.multirank

MODEL = "bundled:tiny-qwen2-moe"
"""A router and a shared expert's gate in every MoE layer."""


def freeze_jobs(directory):
    return [layout_job(model_dir(directory, MODEL), "single", {"router_freeze": {}})]


@pytest.mark.jobs(planner=freeze_jobs)
def test_a_frozen_router_takes_no_gradient_and_keeps_its_weights(jobs):
    report = jobs.report(freeze_jobs(jobs.directory)[0].name)["router_freeze"]
    assert {name.split(".mlp.", 1)[1] for name in report["routing"]} == {"router.weight", "shared_experts.gate_weight"}
    assert len(report["routing"]) >= 2  # every MoE layer's
    assert report["requires_grad"] == report["in_grad_buffers"] == report["in_optimizer"] == 0
    assert report["others_in_optimizer"] > 0
    assert report["skipped_steps"] == 0
    assert report["unchanged"]
    assert report["others_moved"] > 1e-4
