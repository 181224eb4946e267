"""How a task says an attempt failed, and whether trying again could help; how a worker fails."""

from __future__ import annotations

# AttemptFailed and JobRejected are raised by every task (the shell task too): they live in
# geartask.errors, below the worker and the shell package; named here for the worker's modules.
from ..errors import AttemptFailed, GeartaskError, JobRejected  # noqa: F401


class WorkerFailed(GeartaskError):
    """The worker process stopped because something kept failing that retrying will not cure (exit 1)."""
