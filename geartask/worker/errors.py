"""How a task says an attempt failed, and whether trying again could help; how a worker fails."""

from __future__ import annotations

from ..errors import GeartaskError, JobError


class AttemptFailed(JobError):
    """This attempt failed; the worker retries it (up to the job's retries)."""

    def __init__(self, reason: str, details: dict | None = None):
        super().__init__(reason)
        self.reason = reason
        self.details = details or {}


class JobRejected(AttemptFailed):
    """The job can never succeed as sent (bad data, refused command): fail it without retrying."""


class WorkerFailed(GeartaskError):
    """The worker process stopped because something kept failing that retrying will not cure (exit 1)."""
