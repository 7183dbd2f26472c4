"""A sample's log-probs are the same whatever micro-batch the forward-only pass puts it in (a tiny MoE
policy in the single-process job suite, tests/workers/forward_check.py): the update's micro-batches,
train.forward_micro_batch_size padded and packed, train.forward_max_tokens_per_micro_batch."""

from __future__ import annotations

import pytest

from tests.hf_models import model_dir
from tests.jobs import layout_job

pytestmark = pytest.mark.multirank


def forward_jobs(directory):
    return [layout_job(model_dir(directory, "bundled:tiny-moe"), "single", {"forward": {}})]


@pytest.mark.jobs(planner=forward_jobs)
def test_a_samples_log_probs_do_not_depend_on_its_forward_micro_batch(jobs):
    # The pass runs the forward sizes' micro-batches (largest first when packed), and each sample's
    # log-probs are its own: other micro-batches change them by rounding at most.
    report = jobs.report(forward_jobs(jobs.directory)[0].name)["forward"]
    assert report["update"]["sizes"] == [2, 2, 2, 2]
    assert report["padded_8"]["sizes"] == [8]
    assert report["packed_1"]["sizes"] == [1] * 8
    assert report["packed_budget"]["sizes"] == [8]
    assert report["log_prob_min"] < -1.0
    for name in ("padded_8", "packed_1", "packed_budget"):
        assert report[name]["diff"] <= 1e-6, (name, report[name])
