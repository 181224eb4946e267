"""Outcomes on PostgreSQL with several collectors: real collector processes (`manage_client.py
outcomes serve`), real workers, a real PostgreSQL (tests/pgserver.py)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import psycopg
import pytest

from geartask import JobSender, load_config
from geartask.outcomes import open_store
from geartask.outcomes.pgstore import TABLE, PostgresOutcomeStore
from helpers import REPO, wait_until, write_config
from test_outcomes_collector import CollectorProc, collectors, manage, reader_config  # noqa: F401
from test_worker import TEST_PLUGINS
from workers import WorkerProc

JOBS = 5000


def pg_config(tmp_path, servers, url, name, extra=""):
    return write_config(tmp_path / name / "config.yaml", servers,
                        f"outcomes:\n  store: postgresql\n  url: {url}\n" + extra)


def stored(url: str) -> tuple[int, int]:
    """(records, distinct unique keys) in the store, read straight from PostgreSQL."""
    with psycopg.connect(url, connect_timeout=5) as conn:
        return conn.execute(f"SELECT COUNT(*), COUNT(DISTINCT unique_key) FROM {TABLE}").fetchone()


@pytest.mark.timeout(900)  # 5,000 jobs on a 2-core machine shared with other test runs
def test_two_collectors_one_killed_three_times_store_each_of_5000_failures_once(fresh_gearmand, tmp_path,
                                                                                  collectors, pg_url):
    """5,000 failing background jobs run by real workers while collector B is killed -9 three
    times (restarted each time) and A keeps storing: exactly 5,000 records, one per job."""
    srv = fresh_gearmand
    a = collectors(pg_config(tmp_path, [srv.address], pg_url, "a"), [srv.address])
    b_config = pg_config(tmp_path, [srv.address], pg_url, "b")
    b = collectors(b_config, [srv.address])  # not refused: the store is shared

    def listed() -> list[int]:
        status = manage(reader_config(tmp_path, [srv.address], name=f"reader{time.monotonic_ns()}"),
                        "outcomes", "status", "--json")
        assert status.returncode == 0, status.stderr
        return sorted(int(c["collector"].rsplit(":", 1)[1]) for c in json.loads(status.stdout)["collectors"])
    assert listed() == sorted([a.pid, b.pid])

    cfg = write_config(tmp_path / "w" / "config.yaml", [srv.address], "worker:\n  retries: 0\n  poll_timeout: 1\n",
                       plugin_paths=[REPO / "plugins", TEST_PLUGINS])
    workers = [WorkerProc(cfg, f"pgw{i}", 4) for i in range(2)]
    try:
        for w in workers:
            w.wait_attached([srv.address], 30)
        sent: list = []

        def send() -> None:
            with JobSender(load_config(cfg)) as sender:
                sent.extend(sender.submit_many([{"task": "t.fail", "data": {"i": i}, "unique": f"pgf-{i}",
                                                 "background": True} for i in range(JOBS)], wait=False))
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        kills = []
        for mark in (JOBS // 5, 2 * JOBS // 5, 3 * JOBS // 5):  # kill B while outcomes stream in
            wait_until(lambda: stored(pg_url)[0] >= mark, 180, 0.2, message=f"{mark} outcomes stored")
            os.kill(b.pid, signal.SIGKILL)
            b.proc.wait(10)
            kills.append(stored(pg_url)[0])
            b = collectors(b_config, [srv.address])  # restarted at once
        sender.join(120)
        assert not sender.is_alive() and len(sent) == JOBS and all(r.state == "queued" for r in sent)
        wait_until(lambda: stored(pg_url)[0] >= JOBS, 300, 0.5, message=f"{JOBS} outcomes stored")
        time.sleep(2)  # anything redelivered after the last kill would land now; it must add nothing
        assert stored(pg_url) == (JOBS, JOBS), stored(pg_url)
        assert kills[0] < JOBS, "B was killed while outcomes were still arriving"
        with psycopg.connect(pg_url) as conn:
            assert conn.execute(f"SELECT COUNT(*) FROM {TABLE} WHERE state <> 'failed'").fetchone()[0] == 0
        assert a.proc.poll() is None and b.proc.poll() is None  # neither refused nor stopped the other
        assert listed() == sorted([a.pid, b.pid])  # the killed ones are gone, the restarted one is there
        assert a.stop() == 0
        a_stored = [e for e in a.log_lines() if e["event"] == "collector stopped"][-1]["stored"]
        assert 0 < a_stored < JOBS, a_stored  # both collectors took their share
    finally:
        for w in workers:
            w.stop()


def test_the_dashboard_reads_the_postgresql_store_without_a_collector(tmp_path, pg_url):
    """build() with collector=False and the postgresql store: its pages' client reads the store."""
    from geartask.dashboard.server import Listen, build
    from geartask.outcomes.record import make_record
    cfg = load_config(pg_config(tmp_path, ["127.0.0.1:1"], pg_url, "d"))
    store = open_store("postgresql", pg_url)
    store.add([make_record(server="s:1", handle="H:1", task="t", state="failed", unique="dash-1",
                           reason={"error": "boom"})])
    store.close()
    dashboard, parts = build(cfg, refresh=5, token="", where=Listen("127.0.0.1", 0), collector=False)
    try:
        assert [r["unique"] for r in dashboard.outcomes.failed()] == ["dash-1"]
    finally:
        for part in parts:
            part.stop()


