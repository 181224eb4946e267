"""The outcome store contract, run against every backend in geartask.outcomes.BACKENDS
(postgresql on a real PostgreSQL: tests/pgserver.py, a fresh database per test)."""

from __future__ import annotations

import os
import time
import uuid

import pytest

from geartask.outcomes import BACKENDS, BadOutcome, check, open_store


@pytest.fixture
def where(request, tmp_path):
    """where(kind, name) -> the location of a new store of that backend: a file, or a database."""
    def location(kind: str, name: str = "outcomes.db"):
        if kind == "postgresql":
            return request.getfixturevalue("pg_server").create_database()
        return tmp_path / name
    return location


@pytest.fixture(params=sorted(BACKENDS))
def store(request, where):
    s = open_store(request.param, where(request.param))
    yield s
    s.close()


def rec(**kw):
    base = {"id": uuid.uuid4().hex, "server": "127.0.0.1:4730", "handle": f"H:x:{uuid.uuid4().int % 10**6}",
            "unique": uuid.uuid4().hex, "task": "t", "state": "complete", "finished_at": time.time(),
            "attempts": 1, "background": True, "result": '{"ok":true}', "result_encoding": "text"}
    base.update(kw)
    return base


def test_add_is_idempotent_by_id(store):
    r = rec()
    assert store.add([r, r]) == 1
    assert store.add([r]) == 0
    assert store.size() == 1
    assert store.get(r["id"])["unique"] == r["unique"]


def test_latest_by_unique_and_by_handle(store):
    now = time.time()
    a = rec(unique="u1", state="failed", finished_at=now - 10, reason={"error": "boom"})
    b = rec(unique="u1", state="complete", finished_at=now)
    c = rec(unique="u2", handle="H:x:7", server="10.0.0.1:4730")
    store.add([a, b, c])
    assert store.latest(unique="u1")["id"] == b["id"]
    assert [r["id"] for r in store.history("u1")] == [a["id"], b["id"]]
    assert store.latest(handle="H:x:7", server="10.0.0.1:4730")["id"] == c["id"]
    assert store.latest(handle="H:x:7", server="10.0.0.2:4730") is None
    assert store.latest(unique="nope") is None


def test_failed_filters_requeue_and_purge(store):
    now = time.time()
    old = rec(task="a", state="failed", finished_at=now - 3600, reason={"error": "x"})
    new = rec(task="b", state="failed", finished_at=now, reason={"error": "y"})
    ok = rec(task="a", state="complete")
    store.add([old, new, ok])
    assert [r["id"] for r in store.failed()] == [new["id"], old["id"]]
    assert [r["id"] for r in store.failed(task="a")] == [old["id"]]
    assert [r["id"] for r in store.failed(since=now - 60)] == [new["id"]]
    assert store.mark_requeued(old["id"], by="tester", handle="H:x:99")
    assert not store.mark_requeued("nope", by="tester")
    assert [r["id"] for r in store.failed()] == [new["id"]]
    again = store.failed(include_requeued=True, task="a")[0]
    assert again["requeues"][0]["by"] == "tester" and again["requeues"][0]["handle"] == "H:x:99"
    assert store.purge_failed(older_than=now - 60) == 1
    assert store.purge_failed(ids=[new["id"]]) == 1
    assert store.failed(include_requeued=True) == [] and store.size() == 1


def test_prune_and_counts(store):
    now = time.time()
    # prune goes by when the collector received a record (a worker's clock may be days off)
    store.add([rec(finished_at=now - 8 * 86400)], received_at=now - 8 * 86400)
    store.add([rec(finished_at=now - 8 * 86400), rec(task="x"), rec(task="x", state="failed")])
    assert store.prune(7 * 86400) == 1
    assert store.counts(now - 60) == {("x", "complete"): 1, ("x", "failed"): 1}
    assert store.size() == 3  # the record from a worker 8 days behind, received now, stays


