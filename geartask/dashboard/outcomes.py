"""What the Failed and Job pages read and change: the outcome store of the collector that runs
in the dashboard process (or, with --no-collector, the collector elsewhere, asked through gearmand)."""

from __future__ import annotations

from typing import Any, Callable

from ..outcomes.store import OutcomeStore

FAILED_LIMIT = 500  # rows on the Failed page; the filter narrows them


class OutcomesView:
    """Outcome records for the pages. ``requeue(records, by)`` resubmits failed jobs and returns
    one result dict per record ({"id", "ok", "handle"|"error"}); None when this process can't."""

    def __init__(self, store: OutcomeStore, requeue: Callable[[list[dict], str], list[dict]] | None = None):
        self.store = store
        self._requeue = requeue

    def failed(self, task: str | None = None, since: float | None = None,
               limit: int = FAILED_LIMIT) -> list[dict]:
        return self.store.failed(task=task, since=since, limit=limit)

    def job(self, key: str) -> list[dict]:
        """Every outcome of a unique key, oldest first; else the newest of a handle."""
        records = self.store.history(key)
        if records:
            return records
        latest = self.store.latest(handle=key)
        return [latest] if latest else []

    def get(self, id: str) -> dict | None:
        return self.store.get(id)

    def counts(self, since: float) -> dict[tuple[str, str], int]:
        return self.store.counts(since)

    def purge(self, ids: list[str] | None = None, older_than: float | None = None) -> int:
        return self.store.purge_failed(ids=ids, older_than=older_than)

    @property
    def can_requeue(self) -> bool:
        return self._requeue is not None

    def requeue(self, ids: list[str], by: str) -> list[dict[str, Any]]:
        if self._requeue is None:
            raise RuntimeError("requeue is not available in this process")
        records, results = [], []
        for id in ids:
            rec = self.store.get(id)
            if rec is None or rec.get("state") != "failed":
                results.append({"id": id, "ok": False, "error": "no such failed job"})
            else:
                records.append(rec)
        return results + (self._requeue(records, by) if records else [])
