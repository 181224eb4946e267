"""``send status`` filters (``--state``, ``--task``, ``--since``, ``--limit``), applied as early as
they can be: task and age on the background record before any server is asked, state after,
and a limit by walking the record from its newest line back, so ``--limit 20`` against 20,000
records asks about a few hundred, not 20,000. docs/sender.md#background-jobs-and-status."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from .background import StatusResult
from .outcomes import resolve

if TYPE_CHECKING:
    from ..config import Config

STATES = ("queued", "running", "complete", "failed", "unknown", "unreachable")
_SERVER_STATES = {"queued", "running", "unreachable"}  # known without asking the outcomes collector
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # the record's "time" (geartask.sender.batch)


@dataclass(frozen=True)
class StatusFilter:
    states: frozenset[str] = frozenset()  # empty: every state
    task: str | None = None
    since: float | None = None  # seconds back from now
    limit: int | None = None  # the newest N that match

    @property
    def by_record(self) -> bool:
        """Whether the record lines themselves must be filtered (else every line is asked about)."""
        return self.task is not None or self.since is not None or self.limit is not None

    def record_matches(self, rec: dict, now: float) -> bool:
        if self.task is not None and rec.get("task") != self.task:
            return False
        if self.since is not None:
            try:
                at = datetime.strptime(str(rec.get("time")), TIME_FORMAT).timestamp()
            except ValueError:
                return False  # no readable time: not known to be recent
            if at < now - self.since:
                return False
        return True

    def shows(self, s: StatusResult) -> bool:
        return not self.states or s.state in self.states


def statuses(sender: Any, config: Config, handles: list[str] | None, flt: StatusFilter,
             now: float | None = None) -> Iterator[StatusResult]:
    """The statuses ``send status`` prints, oldest first, filtered."""
    now = time.time() if now is None else now
    need_outcomes = not flt.states or bool(flt.states - _SERVER_STATES)

    def resolved(asks: Iterable[Any] | None) -> Iterator[StatusResult]:
        found = sender.iter_status(asks)
        return resolve(found, config) if need_outcomes else found

    if handles:
        shown = (s for s in resolved(handles) if flt.shows(s))
        yield from (_newest(shown, flt.limit) if flt.limit else shown)
        return
    if not flt.by_record:
        yield from (s for s in resolved(None) if flt.shows(s))
        return
    records = [r for r in sender.record.records() if flt.record_matches(r, now)]
    if flt.limit is None:
        yield from (s for s in resolved(records) if flt.shows(s))
        return
    # newest first, a chunk at a time, until the limit is met: the rest are never asked about
    found: list[StatusResult] = []
    chunk = max(flt.limit, 100)
    end = len(records)
    while end > 0 and len(found) < flt.limit:
        start = max(0, end - chunk)
        part = [s for s in resolved(records[start:end]) if flt.shows(s)]
        found = part[-(flt.limit - len(found)):] + found
        end = start
        chunk *= 2
    yield from found


def _newest(shown: Iterable[StatusResult], limit: int) -> list[StatusResult]:
    out = list(shown)
    return out[-limit:]
