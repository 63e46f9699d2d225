"""Long work off the script thread: a process-wide board of background jobs, and a model guard.

A job runs engine calls (calibration, spectra, a sweep, a plan evaluation) in a daemon thread of
the app process. The engine writes every finished result to the store before the job reports it;
the job itself keeps only its state, the latest progress event, a message for the page and a small
return value. Pages poll the board (`app.progress.watch_job`), so two tabs see the same job, a
page stays responsive while it runs, and closing a tab loses nothing. A job is named by a plain id
built from its settings, so starting the same work twice joins the running job.

Stopping is cooperative: `JobBoard.stop` makes the job's next progress report raise `JobStopped`,
which ends the engine call after its current unit (a sweep keeps every point already stored).

`ModelGuard` serialises the use of one loaded model: compression swaps modules in place, so two
threads must never run, calibrate or compress the same model at once.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from engine.errors import RankScopeError, describe_error
from engine.progress import ProgressEvent

logger = logging.getLogger(__name__)


class JobState(str, enum.Enum):
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    STOPPED = "stopped"


class JobStopped(Exception):
    """Raised from a job's progress report after a stop was requested."""


@dataclass
class Job:
    """One piece of background work and what a page needs to show about it."""

    job_id: str
    label: str
    resumable: bool = False  # whether a stopped run keeps its finished units (a sweep does)
    state: JobState = JobState.RUNNING
    event: Optional[ProgressEvent] = None
    message: Optional[str] = None
    result: Any = None
    started_at: float = field(default_factory=time.time)
    finished_at: Optional[float] = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def running(self) -> bool:
        return self.state is JobState.RUNNING

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def stop_event(self) -> threading.Event:
        """Set when a stop was asked: for engine loops that check an event between units (a study) instead of
        ending through `report`."""
        return self._stop

    def report(self, event: ProgressEvent) -> None:
        """The engine's progress callback: remember the event, or end the work if a stop was asked."""
        if self._stop.is_set():
            raise JobStopped(self.label)
        self.event = event

    def observe(self, event: ProgressEvent) -> None:
        """A progress callback that only remembers the event (for work that stops through `stop_event`)."""
        self.event = event


class JobBoard:
    """Background jobs of this app process, by id. Thread-safe."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def start(self, job_id: str, label: str, work: Callable[[Job], Any], resumable: bool = False) -> Job:
        """Run `work(job)` in a daemon thread, unless a job with this id is already running (then join it).

        `resumable`: the work stores each finished unit, so a stopped run resumes where it stopped.
        """
        with self._lock:
            existing = self._jobs.get(job_id)
            if existing is not None and existing.running:
                return existing
            job = Job(job_id, label, resumable)
            self._jobs[job_id] = job
        thread = threading.Thread(target=self._run, args=(job, work), name=f"rankscope-job-{job_id[:48]}", daemon=True)
        thread.start()
        return job

    @staticmethod
    def _run(job: Job, work: Callable[[Job], Any]) -> None:
        try:
            job.result = work(job)
            job.state = JobState.DONE
        except JobStopped:
            job.message = (f"{job.label} was stopped. Everything finished before the stop is stored; run it again "
                           "to resume where it stopped." if job.resumable else
                           f"{job.label} was stopped before it finished; nothing of it was kept. Run it again to redo it.")
            job.state = JobState.STOPPED
        except RankScopeError as exc:
            job.message = describe_error(exc)
            job.state = JobState.FAILED
        except Exception as exc:  # noqa: BLE001 - a worker thread must report its failure to the page, not die silently
            logger.exception("Job %s failed", job.job_id)
            job.message = f"{describe_error(exc)}. This looks like a bug; the app's log has the details."
            job.state = JobState.FAILED
        finally:
            job.finished_at = time.time()

    def get(self, job_id: str) -> Optional[Job]:
        with self._lock:
            return self._jobs.get(job_id)

    def stop(self, job_id: str) -> None:
        job = self.get(job_id)
        if job is not None and job.running:
            job._stop.set()

    def forget(self, job_id: str) -> None:
        """Drop a finished job (for example after its error was dismissed); a running one is kept."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is not None and not job.running:
                del self._jobs[job_id]

    def running(self) -> list[Job]:
        with self._lock:
            return [job for job in self._jobs.values() if job.running]

    def with_prefix(self, prefix: str) -> list[Job]:
        """Jobs whose id starts with `prefix` (ids are built as model/kind/scope/request), oldest first."""
        with self._lock:
            return sorted((job for job in self._jobs.values() if job.job_id.startswith(prefix)),
                          key=lambda job: job.started_at)

    def wait(self, job_id: str, timeout: float) -> Optional[Job]:
        """Block until the job is no longer running or `timeout` seconds pass (for scripts and tests)."""
        deadline = time.monotonic() + timeout
        job = self.get(job_id)
        while job is not None and job.running and time.monotonic() < deadline:
            time.sleep(0.05)
        return job


class ModelBusy(RankScopeError):
    """The model is in use by another piece of work."""


class ModelGuard:
    """A re-entrant lock around one loaded model, remembering what holds it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.holder: Optional[str] = None

    @contextmanager
    def hold(self, purpose: str, timeout: Optional[float] = None) -> Iterator[None]:
        """Use the model for `purpose`; wait up to `timeout` seconds (None: as long as it takes).

        Raises `ModelBusy`, naming what holds the model, when the wait runs out.
        """
        acquired = self._lock.acquire() if timeout is None else self._lock.acquire(timeout=timeout)
        if not acquired:
            raise ModelBusy(f"The model is busy ({self.holder or 'another task'}). "
                            "This page continues when that finishes; you can also stop it where it shows progress.")
        previous, self.holder = self.holder, purpose
        try:
            yield
        finally:
            self.holder = previous
            self._lock.release()
