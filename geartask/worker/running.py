"""The job a worker thread runs now, as the runner, the watchdog and the control handlers act on it.

One RunningJob per job thread, reused from job to job (the per-job path allocates no Event
or Lock). It owns the running job's cancel event, an operator's stop request, its
abandonment, the answer lock that makes the thread's answer and the watchdog's (or a stop's)
failure exclude each other, the start times the watchdog and ``ping`` read, and the outcome
record the thread reports before the answer.

    thread:   begin(job) ... runner.run(running, job) ... finish() -> abandoned?
    watchdog: overdue(now, limit) -> abandon(job)
    control:  request_stop(job) (a shell command or isolated task: killed through cancel)
              or abandon(job) (a plugin task: failed for the thread, which is replaced)
    shutdown: cancel_now() (grace over)
"""

from __future__ import annotations

import threading
from typing import Any

from .stats import TaskCounters


class RunningJob:
    """The job one thread runs (``job`` is None between jobs), and who may end it how."""

    __slots__ = ("job", "started", "attempt_started", "cancel", "stop_requested", "abandoned",
                 "lock", "outcome", "counters", "_cancel_all")

    def __init__(self, counters: TaskCounters, cancel_all: threading.Event | None = None):
        self.job: Any = None  # the Job running now
        self.started = 0.0  # monotonic time the thread took the job
        self.attempt_started = 0.0  # when the current attempt began (the watchdog's clock)
        self.cancel = threading.Event()  # the job's job.cancel: set at shutdown past grace, or by a stop
        self.stop_requested = False  # an operator stopped the job (set with cancel, under lock)
        self.abandoned = False  # the watchdog or a stop answered for the job; the thread answers nothing
        self.lock = threading.Lock()  # the thread's answer and an abandonment exclude each other
        self.outcome: dict | None = None  # the outcome record of the job just served, if it is reported
        self.counters = counters  # the thread's per-task counters (written by its thread only)
        self._cancel_all = cancel_all  # set when the process cancels every job (shutdown past grace)

    def begin(self, job: Any, now: float) -> None:
        """The thread starts ``job``. After an operator's stop the cancel is cleared for it
        (unless the process is cancelling every job). ``job.started`` is set before ``job``
        is published: the watchdog reads both."""
        if self.stop_requested:
            self.stop_requested = False
            if self._cancel_all is None or not self._cancel_all.is_set():
                self.cancel.clear()
        job.started = self.started = self.attempt_started = now
        self.outcome = None
        self.job = job

    def attempt(self, now: float) -> None:
        """A new attempt of the job begins (the watchdog's job_timeout counts from here)."""
        self.attempt_started = now

    def finish(self) -> bool:
        """The thread is done with its job; True when it was abandoned meanwhile (then the
        thread sends nothing for it: the watchdog or a stop answered)."""
        with self.lock:  # from here on an abandonment leaves this job alone, or has taken it
            self.job = None
            return self.abandoned

    @property
    def interrupted(self) -> bool:
        """The job must stop: cancelled (shutdown past grace, or a stop) or abandoned."""
        return self.cancel.is_set() or self.abandoned

    @property
    def stopped_by_operator(self) -> bool:
        """The interruption is an operator's stop (the job fails), not a shutdown (it is requeued)."""
        return self.stop_requested and not self.abandoned

    def overdue(self, now: float, limit: float) -> Any:
        """The job, when its current attempt has run longer than ``limit`` seconds (and it was
        not abandoned already); else None."""
        job = self.job
        if job is not None and not self.abandoned and now - self.attempt_started > limit:
            return job
        return None

    def request_stop(self, job: Any) -> bool:
        """An operator stops ``job``: cancel it (its command or isolated process is killed and
        the runner fails it with "stopped by operator"). False when it is no longer running."""
        with self.lock:
            if self.job is not job or self.abandoned:
                return False
            self.stop_requested = True
            self.cancel.set()
        return True

    def abandon(self, job: Any) -> bool:
        """Take ``job`` from its thread (the caller answers for it). False when it answered
        in the meantime."""
        with self.lock:
            if self.job is not job or self.abandoned:
                return False
            self.abandoned = True
        self.cancel.set()  # ends a retry backoff at once; a task that watches job.cancel may stop
        return True

    def cancel_now(self) -> None:
        """Shutdown past the grace: the job must end (gearmand gives it to another worker)."""
        self.cancel.set()
