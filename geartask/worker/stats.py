"""Per-task job counters since the process started, as a ping reports them."""

from __future__ import annotations

from bisect import bisect_left
from typing import Iterable

# Upper bounds (seconds) of the job-duration histogram, Prometheus' "le" buckets; +Inf follows.
BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
_COMPLETE, _FAILED, _RETRIED, _SECONDS, _BUCKETS = 0, 1, 2, 3, 4
_SIZE = _BUCKETS + len(BOUNDS) + 1


class TaskCounters:
    """Counts of one writer (a job thread, or the watchdog under a lock) per task.

    Each job thread owns one, so counting is a few list-element adds with no lock; a ping
    sums every thread's counters (``summarize``). A task name the process does not serve (a
    misbehaving server may assign anything) is not counted, so memory stays bounded.
    """

    __slots__ = ("tasks",)

    def __init__(self, tasks: Iterable[str]):
        self.tasks: dict[str, list] = {name: [0] * _SIZE for name in tasks}

    def finished(self, task: str, seconds: float, ok: bool) -> None:
        """A job ended: completed (``ok``) or failed for good, after ``seconds`` in all."""
        c = self.tasks.get(task)
        if c is not None:
            c[_COMPLETE if ok else _FAILED] += 1
            c[_SECONDS] += seconds
            c[_BUCKETS + bisect_left(BOUNDS, seconds)] += 1

    def retried(self, task: str) -> None:
        """An attempt failed and the job will be tried again."""
        c = self.tasks.get(task)
        if c is not None:
            c[_RETRIED] += 1


def summarize(counters: Iterable[TaskCounters]) -> dict[str, dict]:
    """Every counter summed per task: ``{task: {"complete", "failed", "retried", "seconds_sum",
    "buckets": {"0.005": n, ..., "+Inf": n}}}``, buckets cumulative (jobs that took at most that)."""
    totals: dict[str, list] = {}
    for counter in counters:
        for task, c in list(counter.tasks.items()):
            t = totals.setdefault(task, [0] * _SIZE)
            for i, v in enumerate(list(c)):
                t[i] += v
    out = {}
    for task, t in sorted(totals.items()):
        buckets, running = {}, 0
        for bound, n in zip([*(_label(b) for b in BOUNDS), "+Inf"], t[_BUCKETS:], strict=False):
            running += n
            buckets[bound] = running
        out[task] = {"complete": t[_COMPLETE], "failed": t[_FAILED], "retried": t[_RETRIED],
                     "seconds_sum": round(t[_SECONDS], 6), "buckets": buckets}
    return out


def _label(bound: float) -> str:
    """0.005 -> "0.005", 1.0 -> "1", 300.0 -> "300" (as Prometheus' le labels read)."""
    return f"{bound:g}"
