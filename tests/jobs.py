"""Checks that share their processes: many tests, one launch per world size.

Starting a rank costs seconds (Python, torch, Megatron, transformers) where a check on a tiny
model costs a fraction of one. A test that needs work done under a Megatron layout declares it
with ``@pytest.mark.jobs(planner=...)``: ``planner(directory, **params)`` returns the jobs
the test needs for its parameters (files go under ``directory``). Before the first such test
runs, the ``jobs`` fixture (tests/conftest.py) collects the jobs of every selected test, merges
those of the same name (a model under one layout answers the logits, gradient and bucket
questions of several test files at once), and runs them all: the single-process ones in one
``python`` process, then the others in one ``torchrun`` launch per world size, in the order the
tests were collected (tests/workers/suite.py). Each test then reads its job's report; a job that failed
fails its tests with the job's traceback, and the jobs after it run in a new launch.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
from pathlib import Path

from tests.distributed import ENVIRONMENT, REPO, TORCHRUN_ENVIRONMENT, launch, torchrun_command

SUITE = REPO / "tests" / "workers" / "suite.py"
SECONDS_PER_JOB = 60
"""The time a launch is given per job (besides a minute to start): a tiny model's check takes a
few seconds."""


@dataclasses.dataclass(frozen=True)
class Job:
    """Work for tests/workers/suite.py: the checks of ``kind`` on ``model`` under ``layout``."""

    name: str
    """Unique in a session; jobs of the same name are one job with the union of their checks."""
    kind: str
    """``layout`` (checks: ``logits``, ``gradients``, ``buckets``, ``head``, ``routing``, ``packing``, ``teacher``, ``forward``,
    ``router_freeze``) or ``checkpoint`` (``save`` or ``load``); see tests/workers/suite.py."""
    model: str
    """HF model directory."""
    checks: dict
    """Check name -> its keyword arguments."""
    nproc: int = 1
    layout: tuple[str, ...] = ()
    """Layout flags of tests/workers/common.py (``--tp 2 --sp``)."""

    def merged(self, other: Job) -> Job:
        same = dataclasses.replace(other, checks=self.checks)
        if same != self:
            raise ValueError(f"two jobs named {self.name!r} differ: {self} and {other}")
        for check in self.checks.keys() & other.checks.keys():
            if self.checks[check] != other.checks[check]:
                raise ValueError(f"job {self.name!r}: check {check!r} asked with {self.checks[check]} and {other.checks[check]}")
        return dataclasses.replace(self, checks={**self.checks, **other.checks})


class JobFailed(AssertionError):
    """A job raised, or its launch ended or timed out while running it."""


class Jobs:
    """The reports of the session's jobs."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._outcomes: dict[str, dict | JobFailed] = {}
        self._launches = 0

    def plan(self, planner, params: dict) -> list[Job]:
        """The jobs of one test: ``planner`` called with the parameters it names."""
        wanted = inspect.signature(planner).parameters
        return planner(self.directory, **{name: value for name, value in params.items() if name in wanted})

    def run(self, jobs: list[Job]) -> None:
        """Run ``jobs`` (merging those of the same name): one process first, then the others."""
        merged: dict[str, Job] = {}
        for job in jobs:
            merged[job.name] = merged[job.name].merged(job) if job.name in merged else job
        for nproc in sorted({job.nproc for job in merged.values()}):
            self._launch_all([job for job in merged.values() if job.nproc == nproc], nproc)

    def report(self, name: str) -> dict:
        """The report of job ``name``; raises :class:`JobFailed` with its error if it failed."""
        outcome = self._outcomes[name]
        if isinstance(outcome, JobFailed):
            raise outcome
        return outcome

    def _launch_all(self, jobs: list[Job], nproc: int) -> None:
        pending = jobs
        while pending:
            self._launches += 1
            out = self.directory / f"launch-{self._launches}"
            out.mkdir()
            plan = out / "plan.json"
            plan.write_text(json.dumps([dataclasses.asdict(job) for job in pending]))
            if nproc == 1:
                command, environment = [sys.executable, str(SUITE)], ENVIRONMENT
            else:
                command, environment = [*torchrun_command(nproc), str(SUITE)], TORCHRUN_ENVIRONMENT
            result = launch([*command, str(plan), str(out)], environment, timeout=60 + SECONDS_PER_JOB * len(pending))
            pending = self._collect(pending, out, result)

    def _collect(self, jobs: list[Job], out: Path, result) -> list[Job]:
        """Record the outcome of each job of a launch; return the jobs still to run."""
        for index, job in enumerate(jobs):
            errors = sorted(out.glob(f"{index:03d}.rank*.error"))
            report = out / f"{index:03d}.json"
            if errors:
                failure = "\n".join(f"--- {path.name} ---\n{path.read_text()}" for path in errors)
            elif report.exists():
                self._outcomes[job.name] = json.loads(report.read_text())
                continue
            else:
                failure = (
                    f"the launch ended with exit code {result.returncode} during this job\n"
                    f"--- stdout ---\n{result.stdout[-5000:]}\n--- stderr ---\n{result.stderr[-10000:]}"
                )
            self._outcomes[job.name] = JobFailed(f"job {job.name!r} ({out}/{index:03d}) failed:\n{failure}")
            return jobs[index + 1 :]
        return []


LAYOUTS = {
    "single": (),
    "tp2": ("--tp", "2"),
    "tp4": ("--tp", "4"),
    "tp2-sp": ("--tp", "2", "--sp"),
    "pp2": ("--pp", "2"),
    "pp2-vpp2": ("--pp", "2", "--vpp", "2"),
    "ep2": ("--ep", "2"),
    "cp2": ("--cp", "2"),
    "tp2-ep2-etp1": ("--tp", "2", "--sp", "--ep", "2", "--etp", "1"),
}
"""The layouts the tests run models under, by name."""
PROCESSES = {"single": 1, "tp4": 4}
"""The processes a layout runs on, where not two."""


def layout_job(model: str, layout: str, checks: dict) -> Job:
    """A model (HF directory) under a layout of :data:`LAYOUTS`, one job for all its checks."""
    return Job(
        name=f"{model} under {layout}", kind="layout", model=model, checks=checks,
        nproc=PROCESSES.get(layout, 2), layout=LAYOUTS[layout],
    )
