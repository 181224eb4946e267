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

from .record import check


class OutcomeStore(ABC):
    """Job outcomes, idempotent by the record's ``id`` (a worker's retry of a delivery, or a
    collector restarted between storing and acknowledging, stores nothing twice)."""

    @abstractmethod
    def add(self, records: Iterable[dict]) -> int:
        """Store checked records in one go; returns how many were new."""

    @abstractmethod
    def latest(self, *, unique: str | None = None, handle: str | None = None,
               server: str | None = None) -> dict | None:
        """The newest outcome of a unique key, or of a handle (on ``server`` when given)."""

    @abstractmethod
    def history(self, unique: str) -> list[dict]:
        """Every outcome of a unique key, oldest first."""

    @abstractmethod
    def get(self, id: str) -> dict | None:
        """One record by id."""

    @abstractmethod
    def failed(self, *, task: str | None = None, since: float | None = None, limit: int | None = None,
               include_requeued: bool = False) -> list[dict]:
        """Failed outcomes, newest first; requeued ones only when asked."""

    @abstractmethod
    def mark_requeued(self, id: str, by: str, at: float | None = None, handle: str | None = None) -> bool:
        """Note on a failed record that it was sent again; False when there is no such record."""

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
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS outcomes_unique ON outcomes (unique_key, finished_at);
CREATE INDEX IF NOT EXISTS outcomes_handle ON outcomes (handle, server);
CREATE INDEX IF NOT EXISTS outcomes_state ON outcomes (state, finished_at);
CREATE INDEX IF NOT EXISTS outcomes_finished ON outcomes (finished_at);
"""


class SqliteOutcomeStore(OutcomeStore):
    """One sqlite file in WAL mode: readers never wait for the writer; one transaction per
    batch, so storing many outcomes costs one fsync. Safe to share between threads."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoint, no fsync per commit
            self._db.executescript(_SCHEMA)

    def _rows(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [json.loads(r[0]) for r in rows]

    def add(self, records: Iterable[dict]) -> int:
        rows = []
        for rec in records:
            rec = check(rec)
            rows.append((rec["id"], rec.get("unique"), rec["handle"], rec["server"], rec["task"], rec["state"],
                         rec["finished_at"], json.dumps(rec, ensure_ascii=False)))
        if not rows:
            return 0
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT OR IGNORE INTO outcomes (id, unique_key, handle, server, task, state,"
                                     " finished_at, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return self._db.total_changes - before

    def latest(self, *, unique: str | None = None, handle: str | None = None,
               server: str | None = None) -> dict | None:
        if unique is not None:
            rows = self._rows("SELECT record FROM outcomes WHERE unique_key = ? "
                              "ORDER BY finished_at DESC, rowid DESC LIMIT 1", (unique,))
        elif handle is not None and server is not None:
            rows = self._rows("SELECT record FROM outcomes WHERE handle = ? AND server = ? "
                              "ORDER BY finished_at DESC, rowid DESC LIMIT 1", (handle, server))
        elif handle is not None:
            rows = self._rows("SELECT record FROM outcomes WHERE handle = ? "
                              "ORDER BY finished_at DESC, rowid DESC LIMIT 1", (handle,))
        else:
            raise ValueError("latest() needs a unique or a handle")
        return rows[0] if rows else None

    def history(self, unique: str) -> list[dict]:
        return self._rows("SELECT record FROM outcomes WHERE unique_key = ? ORDER BY finished_at, rowid", (unique,))

    def get(self, id: str) -> dict | None:
        rows = self._rows("SELECT record FROM outcomes WHERE id = ?", (id,))
        return rows[0] if rows else None

    def failed(self, *, task: str | None = None, since: float | None = None, limit: int | None = None,
               include_requeued: bool = False) -> list[dict]:
        sql = "SELECT record FROM outcomes WHERE state = 'failed'"
        args: list[Any] = []
        if not include_requeued:
            sql += " AND requeued = 0"
        if task is not None:
            sql += " AND task = ?"
            args.append(task)
        if since is not None:
            sql += " AND finished_at >= ?"
            args.append(since)
        sql += " ORDER BY finished_at DESC, rowid DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        return self._rows(sql, tuple(args))

    def mark_requeued(self, id: str, by: str, at: float | None = None, handle: str | None = None) -> bool:
        with self._lock:
            row = self._db.execute("SELECT record FROM outcomes WHERE id = ?", (id,)).fetchone()
            if row is None:
                return False
            rec = json.loads(row[0])
            rec.setdefault("requeues", []).append({"by": by, "at": at if at is not None else time.time(),
                                                   "handle": handle})
            self._db.execute("UPDATE outcomes SET requeued = 1, record = ? WHERE id = ?",
                             (json.dumps(rec, ensure_ascii=False), id))
            return True

    def purge_failed(self, *, older_than: float | None = None, ids: Iterable[str] | None = None) -> int:
        with self._lock:
            before = self._db.total_changes
            if ids is not None:
                self._db.executemany("DELETE FROM outcomes WHERE state = 'failed' AND id = ?",
                                     [(i,) for i in ids])
            else:
                cutoff = time.time() if older_than is None else older_than
                self._db.execute("DELETE FROM outcomes WHERE state = 'failed' AND finished_at < ?", (cutoff,))
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
    """The configured backend (``outcomes.store``), opened at ``path``."""
    try:
        cls = BACKENDS[kind]
    except KeyError:
        raise ValueError(f"unknown outcome store {kind!r}; known: {', '.join(BACKENDS)}") from None
    return cls(path)
