"""What the sender reports: a JobResult per job, a Progress snapshot per batch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["JobResult", "Progress", "attempts_notice", "reason_attempts"]

MAX_ATTEMPTS = 1_000_000  # a worker's count above this is not a count


@dataclass
class JobResult:
    """What became of one job.

    ``state``: complete | failed | timeout | queued (a background job accepted by ``server``,
    not waited for). ``result`` is the decoded WORK_COMPLETE payload, ``error`` the reason
    (a geartask worker's JSON reason, or the sender's text). ``index`` is the job's position
    in the input.

    ``attempts`` is how many times the worker ran the job (its retries included): from the
    worker's failure reason, from its attempts notice (see ``attempts_notice``), else 1 for
    a completed job; None when not known (a queued background job, a job that timed out or
    that the sender gave up on). ``submissions`` is how many times the sender submitted it
    (more than 1 after a lost connection or a failover, see docs/sender.md).
    """

    task: str
    unique: str
    handle: str | None = None
    server: str | None = None
    state: str = "new"
    result: Any = None
    error: Any = None
    attempts: int | None = None
    seconds: float = 0.0
    background: bool = False
    data: list = field(default_factory=list)  # WORK_DATA chunks, decoded (up to the sender's max_data bytes)
    warnings: list = field(default_factory=list)  # the last WORK_WARNING payloads (the last is a failure's reason)
    progress: tuple[int, int] | None = None  # last WORK_STATUS (numerator, denominator)
    index: int = -1
    data_dropped: int = 0  # WORK_DATA chunks past max_data, not kept
    submissions: int = 0
    no_worker: bool = False  # no worker served its task when it was accepted (docs/sender.md)

    @property
    def ok(self) -> bool:
        return self.state in ("complete", "queued")

    def to_json(self) -> dict:
        """The ``--json`` line: task, unique, handle, server, state, result or error, attempts,
        submissions, seconds."""
        out: dict[str, Any] = {"task": self.task, "unique": self.unique, "handle": self.handle, "server": self.server,
               "state": self.state}
        if self.state in ("failed", "timeout"):
            out["error"] = self.error
        else:
            out["result"] = self.result
        out["attempts"] = self.attempts
        out["submissions"] = self.submissions
        out["seconds"] = round(self.seconds, 3)
        if self.no_worker:
            out["no_worker"] = True
        return out


@dataclass
class Progress:
    """A snapshot for on_progress: counts, rate and the WORK_STATUS of running jobs.
    ``total`` is None while the jobs come from an iterator that is not exhausted yet."""

    total: int | None
    done: int
    failed: int
    accepted: int
    elapsed: float
    running: list[tuple[str, int, int]]  # (task, numerator, denominator) of jobs reporting status

    @property
    def finished(self) -> int:
        return self.done + self.failed

    @property
    def rate(self) -> float:
        return self.finished / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        if self.total is None or not self.finished or self.finished >= self.total:
            return None
        return (self.total - self.finished) / self.rate


def _count(value: Any, least: int) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and least <= value <= MAX_ATTEMPTS:
        return value
    return None


def attempts_notice(warning: Any) -> int | None:
    """N when a decoded WORK_WARNING payload is exactly ``{"geartask": {"attempts": N}}``
    (N a whole number >= 1), else None.

    The contract with geartask workers: a worker sends this warning just before WORK_COMPLETE
    when a job succeeded after retries, so the sender can report the worker's attempts. It
    is not one of the job's warnings. Anything else, however close, is an ordinary warning.
    """
    if type(warning) is dict and len(warning) == 1:
        inner = warning.get("geartask")
        if type(inner) is dict and len(inner) == 1:
            return _count(inner.get("attempts"), 1)
    return None


def reason_attempts(reason: Any) -> int | None:
    """The worker's attempts from a failure reason (a geartask worker's JSON reason has
    ``"attempts": N``; 0 when it never ran the job, e.g. a task it does not have), or None."""
    return _count(reason.get("attempts"), 0) if isinstance(reason, dict) else None
