"""What the Failed and Job pages read and change, through the outcome client's operations:
answered in this process by the collector it runs (no round trip), or with --no-collector by
the collector elsewhere, through gearmand (geartask.outcomes.client)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..outcomes.client import OutcomeClient
from ..outcomes.failed import failed_targets
from ..sender.requeue import requeue
from ..outcomes.query import MAX_LIST, Queries, Refused, check_request
from ..outcomes.errors import QueryError

if TYPE_CHECKING:
    from ..config import Config

FAILED_LIMIT = 500  # rows on the Failed page; the filter narrows them
FULL_RECORDS = 10  # outcomes of one key read whole (result, data) on the Job page


class LocalOutcomeClient(OutcomeClient):
    """The OutcomeClient's operations answered by this process's collector, without gearmand."""

    def __init__(self, config: Config, queries: Queries):
        super().__init__(config)
        self.queries = queries

    def ask(self, op: str, **fields: Any) -> Any:
        try:
            return self.queries.run(check_request({"op": op, **{k: v for k, v in fields.items() if v is not None}}))
        except Refused as e:
            raise QueryError(f"bad query: {e}") from None


class OutcomesView:
    """Outcome records for the pages, from a collector (OutcomeClient or LocalOutcomeClient)."""

    def __init__(self, config: Config, client: OutcomeClient):
        self.config, self.client = config, client

    def failed(self, task: str | None = None, since: float | None = None, limit: int = FAILED_LIMIT) -> list[dict]:
        return self.client.failed(task=task, since=since, limit=min(limit, MAX_LIST))["records"]

    def job(self, key: str) -> list[dict]:
        """Every outcome of a unique key, oldest first (the newest read whole); else a handle's newest."""
        records = self.client.history(key, MAX_LIST)["records"]
        if not records:
            latest = self.client.latest(handle=key)
            return [latest] if latest else []
        return records[:-FULL_RECORDS] + [self.client.get(r["id"]) or r for r in records[-FULL_RECORDS:]]

    def counts(self, since: float) -> dict[tuple[str, str], int]:
        return {(c["task"], c["state"]): c["count"] for c in self.client.counts(since=since)}

    def per_minute(self, since: float) -> list[dict]:
        """[{minute, state, count}] since ``since`` (the throughput chart)."""
        return self.client.per_minute(since=since)

    def purge(self, ids: list[str] | None = None, older_than: float | None = None) -> int:
        return self.client.purge(ids=ids) if ids is not None else self.client.purge(older_than=older_than)

    def requeue(self, ids: list[str], by: str) -> list[dict]:
        """Send these failed jobs again (geartask.sender.requeue, as `failed requeue` does)."""
        uniques, lone, results = [], [], []
        for id in dict.fromkeys(ids):
            rec = self.client.get(id)
            if rec is None or rec.get("state") != "failed":
                results.append({"id": id, "ok": False, "error": "no such failed job"})
            elif rec.get("unique"):
                uniques.append(rec["unique"])
            else:
                lone.append([rec])
        groups, missing = failed_targets(self.client, uniques=dict.fromkeys(uniques))
        results += [{"unique": u, "ok": False, "error": "nothing failed left to requeue"} for u in missing]
        for r in requeue(self.config, self.client, groups + lone, by=by):
            results.append({**r.to_dict(), "ok": r.error is None})
        return results
