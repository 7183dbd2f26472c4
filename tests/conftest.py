"""Shared pytest setup: GPU-only tests skip cleanly on machines without CUDA; the tests marked
``jobs`` share their processes (tests/jobs.py)."""

from __future__ import annotations

import pytest
import torch

from tests.jobs import Jobs


def pytest_collection_modifyitems(config, items):
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
