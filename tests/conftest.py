"""Shared pytest setup: GPU-only tests skip cleanly on machines without CUDA; the tests marked
``jobs`` share their processes (tests/jobs.py)."""

from __future__ import annotations

import pytest
import torch

from tests.jobs import Jobs


def pytest_collection_modifyitems(config, items):
    # The session's jobs run in the set-up of the first test that asks for them. Their launches
    # have timeouts of their own, scaled by their number of jobs (tests/jobs.py), and a launch
    # that times out names the job it was running; pytest-timeout's 600 s for that one test would
    # instead end the whole session's jobs at once on a starved machine (all their tests error).
    users = [item for item in items if "jobs" in getattr(item, "fixturenames", ())]
    if users:
        users[0].add_marker(pytest.mark.timeout(0))
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def jobs(request, tmp_path_factory) -> Jobs:
    """The reports of the jobs of every selected test marked ``@pytest.mark.jobs(planner=...)``,
    all run before the first of them (tests/jobs.py)."""
    session_jobs = Jobs(tmp_path_factory.mktemp("jobs"))
    planned = []
    for item in request.session.items:
        marker = item.get_closest_marker("jobs")
        if marker is not None:
            params = item.callspec.params if hasattr(item, "callspec") else {}
            planned.extend(session_jobs.plan(marker.kwargs["planner"], params))
    session_jobs.run(planned)
    return session_jobs
