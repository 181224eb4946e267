"""The retry policy: how many attempts a job gets, and how long to wait between them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .dead_letters import cap_text
from .errors import JobRejected

if TYPE_CHECKING:
    from ..config import WorkerConfig

BACKOFF_MAX = 30.0  # ceiling on the wait between attempts of one job


class RetryPolicy:
    """``worker.retries`` extra attempts, or the job's own ``"retries"`` (capped by
    ``worker.max_retries``); ``worker.retry_backoff`` seconds before the first retry, doubled
    per attempt, at most BACKOFF_MAX. A JobRejected from a task is never retried."""

    def __init__(self, worker_config: WorkerConfig):
        self.default = min(worker_config.retries, worker_config.max_retries)
        self.ceiling = worker_config.max_retries
        self.base = worker_config.retry_backoff

    def retries_for(self, job: Any) -> int:
        """The job's retries: its envelope's, else a "retries" key of JSON-object data (plain
        clients, and the shell task's documented key), else worker.retries. JobRejected when
        its data can't be decoded or its "retries" is not a whole number >= 0."""
        options = job.options
        if options is not None and "retries" in options:
            return min(options["retries"], self.ceiling)  # checked by geartask.envelope
        data = job.data
        asked = data.get("retries") if isinstance(data, dict) else None
        if asked is None:
            return self.default
        if not isinstance(asked, int) or isinstance(asked, bool) or asked < 0:
            raise JobRejected(f"'retries' must be a whole number >= 0, got {cap_text(repr(asked), 80)}")
        return min(asked, self.ceiling)

    def backoff(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return min(self.base * 2 ** (attempt - 1), BACKOFF_MAX)
