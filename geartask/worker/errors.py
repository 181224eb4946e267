"""How a task says an attempt failed, and whether trying again could help; how a worker fails."""

from __future__ import annotations

import traceback

# AttemptFailed and JobRejected are raised by every task (the shell task too): they live in
# geartask.errors, below the worker and the shell package; named here for the worker's modules.
from ..errors import AttemptFailed, GeartaskError, JobRejected  # noqa: F401


class WorkerFailed(GeartaskError):
    """The worker process stopped because something kept failing that retrying will not cure (exit 1)."""


def task_traceback(exc: BaseException) -> str:
    """A task's exception as traceback text, from the task's own frame down (the runner's frame
    that called it left out); capped where it is stored (geartask.outcomes.record.cap_traceback)."""
    tb = exc.__traceback__
    return "".join(traceback.format_exception(type(exc), exc, tb.tb_next if tb is not None else None))


def failure_traceback(exc: BaseException) -> str | None:
    """The traceback a failed attempt keeps: a raising task's; for an AttemptFailed only the one
    an isolated task's process sent (a shell command's failure has its stderr instead)."""
    if isinstance(exc, AttemptFailed):
        trace = getattr(exc, "traceback", None)
        return trace if isinstance(trace, str) else None
    return task_traceback(exc)
