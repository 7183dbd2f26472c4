"""Shared pytest setup: GPU-only tests skip cleanly on machines without CUDA; the tests marked
``jobs`` share their processes (tests/jobs.py); under pytest-xdist (``-n 2``, the README's test
command) a test file runs whole on one worker, and all the files with ``jobs`` tests on the same one."""

from __future__ import annotations

import os
import re

import pytest
import torch

from tests.distributed import REPO
from tests.jobs import Jobs

_USES_JOBS = re.compile(r"@pytest\.mark\.jobs\(|def test_\w+\([^)]*\bjobs\b")
JOBS_FILES = frozenset(
    str(path.relative_to(REPO)) for path in (REPO / "tests").rglob("test_*.py") if _USES_JOBS.search(path.read_text())
)
"""The test files with tests marked ``jobs`` or asking for the ``jobs`` fixture (to run a job of
their own), as pytest names them (from the repository root): the fixture runs every planned job of
the session, so a file that asks for it on another worker would run them all a second time."""


SLOW_FIRST = (
    "jobs", "tests/test_train.py", "tests/trainer/test_async_rollout.py", "tests/test_sft.py",
    "tests/trainer/test_two_nodes.py", "tests/rollout/test_supervision.py",
    "tests/test_gpu_check.py", "tests/test_megatron_compat.py", "tests/rollout/test_client.py",
)
"""The scopes that take longest (a suite's ``--durations`` on the project's machine, 2026-12-05),
handed out first so that no long file starts last; the others follow, the larger first."""


def _share_the_cores() -> None:
    """In a pytest-xdist worker, a share of the machine's cores for torch in this process and in
    every process it starts (launches, engines, workers inherit ``OMP_NUM_THREADS``): with two
    workers on two cores, a second thread per process only contends (OpenMP threads spin while they
    wait), which costs the suite CPU time and wall time."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if not workers:
        return
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


_share_the_cores()


def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scheduling by scope, a scope being a test file (its module fixtures are built
    once), except that every file with ``jobs`` tests is one scope: the session's jobs then run
    once, on one worker (the ``jobs`` fixture plans them from every collected test)."""
    from xdist.scheduler import LoadScopeScheduling

    class FilesAndJobs(LoadScopeScheduling):
        ordered = False

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "jobs" if path in JOBS_FILES else path

        def _assign_work_unit(self, node) -> None:
            if not self.ordered:
                self.ordered = True
                for scope in reversed(SLOW_FIRST):
                    if scope in self.workqueue:
                        self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return FilesAndJobs(config, log)


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
