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
from typing import TYPE_CHECKING, Any, Callable, Iterable

from ..logs import get_logger
from .errors import StoreError
from .record import DEFAULT_MAX_CLOCK_SKEW, HEAVY, BadOutcome, check, check_times
from .sql import Dialect

if TYPE_CHECKING:
    from ..config import Config

ERROR_CHARS = 500  # characters of a failure's message kept as a summary's "error"
DEFAULT_MAX_BYTES = 1024 ** 3  # outcomes.max_bytes's default: over it, the oldest records go first
SKEW_FLAG = 60.0  # seconds a record's finished_at may be ahead of its receipt before it is flagged
QUOTA_SLACK = 0.9  # over the quota, records are deleted down to this share of it (not one per add)

log = get_logger("geartask.outcomes")


class OutcomeStore(ABC):
    """Job outcomes, idempotent by the record's ``id`` (a worker's retry of a delivery, or a
    collector restarted between storing and acknowledging, stores nothing twice).

    Records come back as dicts with the fields of geartask.outcomes.record, plus
    ``received_at`` (the collector's clock when it stored the record: what orders and prunes,
    because a worker's clock may be wrong), ``clock_skew`` (seconds the worker's finished_at was
    ahead of that, when more than SKEW_FLAG), ``requeues`` (a list of {by, at, handle, server}) once requeued, and ``error`` (a failure's
    message, at most ERROR_CHARS characters). *Summaries* (from ``history``, ``failed``,
    ``recent``) leave out ``result``, ``data`` and ``reason``, which may be large.
    """

    @abstractmethod
    def add(self, records: Iterable[dict], *, checked: bool = False, received_at: float | None = None) -> int:
        """Store records in one transaction (all or none), durably; returns how many were new.
        Each is checked (BadOutcome) unless ``checked`` says the caller did (record.check).
        ``received_at`` (default: now) is when the collector got them; a record whose times are
        more than ``max_clock_skew`` ahead of it is refused (counted in ``refused``, logged), not
        stored. Over ``max_bytes`` the oldest records (by received_at) are deleted; new ones stay."""

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
        """Delete failed records (finished before ``older_than``, or these ids, and any dated in
        the future); returns how many. The space is given back (sqlite: VACUUM)."""

    @abstractmethod
    def prune(self, keep_seconds: float) -> int:
        """Delete every record received more than ``keep_seconds`` ago, and any whose finished_at
        is more than max_clock_skew in the future; returns how many."""

    @abstractmethod
    def counts(self, since: float) -> dict[tuple[str, str], int]:
        """(task, state) -> outcomes finished since ``since``."""

    @abstractmethod
    def per_minute(self, since: float, until: float | None = None) -> list[tuple[float, str, int]]:
        """(minute, state, n): outcomes finished in each whole UTC minute from ``since`` (its
        minute included) to ``until`` (default: no end), by state, oldest first; ``minute`` is the
        minute's start (a multiple of 60). Minutes without outcomes are left out."""

    @abstractmethod
    def size(self) -> int:
        """How many records are kept."""

    def size_bytes(self) -> int:
        """Bytes the records take (what ``max_bytes`` limits); 0 when the backend can't say."""
        return 0

    def close(self) -> None:  # noqa: B027 (optional: a store holding nothing open closes nothing)
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
RECORD_COLUMNS = ("id", "unique", "handle", "server", "task", "state", "finished_at")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS outcomes (
    id TEXT PRIMARY KEY,
    unique_key TEXT,
    handle TEXT NOT NULL,
    server TEXT NOT NULL,
    task TEXT NOT NULL,
    state TEXT NOT NULL,
    finished_at REAL NOT NULL,
    received_at REAL,
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
# After the received_at migration (a file from before it has no such column yet).
_INDEXES = """
CREATE INDEX IF NOT EXISTS outcomes_unique_received ON outcomes (unique_key, received_at);
CREATE INDEX IF NOT EXISTS outcomes_received ON outcomes (received_at);
"""
SQL = Dialect(table="outcomes", mark="?", tiebreak="rowid", no_limit=-1)


def record_from_row(row: tuple) -> dict:
    rec = dict(zip(RECORD_COLUMNS, row[:7], strict=True))
    if rec["unique"] is None:
        del rec["unique"]
    rec.update(json.loads(row[7]))
    if row[8] is not None:
        rec["error"] = row[8]
    if row[9] is not None:
        rec["received_at"] = row[9]
    if len(row) > 10:
        if row[10] is not None:
            rec["reason"] = json.loads(row[10])
        if row[11] is not None:
            rec["result"] = row[11]
        if row[12] is not None:
            rec["data"] = row[12]
    return rec


def record_row(rec: dict, now: float) -> tuple:
    """The INSERT row (sql.Dialect.insert) of a checked record received at ``now``."""
    light = {k: v for k, v in rec.items() if k not in RECORD_COLUMNS and k not in HEAVY
             and k not in ("received_at", "clock_skew")}
    skew = rec["finished_at"] - now
    if skew > SKEW_FLAG:  # the worker's clock is ahead (behind can't be told from a queue's wait)
        light["clock_skew"] = round(skew, 3)
    reason = rec.get("reason")
    return (rec["id"], rec.get("unique"), rec["handle"], rec["server"], rec["task"], rec["state"],
            rec["finished_at"], now, json.dumps(light, ensure_ascii=False, separators=(",", ":")),
            error_text(reason), None if reason is None else json.dumps(reason, ensure_ascii=False),
            rec.get("result"), rec.get("data"))


class SqliteOutcomeStore(OutcomeStore):
    """One sqlite file in WAL mode: readers never wait for the writer; one transaction per
    batch, synced to disk before ``add`` returns (synchronous=FULL: the collector acknowledges
    an outcome to gearmand only after that). Safe to share between threads."""

    def __init__(self, path: str | Path, busy_timeout: float = 30.0, *, max_bytes: int | None = DEFAULT_MAX_BYTES,
                 max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW):
        self.path = str(path)
        self.max_bytes = max_bytes or None  # 0 or None: no quota
        self.max_clock_skew = max_clock_skew
        self.refused = 0  # records refused for their times (future-dated)
        self.evicted = 0  # records deleted to keep under max_bytes
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # busy_timeout: how long a write waits for another process's (a second reader's) lock
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=busy_timeout)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._migrate()
            self._db.executescript(_INDEXES)

    def _migrate(self) -> None:
        """A store from before received_at: add the column in place. Old records get their
        finished_at, but never a time in the future (a forged record dated 2100 must age)."""
        columns = {r[1] for r in self._db.execute("PRAGMA table_info(outcomes)")}
        if "received_at" not in columns:
            self._db.execute("ALTER TABLE outcomes ADD COLUMN received_at REAL")
        self._db.execute("UPDATE outcomes SET received_at = MIN(finished_at, ?) WHERE received_at IS NULL",
                         (time.time(),))

    def _rows(self, sql: str, args: tuple = ()) -> list[dict]:
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
        return [record_from_row(r) for r in rows]

    def add(self, records: Iterable[dict], *, checked: bool = False, received_at: float | None = None) -> int:
        now = time.time() if received_at is None else received_at
        rows = []
        for rec in records:
            if not checked:
                rec = check(rec)
            try:
                check_times(rec, now, self.max_clock_skew)
            except BadOutcome as e:
                self.refused += 1
                log.warning("outcome refused", id=rec.get("id"), task=rec.get("task"), unique=rec.get("unique"),
                            error=str(e), refused=self.refused)
                continue
            rows.append(record_row(rec, now))
        if not rows:
            return 0
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN")
            try:
                self._db.executemany(SQL.insert("INSERT OR IGNORE"), rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            added = self._db.total_changes - before
            if self.max_bytes:
                self._keep_quota(added)
            return added

    def _used_bytes(self) -> int:
        page_size, = self._db.execute("PRAGMA page_size").fetchone()
        pages, = self._db.execute("PRAGMA page_count").fetchone()
        free, = self._db.execute("PRAGMA freelist_count").fetchone()
        return (pages - free) * page_size

    def _keep_quota(self, keep_newest: int) -> None:
        """Over max_bytes: delete the oldest records (by received_at) down to QUOTA_SLACK of it,
        never the ``keep_newest`` just added. Freed pages are reused, so the file stops growing."""
        used, quota = self._used_bytes(), self.max_bytes
        if quota is None or used <= quota:
            return
        rows, = self._db.execute("SELECT COUNT(*) FROM outcomes").fetchone()
        if rows <= keep_newest:
            return
        per_row = max(1.0, used / rows)
        n = min(rows - keep_newest, max(1, int((used - quota * QUOTA_SLACK) / per_row) + 1))
        cur = self._db.execute("DELETE FROM outcomes WHERE rowid IN (SELECT rowid FROM outcomes"
                               " ORDER BY received_at, rowid LIMIT ?)", (n,))
        self.evicted += cur.rowcount
        log.warning("outcome store over its quota: oldest records deleted", deleted=cur.rowcount,
                    max_bytes=self.max_bytes, used_bytes=used)

    def size_bytes(self) -> int:
        with self._lock:
            return self._used_bytes()

    def vacuum(self) -> None:
        """Give deleted records' space back to the file system (the WAL too)."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.execute("VACUUM")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def latest(self, *, unique: str | None = None, handle: str | None = None,
               server: str | None = None) -> dict | None:
        rows = self._rows(*SQL.latest(unique, handle, server))
        return rows[0] if rows else None

    def history(self, unique: str, limit: int | None = None) -> list[dict]:
        return self._rows(*SQL.history(unique, limit))[::-1]

    def get(self, id: str) -> dict | None:
        rows = self._rows(*SQL.get(id))
        return rows[0] if rows else None

    def recent(self, *, state: str | None = None, task: str | None = None, since: float | None = None,
               until: float | None = None, limit: int | None = None, include_requeued: bool = True) -> list[dict]:
        return self._rows(*SQL.recent(state=state, task=task, since=since, until=until, limit=limit,
                                      include_requeued=include_requeued))

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
        now = time.time()
        with self._lock:
            before = self._db.total_changes
            self._db.execute("BEGIN")
            try:
                if ids is not None:
                    self._db.executemany("DELETE FROM outcomes WHERE state = 'failed' AND id = ?",
                                         [(i,) for i in ids])
                else:
                    cutoff = now if older_than is None else older_than
                    self._db.execute("DELETE FROM outcomes WHERE state = 'failed' AND (finished_at < ?"
                                     " OR finished_at > ?)", (cutoff, now + self.max_clock_skew))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            purged = self._db.total_changes - before
        if purged and self.path != ":memory:":
            self.vacuum()
        return purged

    def prune(self, keep_seconds: float) -> int:
        now = time.time()
        with self._lock:
            cur = self._db.execute("DELETE FROM outcomes WHERE received_at < ? OR finished_at > ?",
                                   (now - keep_seconds, now + self.max_clock_skew))
            return cur.rowcount

    def counts(self, since: float) -> dict[tuple[str, str], int]:
        with self._lock:
            rows = self._db.execute("SELECT task, state, COUNT(*) FROM outcomes WHERE finished_at >= ? "
                                    "GROUP BY task, state", (since,)).fetchall()
        return {(task, state): n for task, state, n in rows}

    def per_minute(self, since: float, until: float | None = None) -> list[tuple[float, str, int]]:
        start = (since // 60) * 60
        end = float("inf") if until is None else until
        with self._lock:  # the finished_at index keeps this to the hour's rows
            rows = self._db.execute("SELECT CAST(finished_at / 60 AS INTEGER) * 60 AS minute, state, COUNT(*)"
                                    " FROM outcomes WHERE finished_at >= ? AND finished_at <= ?"
                                    " GROUP BY minute, state ORDER BY minute, state", (start, end)).fetchall()
        return [(float(m), state, n) for m, state, n in rows]

    def size(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM outcomes").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _postgresql(url: str, **options: Any) -> OutcomeStore:
    from .pgstore import PostgresOutcomeStore  # psycopg is imported only by who uses it
    return PostgresOutcomeStore(url, **options)


BACKENDS: dict[str, Callable[..., OutcomeStore]] = {"sqlite": SqliteOutcomeStore, "postgresql": _postgresql}


def open_store(kind: str, path: str | Path, config: Config | None = None) -> OutcomeStore:
    """The configured backend (``outcomes.store``), opened at ``path`` (postgresql: a URL, the
    config's outcomes.url when ``config`` is given); StoreError names why not.
    ``config`` (the whole Config) gives outcomes.max_bytes and outcomes.max_clock_skew."""
    try:
        cls = BACKENDS[kind]
    except KeyError:
        raise StoreError(f"unknown outcome store {kind!r}; known: {', '.join(BACKENDS)}") from None
    options: dict[str, Any] = {}
    oc = getattr(config, "outcomes", None)
    if oc is not None:
        options = {"max_bytes": getattr(oc, "max_bytes", DEFAULT_MAX_BYTES),
                   "max_clock_skew": getattr(oc, "max_clock_skew", DEFAULT_MAX_CLOCK_SKEW)}
        if kind == "postgresql" and getattr(oc, "url", None):
            path = oc.url
    try:
        return cls(path, **options)
    except (sqlite3.Error, OSError) as e:
        raise StoreError(f"cannot open the outcome store {path}: {e}") from None