def test_latest_is_the_last_received_whatever_the_workers_clocks(store):
    now = time.time()
    ahead = rec(unique="X", state="failed", finished_at=now + 240)  # a worker 4 min ahead (within the skew)
    store.add([ahead], received_at=now)
    done = rec(unique="X", state="complete", finished_at=now + 1)
    store.add([done], received_at=now + 1)
    got = store.latest(unique="X")
    assert got["id"] == done["id"] and got["received_at"] == now + 1
    assert [r["id"] for r in store.history("X")] == [ahead["id"], done["id"]]
    assert store.get(ahead["id"])["clock_skew"] == 240


def test_future_dated_records_are_refused_and_counted(store):
    now = time.time()
    good, future = rec(), rec(finished_at=now + 3600)
    assert store.add([good, future, rec(started_at=1e300)]) == 1
    assert store.get(future["id"]) is None and store.refused == 2


def test_quota_drops_the_oldest_received_and_keeps_new_ones(where):
    for kind in BACKENDS:
        s = open_store(kind, where(kind, f"{kind}-quota.db"))
        s.max_bytes = 2 * 1024 * 1024
        now = time.time()
        noise = lambda: os.urandom(10_000).hex()  # noqa: E731  (PostgreSQL compresses repeated text)
        first = rec(result=noise())
        s.add([first], received_at=now - 100)
        for i in range(400):  # about 8 MB offered in all
            s.add([rec(result=noise())], received_at=now + i * 0.001)
        last = rec(result=noise())
        s.add([last], received_at=now + 1)
        assert s.size_bytes() <= 2 * 1024 * 1024 and s.evicted > 0
        assert s.get(first["id"]) is None and s.get(last["id"]) is not None
        s.close()


def test_purge_catches_future_records_and_shrinks_the_file(tmp_path):
    import os
    import sqlite3
    path = tmp_path / "purge.db"
    s = open_store("sqlite", path)
    s.add([rec(state="failed", result="f" * 50_000) for _ in range(200)])
    s.close()
    # a record dated 2100, stored before the rule (or by an old version): prune and purge catch it
    db = sqlite3.connect(path)
    db.execute("UPDATE outcomes SET finished_at = 4102444800 WHERE rowid = 1")
    db.commit()
    db.close()
    s = open_store("sqlite", path)
    big = os.path.getsize(path) + os.path.getsize(f"{path}-wal") if os.path.exists(f"{path}-wal") else 0
    big = max(big, os.path.getsize(path))
    assert s.purge_failed() == 200
    wal = os.path.getsize(f"{path}-wal") if os.path.exists(f"{path}-wal") else 0
    assert os.path.getsize(path) + wal < big / 4
    s.close()


