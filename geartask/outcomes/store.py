"""Where job outcomes are kept: the interface every backend implements, and the sqlite one.

Backends are interchangeable: tests/test_outcome_store.py runs one contract suite against
every backend in ``BACKENDS``, so a new one is added by writing the class and listing it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable

from .errors import StoreError
from .record import HEAVY, check

ERROR_CHARS = 500  # characters of a failure's message kept as a summary's "error"


class OutcomeStore(ABC):
    """Job outcomes, idempotent by the record's ``id`` (a worker's retry of a delivery, or a
    collector restarted between storing and acknowledging, stores nothing twice).

    Records come back as dicts with the fields of geartask.outcomes.record, plus
    ``requeues`` (a list of {by, at, handle, server}) once requeued, and ``error`` (a failure's
    message, at most ERROR_CHARS characters). *Summaries* (from ``history``, ``failed``,
    ``recent``) leave out ``result``, ``data`` and ``reason``, which may be large.
    """

    @abstractmethod
    def add(self, records: Iterable[dict], *, checked: bool = False) -> int:
        """Store records in one transaction (all or none), durably; returns how many were new.
        Each is checked (BadOutcome) unless ``checked`` says the caller did (record.check)."""

    @abstractmethod
    def latest(self, *, unique: str | None = None, handle: str | None = None,
               server: str | None = None) -> dict | None:
        """The newest outcome of a unique key, or of a handle (on ``server`` when given)."""

    @abstractmethod
    def history(self, unique: str, limit: int | None = None) -> list[dict]:
        """Summaries of the outcomes of a unique key, oldest first (the newest ``limit``)."""

    @abstractmethod
    def get(self, id: str) -> dict | None:
        """One record by id."""

    @abstractmethod
    def recent(self, *, state: str | None = None, task: str | None = None, since: float | None = None,
               until: float | None = None, limit: int | None = None, include_requeued: bool = True) -> list[dict]:
        """Summaries, newest first, of outcomes finished between ``since`` and ``until`` (both
        included; ``until`` pages back through a long list), of ``state`` and ``task``."""

    def failed(self, *, task: str | None = None, since: float | None = None, until: float | None = None,
               limit: int | None = None, include_requeued: bool = False) -> list[dict]:
        """Summaries of failed outcomes, newest first; requeued ones only when asked."""
        return self.recent(state="failed", task=task, since=since, until=until, limit=limit,
                           include_requeued=include_requeued)

    @abstractmethod
    def mark_requeued(self, id: str, by: str, at: float | None = None, handle: str | None = None,
                      server: str | None = None) -> bool:
        """Note on a record that it was sent again; False when there is no such record."""

    @abstractmethod
    def purge_failed(self, *, older_than: float | None = None, ids: Iterable[str] | None = None) -> int:
        """Delete failed records (finished before ``older_than``, or these ids); returns how many."""

    @abstractmethod
    def prune(self, keep_seconds: float) -> int:
        """Delete every record that finished more than ``keep_seconds`` ago; returns how many."""

    @abstractmethod
    def counts(self, since: float) -> dict[tuple[str, str], int]:
        """(task, state) -> outcomes finished since ``since``."""

    @abstractmethod
    def size(self) -> int:
        """How many records are kept."""

    def close(self) -> None:
        pass


def error_text(reason: Any) -> str | None:
    """A failure reason's message, short: its "error" when it is an object that has one."""
    if reason is None:
        return None
    if isinstance(reason, dict) and isinstance(reason.get("error"), str):
        text = reason["error"]
    elif isinstance(reason, str):
        text = reason
    else:
        text = json.dumps(reason, ensure_ascii=False)[:ERROR_CHARS * 2]
    return text if len(text) <= ERROR_CHARS else text[:ERROR_CHARS - 3] + "..."


