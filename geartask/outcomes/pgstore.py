"""The PostgreSQL outcome store (``outcomes.store: postgresql``, ``outcomes.url``): the same
contract as the sqlite one (tests/test_outcome_store.py runs against both), for any number of
collectors on any hosts and readers that are not collectors (the dashboard).

Several collectors write at once: a record is stored once whichever takes it (``INSERT ... ON
CONFLICT (id) DO NOTHING``), and ``prune`` runs in one of them at a time
(``pg_try_advisory_xact_lock``: the others skip that round). Times are the collector's
clock, as in sqlite; collectors on several hosts need their clocks in sync (NTP) for
received_at to order records across them.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Callable, Iterable

from ..logs import get_logger
from .errors import StoreError
from .record import DEFAULT_MAX_CLOCK_SKEW, BadOutcome, check, check_times
from .sql import Dialect
from .store import DEFAULT_MAX_BYTES, QUOTA_SLACK, OutcomeStore, record_from_row, record_row

log = get_logger("geartask.outcomes")

TABLE = "geartask_outcomes"  # one name of ours in a database the user may share with others
PRUNE_LOCK = 0x6765617274736B31  # pg_try_advisory_xact_lock key of keep_days pruning ("geartsk1")
QUOTA_LOCK = 0x6765617274736B32  # one collector at a time deletes and compacts for max_bytes
SCHEMA_LOCK = 0x6765617274736B30  # serialises CREATE TABLE IF NOT EXISTS of collectors starting at once
CONNECT_TIMEOUT = 10  # seconds to reach the server
STATEMENT_TIMEOUT_MS = 60_000  # a statement stuck longer fails (the collector retries the batch)
QUOTA_ROUNDS = 3  # at most this many delete-and-compact rounds per add to get under max_bytes

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    seq BIGSERIAL,
    id TEXT PRIMARY KEY,
    unique_key TEXT,
    handle TEXT NOT NULL,
    server TEXT NOT NULL,
    task TEXT NOT NULL,
    state TEXT NOT NULL,
    finished_at DOUBLE PRECISION NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    requeued INTEGER NOT NULL DEFAULT 0,
    fields TEXT NOT NULL,
    error TEXT,
    reason TEXT,
    result TEXT,
    data TEXT
);
CREATE INDEX IF NOT EXISTS {TABLE}_unique_received ON {TABLE} (unique_key, received_at);
CREATE INDEX IF NOT EXISTS {TABLE}_handle ON {TABLE} (handle, server);
CREATE INDEX IF NOT EXISTS {TABLE}_state ON {TABLE} (state, finished_at);
CREATE INDEX IF NOT EXISTS {TABLE}_finished ON {TABLE} (finished_at);
CREATE INDEX IF NOT EXISTS {TABLE}_received ON {TABLE} (received_at, seq);
"""
SQL = Dialect(table=TABLE, mark="%s", tiebreak="seq", no_limit=None)
_TEXT_COLUMNS = (1, 2, 3, 4, 5, 8, 9, 10, 11, 12)  # of an insert row: PostgreSQL text can't hold NUL


def _psycopg():
    try:
        import psycopg
    except ImportError:
        raise StoreError("outcomes.store postgresql needs psycopg 3: pip install 'geartask[postgresql]'") from None
    return psycopg


def _vacuum_full(conn: Any) -> None:
    """Rewrite the table without its deleted rows; no statement_timeout (a big table takes long)."""
    conn.execute("SET statement_timeout = 0")
    try:
        conn.execute(f"VACUUM FULL {TABLE}")
    finally:
        conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def shown_url(url: str) -> str:
    """The URL without its password, for messages and logs."""
    head, at, tail = url.rpartition("@")
    if not at:
        return url
    scheme, sep, userinfo = head.partition("://")
    user = userinfo.split(":", 1)[0]
    return f"{scheme}{sep}{user}{':***' if ':' in userinfo else ''}@{tail}"