def test_an_old_store_file_is_migrated_in_place(tmp_path):
    import sqlite3
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""CREATE TABLE outcomes (id TEXT PRIMARY KEY, unique_key TEXT, handle TEXT NOT NULL,
        server TEXT NOT NULL, task TEXT NOT NULL, state TEXT NOT NULL, finished_at REAL NOT NULL,
        requeued INTEGER NOT NULL DEFAULT 0, fields TEXT NOT NULL, error TEXT, reason TEXT, result TEXT, data TEXT);""")
    db.execute("INSERT INTO outcomes (id, unique_key, handle, server, task, state, finished_at, fields)"
               " VALUES ('a', 'K', 'H:1', 's', 't', 'complete', 4102444800, '{}')")  # forged, dated 2100
    db.execute("INSERT INTO outcomes (id, unique_key, handle, server, task, state, finished_at, fields)"
               " VALUES ('b', 'K', 'H:2', 's', 't', 'complete', 1000, '{}')")
    db.commit()
    db.close()
    s = open_store("sqlite", path)
    assert s.get("a")["received_at"] <= time.time() and s.get("b")["received_at"] == 1000
    s.add([rec(id="c", unique="K")])
    assert s.latest(unique="K")["id"] == "c"  # the real run, received last, not the forged 2100 one
    assert s.prune(86400) == 2  # 'b' by age, 'a' because it is dated in the future
    s.close()


def test_survives_reopen(where):
    for kind in BACKENDS:
        path = where(kind, f"{kind}.db")
        r = rec()
        s = open_store(kind, path)
        s.add([r])
        s.close()
        s = open_store(kind, path)
        assert s.get(r["id"]) is not None
        s.close()


@pytest.mark.parametrize("bad, what", [
    ("not a dict", "JSON object"),
    ({"server": "s", "handle": "h", "task": "t", "state": "complete", "finished_at": 1}, "'id'"),
    (dict(rec(), state="maybe"), "'state'"),
    (dict(rec(), attempts=-1), "'attempts'"),
    (dict(rec(), attempts=True), "'attempts'"),
    (dict(rec(), finished_at=float("nan")), "'finished_at'"),
    (dict(rec(), id="x" * 65), "'id'"),
    (dict(rec(), task=["t"]), "'task'"),
    (dict(rec(), result_encoding="rot13"), "'result_encoding'"),
])
def test_hostile_records_are_refused_with_the_field_named(store, bad, what):
    with pytest.raises(BadOutcome, match=what):
        check(bad)
    with pytest.raises(BadOutcome):
        store.add([bad])
    assert store.size() == 0


def test_a_bad_record_stores_nothing_of_its_batch(store):
    with pytest.raises(BadOutcome):
        store.add([rec(), dict(rec(), state="??")])
    assert store.size() == 0


def test_summaries_leave_out_the_heavy_fields_and_full_records_keep_them(store):
    now = time.time()
    r = rec(unique="h", state="failed", finished_at=now, reason={"error": "boom " * 200, "output": "o"},
            data="payload", data_encoding="text")
    store.add([r, rec(unique="h", finished_at=now + 1)])
    full = store.get(r["id"])
    assert full["reason"] == r["reason"] and full["data"] == "payload" and full["result"] == '{"ok":true}'
    assert full["error"].startswith("boom") and len(full["error"]) <= 500
    for summary in (store.failed()[0], store.history("h")[0], store.recent(state="failed")[0]):
        assert summary["id"] == r["id"] and not {"reason", "data", "result"} & set(summary)
        assert summary["error"] == full["error"] and summary["attempts"] == 1
    assert [x["state"] for x in store.history("h")] == ["failed", "complete"]
    assert [x["state"] for x in store.history("h", limit=1)] == ["complete"]  # the newest, oldest first
    assert [x["state"] for x in store.recent(since=now + 0.5)] == ["complete"]


def test_requeue_notes_accumulate_with_the_new_server(store):
    r = rec(state="failed")
    store.add([r])
    assert store.mark_requeued(r["id"], by="a@h", handle="H:1", server="s1:4730")
    assert store.mark_requeued(r["id"], by="b@h", handle="H:2", server="s2:4730")
    notes = store.get(r["id"])["requeues"]
    assert [(n["by"], n["handle"], n["server"]) for n in notes] == [("a@h", "H:1", "s1:4730"), ("b@h", "H:2", "s2:4730")]
    assert store.recent(state="failed", include_requeued=False) == []


def test_checked_records_skip_the_second_check(store):
    assert store.add([check(rec())], checked=True) == 1


def test_per_minute_counts_outcomes_by_minute_and_state(store):
    minute = (time.time() // 60) * 60 - 600  # ten minutes ago, on a minute boundary
    store.add([rec(finished_at=minute + 1), rec(finished_at=minute + 59.5), rec(finished_at=minute + 30, state="failed",
                                                                               reason={"error": "x"}),
               rec(finished_at=minute + 60), rec(finished_at=minute - 3600)])
    assert store.per_minute(minute + 20) == [(minute, "complete", 2), (minute, "failed", 1),
                                             (minute + 60, "complete", 1)]  # since's whole minute counts
    assert store.per_minute(minute, until=minute + 59.9) == [(minute, "complete", 2), (minute, "failed", 1)]
    assert store.per_minute(time.time() + 120) == []
