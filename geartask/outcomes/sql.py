"""The outcome stores' SQL, written once: sqlite (store.py) and PostgreSQL (pgstore.py) ask the
same questions of the same columns and differ only in the placeholder, the table's name, the
column that breaks ties between records received at the same moment, and how "no limit" is said.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LIGHT = "id, unique_key, handle, server, task, state, finished_at, fields, error, received_at"
FULL = LIGHT + ", reason, result, data"
INSERT_COLUMNS = ("id, unique_key, handle, server, task, state, finished_at, received_at, fields, error, "
                  "reason, result, data")


@dataclass(frozen=True)
class Dialect:
    """``mark``: the placeholder (``?``, ``%s``); ``tiebreak``: the insertion-order column
    (``rowid``, ``seq``); ``no_limit``: the LIMIT argument that means all rows (-1, NULL)."""

    table: str
    mark: str
    tiebreak: str
    no_limit: Any

    @property
    def newest(self) -> str:
        return f" ORDER BY received_at DESC, {self.tiebreak} DESC"  # the collector's clock, not a worker's

    @property
    def newest_finished(self) -> str:
        return f" ORDER BY finished_at DESC, {self.tiebreak} DESC"  # lists filtered by finished_at page by it

    def limit(self, limit: int | None) -> Any:
        return self.no_limit if limit is None else int(limit)

    def insert(self, verb: str = "INSERT", tail: str = "") -> str:
        """The INSERT of one store.record_row; ``verb`` (``INSERT OR IGNORE``) and ``tail``
        (``ON CONFLICT ...``) say what a record already stored does."""
        marks = ", ".join([self.mark] * 13)
        return f"{verb} INTO {self.table} ({INSERT_COLUMNS}) VALUES ({marks}){tail}"

    def latest(self, unique: str | None, handle: str | None, server: str | None) -> tuple[str, tuple]:
        m, head = self.mark, f"SELECT {FULL} FROM {self.table} WHERE "
        if unique is not None:
            return f"{head}unique_key = {m}{self.newest} LIMIT 1", (unique,)
        if handle is not None and server is not None:
            return f"{head}handle = {m} AND server = {m}{self.newest} LIMIT 1", (handle, server)
        if handle is not None:
            return f"{head}handle = {m}{self.newest} LIMIT 1", (handle,)
        raise ValueError("latest() needs a unique or a handle")

    def history(self, unique: str, limit: int | None) -> tuple[str, tuple]:
        return (f"SELECT {LIGHT} FROM {self.table} WHERE unique_key = {self.mark}{self.newest} LIMIT {self.mark}",
                (unique, self.limit(limit)))

    def get(self, id: str) -> tuple[str, tuple]:
        return f"SELECT {FULL} FROM {self.table} WHERE id = {self.mark}", (id,)

    def recent(self, *, state: str | None, task: str | None, since: float | None, until: float | None,
               limit: int | None, include_requeued: bool) -> tuple[str, tuple]:
        where: list[str] = []
        args: list[Any] = []
        for column, value in (("state", state), ("task", task)):
            if value is not None:
                where.append(f"{column} = {self.mark}")
                args.append(value)
        if not include_requeued:
            where.append("requeued = 0")
        if since is not None:
            where.append(f"finished_at >= {self.mark}")
            args.append(since)
        if until is not None:
            where.append(f"finished_at <= {self.mark}")
            args.append(until)
        sql = f"SELECT {LIGHT} FROM {self.table}" + (" WHERE " + " AND ".join(where) if where else "")
        return sql + self.newest_finished + f" LIMIT {self.mark}", (*args, self.limit(limit))

