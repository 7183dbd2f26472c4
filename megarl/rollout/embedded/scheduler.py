"""The ``hf`` engine's scheduler: one thread owns generation and batches every queued request.

``/generate`` handlers only queue a :class:`Job` and await its future. The scheduler thread takes
*every* job queued when it is free and generates them as one batch (their samples in arrival
order), so concurrent small requests share each forward pass. A job queued alone is generated
alone, exactly as the batch it sent: the trainer's one request per engine per step is unchanged.
A job's future resolves as soon as all its samples are finished, even while others in its batch
still generate.

Between two decoding steps (:class:`~megarl.rollout.embedded.generate.Decoding`) the thread
applies SGLang's controls (``sglang.srt.managers.scheduler``, ``tokenizer_manager``):

- ``pause(mode)``, with SGLang's modes: ``abort`` aborts everything queued and running and returns
  once the running batch has ended; ``in_place`` parks the batch (its KV cache kept) and
  ``retract`` parks it and drops its KV cache, recomputed over every token so far when it
  continues (under the weights of then). Both return once the batch is parked. While paused,
  new jobs wait in the queue and the model lock is free, so weight updates run at once.
- ``resume()`` (``/continue_generation``): the parked batch goes on from where it stopped.
- ``abort(rid, abort_all)``: a running sample stops with the tokens it has and SGLang's
  ``finish_reason`` ``{"type": "abort", "message": "Aborted", ...}``; a queued one answers
  at once with no tokens (``"Abort in waiting queue"``). As in SGLang, ``rid`` matches every
  sample whose id starts with it (a batch's samples are ``{rid}_{i}``).

Weight versions: every sample records, as SGLang's ``weight_versions`` spans, which version
produced which of its tokens; the version can only change while the batch is parked.

Generation, weight loads and the health probe take turns on ``model_lock``; the thread holds it
while a batch runs and releases it while parked.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from typing import Callable

from megarl.rollout.embedded.generate import BatchGenerator, Decoding, Request, Result

PAUSE_MODES: tuple[str, ...] = ("abort", "retract", "in_place")
"""SGLang's ``PauseGenerationReqInput.mode`` values."""
ABORTED = {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
"""SGLang's ``FINISH_ABORT().to_json()``: a running request stopped by an abort."""
ABORTED_WAITING = {"type": "abort", "message": "Abort in waiting queue"}
"""SGLang's finish reason of a request aborted before it started."""


@dataclasses.dataclass(frozen=True, slots=True)
class WeightVersionSpan:
    """Tokens ``start .. end - 1`` of a sample came from weights ``version`` (SGLang's span)."""

    version: str
    start: int
    end: int


@dataclasses.dataclass(frozen=True, slots=True)
class Completion:
    """One finished (or aborted) sample of a job."""

    result: Result
    weight_versions: list[WeightVersionSpan]
    """At least one span; the last one's version is the sample's ``weight_version``."""


@dataclasses.dataclass(eq=False, slots=True)
class Job:
    """The samples of one ``/generate`` request, queued or in a batch."""

    requests: list[Request]
    rids: list[str]
    """One id per sample, what ``/abort_request`` matches."""
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    """Resolves to one :class:`Completion` per sample."""
    first_row: int = 0
    """Row of its first sample in the running batch."""
    aborted: set[int] = dataclasses.field(default_factory=set)
    """Samples aborted while the job was queued (the others not): they stop at the first step."""


def _spans(changes: list[tuple[int, str]], tokens: int) -> list[WeightVersionSpan]:
    """Spans of a sample of ``tokens`` tokens, from the batch's ``(first step, version)`` changes."""
    spans = []
    for index, (start, version) in enumerate(changes):
        if start >= tokens and start > 0:
            break
        end = changes[index + 1][0] if index + 1 < len(changes) else tokens
        spans.append(WeightVersionSpan(version=version, start=start, end=min(end, tokens)))
    return spans


class GenerationScheduler:
    """Queues ``/generate`` jobs and generates them in batches on one thread.

    Args:
        generator: generates a batch on the engine's model.
        model_lock: held while a batch runs (released while parked); weight loads take it too.
        weight_version: the version of the weights the model holds now.
        on_progress: called whenever a batch advances (the health check's stall detector).
        step_delay_s: seconds to wait after each decoding step, model lock held (a GPU engine's
            per-token latency, modelled for benchmarks).
    """

    def __init__(
        self, generator: BatchGenerator, model_lock: threading.Lock, weight_version: Callable[[], str], on_progress: Callable[[], None],
        *, step_delay_s: float = 0.0,
    ):
        self.generator = generator
        self.step_delay_s = step_delay_s
        self.model_lock = model_lock
        self.weight_version = weight_version
        self.on_progress = on_progress
        self.state = threading.Condition()
        """Guards everything below; the thread waits on it for jobs, for a resume or an abort."""
        self.queue: list[Job] = []
        self.running: list[Job] = []
        self.pause_mode: str | None = None
        self.parked = False
        self.retract_requested = False
        """A retract pause was asked while a batch ran or was parked: it drops its cache on waking."""
        self.aborting: set[int] = set()
        """Rows of the running batch to stop at the next step boundary."""
        self.version_changes: list[tuple[int, str]] = []
        """The running batch's ``(first step, weight version)``, one entry per version it used."""
        self.thread = threading.Thread(target=self._serve_forever, name="hf-engine-scheduler", daemon=True)

    def start(self) -> None:
        """Start the scheduler thread."""
        self.thread.start()

    @property
    def paused(self) -> bool:
        """Whether ``/pause_generation`` holds generation."""
        return self.pause_mode is not None

    def submit(self, requests: list[Request], rids: list[str]) -> concurrent.futures.Future:
        """Queue one request's samples; the future resolves to a list of :class:`Completion`."""
        job = Job(requests=requests, rids=rids)
        with self.state:
            self.queue.append(job)
            self.state.notify_all()
        return job.future

    def abort(self, rid: str, abort_all: bool) -> None:
        """Abort every queued or running sample whose id starts with ``rid`` (all if ``abort_all``).

        An empty ``rid`` without ``abort_all`` aborts nothing, as in SGLang."""
        if not abort_all and not rid:
            return
        with self.state:
            self._abort_locked(lambda sample_rid: abort_all or sample_rid.startswith(rid))

    def pause(self, mode: str) -> None:
        """Pause generation (see the module docstring); returns once the pause holds.

        Raises:
            ValueError: ``mode`` is none of SGLang's.
        """
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode {mode!r} is not one of SGLang's {list(PAUSE_MODES)}")
        with self.state:
            # A retract asked before an in-place pause holds still drops the cache at resume.
            self.pause_mode = "retract" if self.pause_mode == "retract" else mode
            if mode == "retract":
                # Kept apart from pause_mode: a parked batch may wake only after the resume below.
                self.retract_requested = True
            if mode == "abort":
                self._abort_locked(lambda sample_rid: True)
                self.state.wait_for(lambda: not self.running)
            else:
                self.state.notify_all()
                self.state.wait_for(lambda: not self.running or self.parked)

    def resume(self) -> None:
        """``/continue_generation``: release a pause (a no-op when not paused)."""
        with self.state:
            self.pause_mode = None
            if not self.parked:
                self.retract_requested = False
            self.state.notify_all()

    def _abort_locked(self, matches: Callable[[str], bool]) -> None:
        kept = []
        for job in self.queue:
            aborted = {index for index, rid in enumerate(job.rids) if matches(rid)}
            if len(aborted) == len(job.rids):
                never_started = [Result(output_ids=[], logprobs=[], finish_reason=dict(ABORTED_WAITING)) for _ in job.rids]
                job.future.set_result(self._completions(never_started, [(0, self.weight_version())]))
            else:
                job.aborted.update(aborted)  # the rest of its request still runs: these stop at the first step
                kept.append(job)
        self.queue = kept
        for job in self.running:
            self.aborting.update(job.first_row + index for index, rid in enumerate(job.rids) if matches(rid))
        self.state.notify_all()

    def _serve_forever(self) -> None:
        while True:
            with self.state:
                self.state.wait_for(lambda: self.queue and not self.paused)
                self.running, self.queue = self.queue, []
                self.aborting.clear()
                rows = 0
                for job in self.running:
                    job.first_row, rows = rows, rows + len(job.requests)
                    self.aborting.update(job.first_row + index for index in job.aborted)
            with self.model_lock:
                self._run_batch()
            with self.state:
                self.running = []
                self.state.notify_all()

    def _run_batch(self) -> None:
        """Generate the running jobs as one batch and resolve their futures (model lock held)."""
        requests = [request for job in self.running for request in job.requests]
        self.version_changes = [(0, self.weight_version())]
        self.on_progress()  # the stall detector measures from here: the prefill comes before the first step
        try:
            results = self.generator.generate(requests, on_step=self._between_steps)
        except Exception as error:
            with self.state:
                for job in self.running:
                    if not job.future.done():
                        job.future.set_exception(error)
            return
        with self.state:
            self._deliver_locked(results)

    def _between_steps(self, decoding: Decoding) -> None:
        """Apply aborts and answer finished jobs; while paused, park (model lock released) until resumed."""
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        self.on_progress()
        with self.state:
            self._apply_aborts_locked(decoding)
            if not (self.paused and decoding.unfinished()):
                return
            retracted = False
            self.model_lock.release()
            self.parked = True
            self.state.notify_all()
            while self.paused and decoding.unfinished():
                retracted = retracted or self.pause_mode == "retract"
                self.state.wait()
                self._apply_aborts_locked(decoding)  # an abort while parked answers at once
            self.parked = False
            retracted = retracted or self.retract_requested
            self.retract_requested = False
        self.model_lock.acquire()
        self.on_progress()
        if self.weight_version() != self.version_changes[-1][1]:
            self.version_changes.append((decoding.steps, self.weight_version()))
        if retracted:
            decoding.drop_cache()

    def _apply_aborts_locked(self, decoding: Decoding) -> None:
        for row in self.aborting:
            decoding.finish(row, dict(ABORTED))
        self.aborting.clear()
        self._deliver_locked(decoding.results)

    def _completions(self, results: list[Result], version_changes: list[tuple[int, str]]) -> list[Completion]:
        return [Completion(result=result, weight_versions=_spans(version_changes, len(result.output_ids))) for result in results]

    def _deliver_locked(self, results: list[Result]) -> None:
        """Resolve the future of every running job whose samples have all finished."""
        for job in self.running:
            rows = results[job.first_row : job.first_row + len(job.requests)]
            if not job.future.done() and all(result.finish_reason for result in rows):
                job.future.set_result(self._completions(rows, self.version_changes))
