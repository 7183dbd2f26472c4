"""Every parallel layout computes the single-rank loss and gradients (2 processes on gloo, shared
with the other layout checks: tests/jobs.py); re-initialising for another layout releases the
previous layout's groups.

Each model's single-rank run records its initial weights, loss and gradients; each layout then
loads the same weights (every rank slicing what it owns), runs one global batch through Megatron's
``forward_backward_func`` with Megatron's DDP and ``finalize_model_grads``, and compares the loss
and each rank's gradient shards with the matching slices of the single-rank gradients.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.distributed import ENVIRONMENT, REPO
from tests.hf_models import model_dir
from tests.jobs import layout_job

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


@pytest.mark.multirank
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


RE_INITIALISE = """
import json, os, sys
from megarl import parallel, platform
from megarl.config import ParallelConfig
platform.init_distributed()
counts = []
for _ in range(4):
    parallel.initialize(ParallelConfig())
    counts.append(len(os.listdir("/proc/self/task")))
parallel.destroy()
print(json.dumps(counts))
"""


@pytest.mark.cpu
def test_reinitialising_releases_the_previous_groups_and_their_threads():
    # Megatron's own teardown only forgot its groups: each layout left ~50 gloo threads behind,
    # which kept polling (a job suite of 40 layouts per rank spent most of a core on them).
    result = subprocess.run([sys.executable, "-c", RE_INITIALISE], cwd=REPO, env={**os.environ, **ENVIRONMENT}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads(result.stdout.splitlines()[-1])
    assert counts == [counts[0]] * 4, counts
