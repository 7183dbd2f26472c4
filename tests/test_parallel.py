"""Every parallel layout computes the single-rank loss and gradients (2 processes on gloo, shared
with the other layout checks: tests/jobs.py).

Each model's single-rank run records its initial weights, loss and gradients; each layout then
loads the same weights (every rank slicing what it owns), runs one global batch through Megatron's
``forward_backward_func`` with Megatron's DDP and ``finalize_model_grads``, and compares the loss
and each rank's gradient shards with the matching slices of the single-rank gradients.
"""

from __future__ import annotations

import pytest

from tests.hf_models import model_dir
from tests.jobs import layout_job

pytestmark = pytest.mark.multirank

LOSS_TOLERANCE = 1e-5
GRAD_TOLERANCE = 1e-5

LAYOUTS = {
    "bundled:tiny-dense": ["tp2", "pp2", "pp2-vpp2", "tp2-sp", "cp2"],
    # Megatron requires sequence parallelism with MoE under TP; experts split by ETP = TP.
    "bundled:tiny-moe": ["ep2", "pp2", "tp2-sp", "cp2"],
    # The attention output bias (its gradient summed over the sequence-parallel ranks), and one
    # key/value head over two ranks (tests/hf_models.py).
    "llama-attention-bias": ["tp2-sp"],
    "llama-1-kv-head": ["tp2"],
}


def gradient_jobs(directory, model, layout):
    """The single-rank reference (it runs first: one process before two), then the layout."""
    model_path = model_dir(directory, model)
    reference = str(directory / f"{model.removeprefix('bundled:')}.gradients.pt")
    return [
        layout_job(model_path, "single", {"gradients": {"reference": reference, "save": True}}),
        layout_job(model_path, layout, {"gradients": {"reference": reference, "save": False}}),
    ]


@pytest.mark.jobs(planner=gradient_jobs)
@pytest.mark.parametrize(
    "model,layout",
    [(model, layout) for model, layouts in LAYOUTS.items() for layout in layouts],
)
def test_layout_matches_single_rank(model, layout, jobs):
    _, job = gradient_jobs(jobs.directory, model, layout)
    report = jobs.report(job.name)["gradients"]
    assert abs(report["loss"] - report["reference_loss"]) <= LOSS_TOLERANCE, report
    assert report["max_grad_diff"] <= GRAD_TOLERANCE, report
    # Every rank held parameters (nothing silently skipped).
    assert all(count > 0 for count in report["params_per_rank"]), report