class PostgresOutcomeStore(OutcomeStore):
    """One connection (autocommit, a transaction per batch), shared between threads under a
    lock; dropped and made again on the next call after the server went away, so a collector
    outlives a PostgreSQL restart (its failed batch stays in gearmand and is taken again)."""

    def __init__(self, url: str, *, max_bytes: int | None = DEFAULT_MAX_BYTES,
                 max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW):
        self.url = str(url)
        self.path = shown_url(self.url)  # what messages name
        self.max_bytes = max_bytes or None
        self.max_clock_skew = max_clock_skew
        self.refused = 0
        self.evicted = 0
        self._psycopg = _psycopg()
        self._lock = threading.Lock()
        self._conn: Any = None
        self._run(self._create)

    # -- the connection --------------------------------------------------------------------
    def _connect(self) -> Any:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = self._psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                                               options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
                                               application_name="geartask-outcomes")
        return self._conn

    def _run(self, fn: Callable[[Any], Any]) -> Any:
        """fn(connection) under the lock; a database error becomes StoreError (the collector
        keeps the batch in gearmand and retries), and a broken connection is made again."""
        with self._lock:
            try:
                return fn(self._connect())
            except (self._psycopg.DataError, self._psycopg.IntegrityError) as e:
                # what a record (not the database) is to blame for: the collector drops that
                # job (a StoreError would keep it in gearmand, to come back for ever)
                raise BadOutcome(f"the outcome store refused it: {_first_line(e)}") from e
            except self._psycopg.Error as e:
                if self._conn is not None and (self._conn.broken or isinstance(e, self._psycopg.OperationalError)):
                    try:
                        self._conn.close()
                    except self._psycopg.Error:
                        pass
                    self._conn = None
                raise StoreError(f"outcome store {self.path}: {_first_line(e)}") from e

    def _create(self, conn: Any) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            conn.execute(_SCHEMA)

    def _rows(self, sql: str, args: tuple = ()) -> list[dict]:
        if any(isinstance(a, str) and "\x00" in a for a in args):
            return []  # no stored text holds NUL (add refuses it), and PostgreSQL can't be asked for one
        rows = self._run(lambda conn: conn.execute(sql, args).fetchall())
        return [record_from_row(r) for r in rows]

    # -- writing ---------------------------------------------------------------------------
    def add(self, records: Iterable[dict], *, checked: bool = False, received_at: float | None = None) -> int:
        now = time.time() if received_at is None else received_at
        rows = []
        for rec in records:
            if not checked:
                rec = check(rec)
            try:
                check_times(rec, now, self.max_clock_skew)
            except BadOutcome as e:
                self._refuse(rec, str(e))
                continue
            row = record_row(rec, now)
            if any(isinstance(text, str) and "\x00" in text for text in (row[i] for i in _TEXT_COLUMNS)):
                self._refuse(rec, "a text field holds a NUL character, which PostgreSQL text can't")
                continue
            rows.append(row)
        if not rows:
            return 0

        def insert(conn: Any) -> int:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(SQL.insert(tail=" ON CONFLICT (id) DO NOTHING RETURNING 1"), rows, returning=True)
                added = 0
                while True:
                    added += len(cur.fetchall())
                    if not cur.nextset():
                        break
            return added

        added = self._run(insert)
        if self.max_bytes:
            self._run(lambda conn: self._keep_quota(conn, added))
        return added

    def _refuse(self, rec: dict, error: str) -> None:
        self.refused += 1
        log.warning("outcome refused", id=rec.get("id"), task=rec.get("task"), unique=rec.get("unique"),
                    error=error, refused=self.refused)

    def _used_bytes(self, conn: Any) -> int:
        return conn.execute("SELECT pg_total_relation_size(%s)", (TABLE,)).fetchone()[0]

    def _keep_quota(self, conn: Any, keep_newest: int) -> None:
        """Over max_bytes (the table with its indexes and TOAST): delete the oldest records (by
        received_at) down to QUOTA_SLACK of it, never the ``keep_newest`` just added, and
        compact (VACUUM FULL: PostgreSQL keeps deleted rows' space in the table otherwise).
        One collector at a time: another that finds the lock taken stores and moves on."""
        if self.max_bytes is None or self._used_bytes(conn) <= self.max_bytes:
            return
        if not conn.execute("SELECT pg_try_advisory_lock(%s)", (QUOTA_LOCK,)).fetchone()[0]:
            return
        try:
            self._evict(conn, keep_newest)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (QUOTA_LOCK,))

    def _evict(self, conn: Any, keep_newest: int) -> None:
        for _ in range(QUOTA_ROUNDS):
            used, quota = self._used_bytes(conn), self.max_bytes
            if quota is None or used <= quota:
                return
            rows = conn.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()[0]
            if rows <= keep_newest:
                return
            per_row = max(1.0, used / rows)
            n = min(rows - keep_newest, max(1, int((used - quota * QUOTA_SLACK) / per_row) + 1))
            deleted = conn.execute(f"DELETE FROM {TABLE} WHERE seq IN (SELECT seq FROM {TABLE}"
                                   " ORDER BY received_at, seq LIMIT %s)", (n,)).rowcount
            self.evicted += deleted
            _vacuum_full(conn)
            log.warning("outcome store over its quota: oldest records deleted", deleted=deleted,
                        max_bytes=self.max_bytes, used_bytes=used)

    def size_bytes(self) -> int:
        return self._run(self._used_bytes)

    def vacuum(self) -> None:
        """Give deleted records' space back (VACUUM FULL rewrites the table)."""
        self._run(_vacuum_full)

    def mark_requeued(self, id: str, by: str, at: float | None = None, handle: str | None = None,
                      server: str | None = None) -> bool:
        if "\x00" in id:
            return False

        def mark(conn: Any) -> bool:
            with conn.transaction():  # FOR UPDATE: two requeuers keep both notes
                row = conn.execute(f"SELECT fields FROM {TABLE} WHERE id = %s FOR UPDATE", (id,)).fetchone()
                if row is None:
                    return False
                fields = json.loads(row[0])
                fields.setdefault("requeues", []).append(
                    {"by": by, "at": at if at is not None else time.time(), "handle": handle, "server": server})
                conn.execute(f"UPDATE {TABLE} SET requeued = 1, fields = %s WHERE id = %s",
                             (json.dumps(fields, ensure_ascii=False, separators=(",", ":")), id))
                return True
        return self._run(mark)

    def purge_failed(self, *, older_than: float | None = None, ids: Iterable[str] | None = None) -> int:
        now = time.time()
        ids = None if ids is None else [i for i in ids if isinstance(i, str) and "\x00" not in i]

        def purge(conn: Any) -> int:
            with conn.transaction():
                if ids is not None:
                    return conn.execute(f"DELETE FROM {TABLE} WHERE state = 'failed' AND id = ANY(%s)",
                                        (ids,)).rowcount
                cutoff = now if older_than is None else older_than
                return conn.execute(f"DELETE FROM {TABLE} WHERE state = 'failed' AND (finished_at < %s"
                                    " OR finished_at > %s)", (cutoff, now + self.max_clock_skew)).rowcount
        purged = self._run(purge)
        if purged:
            self.vacuum()
        return purged

    def prune(self, keep_seconds: float) -> int:
        """As the contract says, in one collector at a time: the others find the advisory lock
        taken and prune nothing this round (0)."""
        now = time.time()

        def prune(conn: Any) -> int:
            with conn.transaction():
                if not conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (PRUNE_LOCK,)).fetchone()[0]:
                    log.debug("another collector is pruning the outcome store")
                    return 0
                return conn.execute(f"DELETE FROM {TABLE} WHERE received_at < %s OR finished_at > %s",
                                    (now - keep_seconds, now + self.max_clock_skew)).rowcount
        return self._run(prune)

    # -- reading ---------------------------------------------------------------------------
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

    def counts(self, since: float) -> dict[tuple[str, str], int]:
        rows = self._run(lambda conn: conn.execute(f"SELECT task, state, COUNT(*) FROM {TABLE} WHERE finished_at >= %s"
                                                   " GROUP BY task, state", (since,)).fetchall())
        return {(task, state): n for task, state, n in rows}

    def per_minute(self, since: float, until: float | None = None) -> list[tuple[float, str, int]]:
        start = (since // 60) * 60
        end = float("inf") if until is None else until
        rows = self._run(lambda conn: conn.execute(
            f"SELECT floor(finished_at / 60) * 60 AS minute, state, COUNT(*) FROM {TABLE}"
            " WHERE finished_at >= %s AND finished_at <= %s GROUP BY minute, state ORDER BY minute, state",
            (start, end)).fetchall())
        return [(float(m), state, n) for m, state, n in rows]

    def size(self) -> int:
        return self._run(lambda conn: conn.execute(f"SELECT COUNT(*) FROM {TABLE}").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                except self._psycopg.Error:
                    pass
                self._conn = None