def test_prune_runs_in_one_collector_at_a_time(pg_url):
    """While one store holds the prune lock (a prune in progress), another's prune skips."""
    first, second = PostgresOutcomeStore(pg_url), PostgresOutcomeStore(pg_url)
    from geartask.outcomes.record import make_record
    first.add([make_record(server="s:1", handle="H:1", task="t", state="complete")], received_at=time.time() - 100)
    from geartask.outcomes.pgstore import PRUNE_LOCK
    with psycopg.connect(pg_url, autocommit=True) as holder:
        with holder.transaction():
            assert holder.execute("SELECT pg_try_advisory_xact_lock(%s)", (PRUNE_LOCK,)).fetchone()[0]
            assert second.prune(10) == 0 and second.size() == 1
        assert second.prune(10) == 1
    first.close()
    second.close()


def test_a_postgresql_config_without_a_url_is_refused(tmp_path):
    from geartask.errors import ConfigError
    path = write_config(tmp_path / "c.yaml", ["127.0.0.1:4730"], "outcomes:\n  store: postgresql\n")
    with pytest.raises(ConfigError, match="outcomes.url"):
        load_config(path)


def test_hostile_text_postgresql_cannot_hold_is_refused_not_retried(pg_url):
    """A NUL character (JSON's \\u0000) in a stored text field: the record is refused and
    counted, the rest of the batch stored; asking for such a key finds nothing, raises nothing."""
    from geartask.outcomes.record import make_record
    s = PostgresOutcomeStore(pg_url)
    good = make_record(server="s:1", handle="H:1", task="t", state="complete", unique="fine")
    bad = make_record(server="s:1", handle="H:2", task="t\x00x", state="complete", unique="bad\x00")
    assert s.add([good, bad]) == 1 and s.refused == 1 and s.size() == 1
    assert s.latest(unique="bad\x00") is None and s.history("a\x00") == [] and s.get("\x00") is None
    assert s.recent(task="t\x00x") == [] and not s.mark_requeued("x\x00", by="me")
    assert s.purge_failed(ids=["\x00"]) == 0
    s.close()


def test_a_dropped_connection_fails_one_call_and_the_next_reconnects(pg_url):
    """The server ends the store's session (a PostgreSQL restart does the same): that call
    raises StoreError (the collector keeps the batch in gearmand and retries), the next works."""
    from geartask.outcomes.errors import StoreError
    from geartask.outcomes.record import make_record
    s = PostgresOutcomeStore(pg_url)
    assert s.size() == 0
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                      " WHERE application_name = 'geartask-outcomes' AND pid <> pg_backend_pid()")
    with pytest.raises(StoreError, match="outcome store postgresql://postgres@"):
        s.add([make_record(server="s:1", handle="H:1", task="t", state="complete")])
    assert s.add([make_record(server="s:1", handle="H:1", task="t", state="complete")]) == 1
    s.close()


def test_an_unreachable_database_is_one_line_without_the_password(tmp_path):
    from geartask.server import free_port
    cfg = pg_config(tmp_path, ["127.0.0.1:1"], f"postgresql://u:s3cret@127.0.0.1:{free_port()}/db", "u")
    r = manage(cfg, "outcomes", "serve", timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("error: outcome store postgresql://u:***@127.0.0.1:") and "s3cret" not in r.stderr


def test_the_quota_is_kept_by_one_collector_at_a_time(pg_url):
    """While another session holds the quota lock, a store over max_bytes stores and moves on;
    once it is free, the oldest records go."""
    from geartask.outcomes.pgstore import QUOTA_LOCK
    from geartask.outcomes.record import make_record
    s = PostgresOutcomeStore(pg_url, max_bytes=256 * 1024)
    batch = lambda: [make_record(server="s:1", handle="H", task="t", state="complete",  # noqa: E731
                                 result=os.urandom(4000).hex()) for _ in range(10)]
    with psycopg.connect(pg_url, autocommit=True) as holder:
        assert holder.execute("SELECT pg_try_advisory_lock(%s)", (QUOTA_LOCK,)).fetchone()[0]
        for _ in range(10):
            assert s.add(batch()) == 10
        assert s.evicted == 0 and s.size() == 100 and s.size_bytes() > 256 * 1024
        holder.execute("SELECT pg_advisory_unlock(%s)", (QUOTA_LOCK,))
    s.add(batch())
    assert s.evicted > 0 and s.size_bytes() <= 256 * 1024
    s.close()