# The indexed fields are columns; the other light fields one JSON object; the heavy ones apart,
# so summaries never read them.
_COLUMNS = ("id", "unique", "handle", "server", "task", "state", "finished_at")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS outcomes (
    id TEXT PRIMARY KEY,
    unique_key TEXT,
    handle TEXT NOT NULL,
    server TEXT NOT NULL,
    task TEXT NOT NULL,
    state TEXT NOT NULL,
    finished_at REAL NOT NULL,
    requeued INTEGER NOT NULL DEFAULT 0,
    fields TEXT NOT NULL,
    error TEXT,
    reason TEXT,
    result TEXT,
    data TEXT
);
CREATE INDEX IF NOT EXISTS outcomes_unique ON outcomes (unique_key, finished_at);
CREATE INDEX IF NOT EXISTS outcomes_handle ON outcomes (handle, server);
CREATE INDEX IF NOT EXISTS outcomes_state ON outcomes (state, finished_at);
CREATE INDEX IF NOT EXISTS outcomes_finished ON outcomes (finished_at);
"""
_LIGHT = "id, unique_key, handle, server, task, state, finished_at, fields, error"
_FULL = _LIGHT + ", reason, result, data"
_NEWEST = " ORDER BY finished_at DESC, rowid DESC"


def _row(row: tuple) -> dict:
    rec = dict(zip(_COLUMNS, row[:7]))
    if rec["unique"] is None:
        del rec["unique"]
    rec.update(json.loads(row[7]))
    if row[8] is not None:
        rec["error"] = row[8]
    if len(row) > 9:
        if row[9] is not None:
            rec["reason"] = json.loads(row[9])
        if row[10] is not None:
            rec["result"] = row[10]
        if row[11] is not None:
            rec["data"] = row[11]
    return rec


class SqliteOutcomeStore(OutcomeStore):
    """One sqlite file in WAL mode: readers never wait for the writer; one transaction per
    batch, synced to disk before ``add`` returns (synchronous=FULL: the collector acknowledges
    an outcome to gearmand only after that). Safe to share between threads."""

    def __init__(self, path: str | Path, busy_timeout: float = 30.0):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # busy_timeout: how long a write waits for another process's (a second reader's) lock
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=busy_timeout)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)

    def _rows(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [_row(r) for r in rows]

    def add(self, records: Iterable[dict], *, checked: bool = False) -> int:
        rows = []
        for rec in records:
            if not checked:
                rec = check(rec)
            light = {k: v for k, v in rec.items() if k not in _COLUMNS and k not in HEAVY}
            reason = rec.get("reason")
            rows.append((rec["id"], rec.get("unique"), rec["handle"], rec["server"], rec["task"], rec["state"],
                         rec["finished_at"], json.dumps(light, ensure_ascii=False, separators=(",", ":")),
                         error_text(reason), None if reason is None else json.dumps(reason, ensure_ascii=False),
                         rec.get("result"), rec.get("data")))
        if not rows:
            return 0
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT OR IGNORE INTO outcomes (id, unique_key, handle, server, task, state,"
                                     " finished_at, fields, error, reason, result, data)"
                                     " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return self._db.total_changes - before

    def latest(self, *, unique: str | None = None, handle: str | None = None,
               server: str | None = None) -> dict | None:
        if unique is not None:
            rows = self._rows(f"SELECT {_FULL} FROM outcomes WHERE unique_key = ?{_NEWEST} LIMIT 1", (unique,))
        elif handle is not None and server is not None:
            rows = self._rows(f"SELECT {_FULL} FROM outcomes WHERE handle = ? AND server = ?{_NEWEST} LIMIT 1",
                              (handle, server))
        elif handle is not None:
            rows = self._rows(f"SELECT {_FULL} FROM outcomes WHERE handle = ?{_NEWEST} LIMIT 1", (handle,))
        else:
            raise ValueError("latest() needs a unique or a handle")
        return rows[0] if rows else None

    def history(self, unique: str, limit: int | None = None) -> list[dict]:
        rows = self._rows(f"SELECT {_LIGHT} FROM outcomes WHERE unique_key = ?{_NEWEST} LIMIT ?",
                          (unique, -1 if limit is None else int(limit)))
        return rows[::-1]

    def get(self, id: str) -> dict | None:
        rows = self._rows(f"SELECT {_FULL} FROM outcomes WHERE id = ?", (id,))
        return rows[0] if rows else None

    def recent(self, *, state: str | None = None, task: str | None = None, since: float | None = None,
               until: float | None = None, limit: int | None = None, include_requeued: bool = True) -> list[dict]:
        where, args = [], []
        for column, value in (("state", state), ("task", task)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if not include_requeued:
            where.append("requeued = 0")
        if since is not None:
            where.append("finished_at >= ?")
            args.append(since)
        if until is not None:
            where.append("finished_at <= ?")
            args.append(until)
        sql = f"SELECT {_LIGHT} FROM outcomes" + (" WHERE " + " AND ".join(where) if where else "")
        return self._rows(sql + _NEWEST + " LIMIT ?", (*args, -1 if limit is None else int(limit)))

    def mark_requeued(self, id: str, by: str, at: float | None = None, handle: str | None = None,
                      server: str | None = None) -> bool:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # read and rewrite as one: two requeuers keep both notes
            try:
                row = self._db.execute("SELECT fields FROM outcomes WHERE id = ?", (id,)).fetchone()
                if row is not None:
                    fields = json.loads(row[0])
                    fields.setdefault("requeues", []).append(
                        {"by": by, "at": at if at is not None else time.time(), "handle": handle, "server": server})
                    self._db.execute("UPDATE outcomes SET requeued = 1, fields = ? WHERE id = ?",
                                     (json.dumps(fields, ensure_ascii=False, separators=(",", ":")), id))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return row is not None

    def purge_failed(self, *, older_than: float | None = None, ids: Iterable[str] | None = None) -> int:
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN")
            try:
                if ids is not None:
                    self._db.executemany("DELETE FROM outcomes WHERE state = 'failed' AND id = ?",
                                         [(i,) for i in ids])
                else:
                    cutoff = time.time() if older_than is None else older_than
                    self._db.execute("DELETE FROM outcomes WHERE state = 'failed' AND finished_at < ?", (cutoff,))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return self._db.total_changes - before

    def prune(self, keep_seconds: float) -> int:
        with self._lock:
            cur = self._db.execute("DELETE FROM outcomes WHERE finished_at < ?", (time.time() - keep_seconds,))
            return cur.rowcount

    def counts(self, since: float) -> dict[tuple[str, str], int]:
        with self._lock:
            rows = self._db.execute("SELECT task, state, COUNT(*) FROM outcomes WHERE finished_at >= ? "
                                    "GROUP BY task, state", (since,)).fetchall()
        return {(task, state): n for task, state, n in rows}

    def size(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM outcomes").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


BACKENDS = {"sqlite": SqliteOutcomeStore}


def open_store(kind: str, path: str | Path) -> OutcomeStore:
    """The configured backend (``outcomes.store``), opened at ``path``; StoreError names why not."""
    try:
        cls = BACKENDS[kind]
    except KeyError:
        raise StoreError(f"unknown outcome store {kind!r}; known: {', '.join(BACKENDS)}") from None
    try:
        return cls(path)
    except (sqlite3.Error, OSError) as e:
        raise StoreError(f"cannot open the outcome store {path}: {e}") from None
