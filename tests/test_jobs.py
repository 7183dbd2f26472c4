"""The shared processes of the tests (tests/jobs.py): jobs of one name merge, a failed job fails
with its traceback, and the jobs after it still run."""

from __future__ import annotations

import pytest

from megarl.config import resolve_model_path
from tests.jobs import Job, JobFailed, Jobs, layout_job

pytestmark = pytest.mark.cpu

MODEL = str(resolve_model_path("bundled:tiny-dense"))


def test_jobs_of_one_name_merge_their_checks_and_refuse_to_differ():
    logits = layout_job(MODEL, "tp2", {"logits": {}})
    buckets = layout_job(MODEL, "tp2", {"buckets": {"bucket_mb": 0.1}})
    assert logits.merged(buckets) == Job(
        name=logits.name, kind="layout", model=MODEL, checks={"logits": {}, "buckets": {"bucket_mb": 0.1}}, nproc=2,
        layout=("--tp", "2"),
    )
    with pytest.raises(ValueError, match="check 'buckets' asked with"):
        buckets.merged(layout_job(MODEL, "tp2", {"buckets": {"bucket_mb": 0.2}}))
    with pytest.raises(ValueError, match="differ"):
        logits.merged(Job(name=logits.name, kind="layout", model=MODEL, checks={}, nproc=1))


def test_a_failed_job_fails_with_its_traceback_and_the_next_runs_in_a_new_launch(tmp_path):
    jobs = Jobs(tmp_path)
    missing = tmp_path / "no-such-model"
    broken, sound = layout_job(str(missing), "single", {"logits": {}}), layout_job(MODEL, "single", {"logits": {}})
    jobs.run([broken, sound])
    with pytest.raises(JobFailed, match=rf"(?s)job '{missing} under single'.*Traceback.*{missing}"):
        jobs.report(broken.name)
    assert jobs.report(sound.name)["logits"]["max_logit_diff"] <= 1e-4
    assert sorted(path.name for path in tmp_path.iterdir()) == ["launch-1", "launch-2"]


def test_the_xdist_scopes_named_first_exist_and_the_jobs_files_are_found():
    from tests.conftest import JOBS_FILES, SLOW_FIRST
    from tests.distributed import REPO

    assert {"tests/test_parallel.py", "tests/test_checkpoint.py", "tests/models/test_bridge.py"} <= JOBS_FILES
    # A test that asks for the fixture to run a job of its own shares the worker that runs them all.
    assert "tests/models/test_convert.py" in JOBS_FILES
    for scope in SLOW_FIRST:
        assert scope == "jobs" or ((REPO / scope).is_file() and scope not in JOBS_FILES), scope


def test_an_xdist_worker_and_what_it_starts_share_the_cores(monkeypatch):
    import os

    import torch

    from tests.conftest import _share_the_cores

    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    threads = torch.get_num_threads()
    try:
        _share_the_cores()
        expected = max(1, len(os.sched_getaffinity(0)) // 2)
        assert torch.get_num_threads() == expected and os.environ["OMP_NUM_THREADS"] == str(expected)
    finally:
        torch.set_num_threads(threads)
