"""Issue 20: what a peer that reaches gearmand can send, and what wrong clocks do, done here
exactly as the attacker and the fault tester did it (raw clients, raw records), one test per
item. Each of these failed on the code before the fix.

The collector items (a spoofed client id, a dead collector's registration), query keys,
clear/cancel by unique key, requeue prompting and the caps on replies at the connection are
covered where those fixes live.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

import gearclient
from dashboards import DashboardProc
from fakeworker import FakeControlWorker
from geartask import gearman as gp
from geartask.outcomes import OUTCOME_FUNCTION, QUERY_FUNCTION, encode_batches, make_record, open_store
from geartask.scheduler.schedule import parse
from geartask.scheduler.scheduler import Scheduler
from helpers import REPO, wait_until

MANAGE = REPO / "manage_client" / "manage_client.py"
GEARTASK = [sys.executable, "-m", "geartask"]


@pytest.fixture
def dashboards():
    started: list[DashboardProc] = []

    def start(config, *extra, **kw) -> DashboardProc:
        d = DashboardProc(config, *extra, **kw)
        started.append(d)
        return d.wait_ready()

    yield start
    for d in started:
        d.stop()


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def submit_outcome(address: str, rec: dict) -> None:
    """What anyone who reaches gearmand can do: a background job of geartask.outcomes."""
    conn = gearclient.connect(address)
    try:
        for payload in encode_batches([rec]):
            conn.send(gp.submit_command("normal", True), task=OUTCOME_FUNCTION, unique=rec["id"], data=payload)
            conn.expect(gp.JOB_CREATED, 10)
    finally:
        conn.close()


def record(server: str, unique: str, **kw) -> dict:
    base = {"server": server, "handle": f"H:x:{uuid.uuid4().hex[:8]}", "task": "t", "state": "complete",
            "unique": unique, "worker": "w:127.0.0.1:1", "result": "ok", "background": True}
    base.update(kw)
    return make_record(**base)


# -- item 2: peer replies must not grow the dashboard's memory ---------------------------------

def test_item2_fake_workers_flooding_task_names_leave_the_dashboard_bounded(fresh_gearmand, make_config,
                                                                            dashboards):
    """Fake control functions (geartask.control:X:IP:PID) answer each ping with 1,000 new task
    names: the dashboard keeps at most 200 per process and 2,000 in all, counts the rest as
    dropped, and stays under 150 MB."""
    srv = fresh_gearmand
    path, _ = make_config(srv)
    d = dashboards(path, refresh=0.3)
    counter = iter(range(10**9))
    lock = threading.Lock()

    def flood():
        with lock:
            base = next(counter) * 1000
        return {"tasks": {f"junk.{base + i}": {"complete": 1, "failed": 0, "retried": 0, "seconds_sum": 0.1,
                                                "buckets": {"0.5": 1, "+Inf": 1}} for i in range(1000)}}
    host, port = srv.address.rsplit(":", 1)
    workers = [FakeControlWorker([(host, int(port))], f"rogue{i}", 40000 + i, reply_extra=flood) for i in range(8)]
    try:
        wait_until(lambda: next(counter) > 200, 90, interval=0.2, message="200 flooding ping replies answered")
        text = d.get("/metrics", timeout=30).text
        names = {line.split('task="', 1)[1].split('"', 1)[0] for line in text.splitlines()
                 if line.startswith("geartask_jobs_total{")}
        assert len(names) <= 2000, len(names)
        dropped = [line for line in text.splitlines() if line.startswith("geartask_dashboard_task_names_dropped_total")]
        assert dropped and float(dropped[0].split()[-1]) > 0
        assert len(text) < 5 * 1024 * 1024, len(text)
        print(f"dashboard RSS {rss_mb(d.pid):.0f} MB, /metrics {len(text)} bytes, {len(names)} task names")
        assert rss_mb(d.pid) < 150, rss_mb(d.pid)
    finally:
        for w in workers:
            w.close()


def test_item2_ten_thousand_junk_functions_do_not_make_a_huge_functions_page(fresh_gearmand, make_config, dashboards):
    srv = fresh_gearmand
    path, _ = make_config(srv)
    conn = gearclient.connect(srv.address)
    try:
        conn.send_raw(b"".join(gp.pack(gp.CAN_DO, task=f"junk.{i:05d}.{'x' * 40}") for i in range(10_000)))
        conn.echo()
        d = dashboards(path, refresh=0.5)
        wait_until(lambda: "more functions not shown" in d.get("/functions?fragment=1").text, 30,
                   message="the Functions page says it holds back rows")
        page = d.get("/functions?fragment=1")
        assert page.status == 200 and len(page.body) < 1024 * 1024, len(page.body)
        data = d.get_json("/functions")
        assert len(data["functions"]) <= 500 and data["more"] >= 9_500
        metrics = d.get("/metrics").text
        assert metrics.count("geartask_function_queued{") <= 2000
    finally:
        conn.close()


# -- item 3: records from the future -----------------------------------------------------------

def test_item3_a_record_dated_2100_is_refused_and_the_real_run_wins(fresh_gearmand, make_config, dashboards):
    srv = fresh_gearmand
    path, _ = make_config(srv)
    d = dashboards(path, refresh=0.5)
    key = f"victim-{uuid.uuid4().hex[:8]}"
    submit_outcome(srv.address, record(srv.address, key, result="ATTACKER", finished_at=4102444800.0))
    submit_outcome(srv.address, record(srv.address, key, result="real"))
    wait_until(lambda: d.get_json(f"/job?key={key}")["outcomes"], 15, message="the real outcome stored")
    time.sleep(1)  # the forged one was sent first: had it been stored, it would be there by now
    outcomes = d.get_json(f"/job?key={key}")["outcomes"]
    assert [o["result"] for o in outcomes] == ["real"]
    r = subprocess.run([*GEARTASK, "send", "--config", str(path), "result", key, "--json"], capture_output=True,
                       text=True, timeout=60, cwd=path.parent)
    assert "ATTACKER" not in r.stdout and "real" in r.stdout, (r.stdout, r.stderr)


def test_item3_finished_at_1e300_in_the_store_does_not_break_pages(fresh_gearmand, make_config, dashboards):
    """A record an older version stored (or one from a failed import) with finished_at 1e300."""
    srv = fresh_gearmand
    store_path = Path(str(make_config(srv)[0].parent / "var" / "outcomes.sqlite"))
    path, cfg = make_config(srv, f"outcomes:\n  path: {store_path}\n")
    s = open_store("sqlite", store_path)
    s.add([record(srv.address, "huge", state="failed", reason={"error": "x"}, result=None, started_at=1.0)])
    s.close()
    db = sqlite3.connect(store_path)
    db.execute("UPDATE outcomes SET finished_at = 1e300")
    db.execute("UPDATE outcomes SET fields = json_set(fields, '$.started_at', -1e300, '$.duration', 1e300)")
    db.commit()
    db.close()
    d = dashboards(path, refresh=0.5)
    for page in ("/failed", "/job?key=huge", "/failed?format=json", "/job?key=huge&format=json"):
        r = d.get(page)
        assert r.status == 200, (page, r.status, r.text[:300])


# -- item 4: slots skipped or hijacked -----------------------------------------------------------

class StoreOutcomes:
    """The scheduler's view of a real outcome store (what the collector would answer)."""

    def __init__(self, store):
        self.store = store

    def record(self, unique):
        return self.store.latest(unique=unique)


def test_item4_forged_failed_records_for_the_next_day_do_not_skip_slots(tmp_path):
    store = open_store("sqlite", tmp_path / "o.sqlite")
    s = parse({"name": "nightly", "every": 3600, "task": "reports.run"}, "test")
    now = time.time()
    first = (int(now // 3600) + 1) * 3600
    # the attacker, now: a "failed" record for each of the next 24 slots (times just within the skew)
    store.add([record("x", s.unique(first + k * 3600), task="reports.run", state="failed",
                      reason={"error": "forged"}, result=None, finished_at=now) for k in range(24)])
    store.add([record("x", s.unique(first - 3600), task="reports.run")], received_at=first - 3600 + 5)
    sent = []
    sch = Scheduler([s], lambda jobs: sent.extend(jobs) or [None] * len(jobs), StoreOutcomes(store))
    sch.tick(first + 7200 + 10)  # a new scheduler starts 10 s after the third slot: it was missed
    assert [j["unique"] for j in sent] == [s.unique(first + 7200)]
    assert sch.alert_counts["foreign"] == 1


def test_item4_a_held_job_under_the_slot_key_is_an_alert_not_a_success(tmp_path):
    """The attacker holds NAME@SLOT until 2100: the scheduler's copy meets it, nothing runs."""
    store = open_store("sqlite", tmp_path / "o.sqlite")
    s = parse({"name": "s", "every": 60, "task": "t"}, "test")
    sch = Scheduler([s], lambda jobs: [None] * len(jobs), StoreOutcomes(store), verify_after=120)
    t = (int(time.time()) // 60) * 60 + 40
    decisions = sch.tick(t)
    assert [d.action for d in decisions] == ["ahead"]
    decisions = sch.tick(t + 20 + 121)
    assert [(d.action, d.unique) for d in decisions if d.action == "alert"] == [("alert", s.unique(t + 20))]


# -- item 7: the store's disk ----------------------------------------------------------------------

def test_item7_a_flood_of_records_stays_within_the_quota_and_purge_shrinks_the_file(tmp_path):
    path = tmp_path / "o.sqlite"
    store = open_store("sqlite", path)
    store.max_bytes = 4 * 1024 * 1024
    for batch in range(60):  # one connection's flood: 12,000 records, about 12 MB of results
        store.add([record("x", f"flood-{batch}-{i}", state="failed", reason={"error": "e"}, result="r" * 1000)
                   for i in range(200)])
    assert store.size_bytes() <= 4 * 1024 * 1024 and store.evicted > 0
    newest = record("x", "legit")
    assert store.add([newest]) == 1 and store.get(newest["id"]) is not None
    on_disk = os.path.getsize(path) + (os.path.getsize(f"{path}-wal") if os.path.exists(f"{path}-wal") else 0)
    assert store.purge_failed() > 0
    after = os.path.getsize(path) + (os.path.getsize(f"{path}-wal") if os.path.exists(f"{path}-wal") else 0)
    assert after < on_disk / 4, (on_disk, after)


# -- item 8: schedulers with wrong clocks (pure logic, see test_scheduler_logic.py) -----------------

def test_item8_three_schedulers_with_shifted_clocks_run_each_slot_once():
    from test_scheduler_logic import assert_each_slot_ran_once, run_fleet
    for clocks in ([lambda t: t, lambda t: t, lambda t: t - 90], [lambda t: t, lambda t: t + 90, lambda t: t - 4],
                   [lambda t: t, lambda t: t, lambda t: t - 10]):
        f, t0 = run_fleet(clocks)
        assert_each_slot_ran_once(f, t0, 200)


# -- item 10: a worker's wrong clock --------------------------------------------------------------

def test_item10_a_worker_ahead_or_days_behind_does_not_corrupt_the_store(tmp_path):
    store = open_store("sqlite", tmp_path / "o.sqlite")
    now = time.time()
    # a worker 4 min ahead (within the skew) failed X; X was requeued and completed elsewhere
    store.add([record("x", "X", state="failed", reason={"error": "e"}, result=None, finished_at=now + 240)],
              received_at=now)
    store.add([record("x", "X")], received_at=now + 2)
    assert store.latest(unique="X")["state"] == "complete"
    # a worker 1 h ahead: refused and counted, not stored to sort newest for an hour
    assert store.add([record("x", "X", state="failed", reason={"error": "e"}, result=None,
                             finished_at=now + 3600)]) == 0 and store.refused == 1
    # a worker 8 days behind completed Y: kept, since the collector received it now
    store.add([record("x", "Y", finished_at=now - 8 * 86400)])
    assert store.prune(7 * 86400) == 0 and store.latest(unique="Y") is not None


# -- minor items ----------------------------------------------------------------------------------

def test_minor_open_redirect_through_back(gearmand, make_config, dashboards):
    path, _ = make_config(gearmand)
    d = dashboards(path)
    for back in ("/\\evil.example", "//evil.example", "/\\/evil.example"):
        for confirm in ({}, {"confirm": "yes"}):  # the confirmation page, then the result page
            r = d.post("/actions/clear", {"csrf": d.csrf(), "function": "t.nothing", "back": back, **confirm})
            assert "evil.example" not in r.text, (back, confirm)


def test_minor_dashboard_actions_check_the_origin(gearmand, make_config, dashboards):
    path, _ = make_config(gearmand)
    d = dashboards(path)
    r = d.post("/actions/clear", {"csrf": d.csrf(), "function": "t.nothing", "confirm": "yes"},
               headers={"Origin": "http://evil.example", "Accept": "application/json"})
    assert r.status == 403 and "Origin" in r.json()["message"]
    ok = d.post("/actions/clear", {"csrf": d.csrf(), "function": "t.nothing"},
                headers={"Origin": d.url, "Accept": "application/json"})
    assert ok.status == 409 and "confirm" in ok.json()  # passed the check: asks to confirm


def test_minor_job_json_and_html_show_the_same_payload(fresh_gearmand, make_config, dashboards):
    srv = fresh_gearmand
    path, _ = make_config(srv)
    d = dashboards(path, refresh=0.5)
    submit_outcome(srv.address, record(srv.address, "payload-key", state="failed", reason={"error": "e"},
                                       result=None, data=b"SECRET-PAYLOAD-" + b"p" * 70_000))
    wait_until(lambda: d.get_json("/job?key=payload-key")["outcomes"], 15, message="stored")
    data = d.get_json("/job?key=payload-key")["outcomes"][0]["data"]
    html = d.get("/job?key=payload-key").text
    assert data.startswith("SECRET-PAYLOAD-") and "SECRET-PAYLOAD-" in html
    assert len(data) <= 64 * 1024


def test_minor_token_cookie_is_derived_and_secure_behind_tls(gearmand, make_config, dashboards):
    path, _ = make_config(gearmand, "dashboard:\n  token: s3cret-token-value\n")
    d = dashboards(path)
    r = d.get("/?token=s3cret-token-value", headers={"X-Forwarded-Proto": "https"})
    cookie = r.headers.get("Set-Cookie", "")
    assert r.status == 200 and "geartask_dashboard_token=" in cookie
    assert "s3cret-token-value" not in cookie and "Secure" in cookie
    value = cookie.split("geartask_dashboard_token=", 1)[1].split(";", 1)[0]
    assert d.get("/", headers={"Cookie": f"geartask_dashboard_token={value}"}).status == 200
    assert d.get("/", headers={"Cookie": "geartask_dashboard_token=s3cret-token-value"}).status == 401


def test_minor_send_result_json_escapes_c1_and_bidi(fresh_gearmand, make_config, dashboards):
    srv = fresh_gearmand
    path, _ = make_config(srv)
    d = dashboards(path, refresh=0.5)
    submit_outcome(srv.address, record(srv.address, "bidi", result="a\u009b31mb\u202ec"))
    wait_until(lambda: d.get_json("/job?key=bidi")["outcomes"], 15, message="stored")
    r = subprocess.run([*GEARTASK, "send", "--config", str(path), "result", "bidi", "--json"], capture_output=True,
                       text=True, timeout=60, cwd=path.parent)
    assert r.returncode == 0, r.stderr
    assert "\u009b" not in r.stdout and "\u202e" not in r.stdout
    assert "a\u009b31mb\u202ec" in json.dumps(json.loads(r.stdout), ensure_ascii=False)  # the same value


class RogueAnswerer:
    """A raw worker of geartask.outcomes.query answering every query with ``answer``."""

    def __init__(self, address: str, answer: dict):
        self.conn = gearclient.connect(address)
        self.conn.send(gp.CAN_DO, task=QUERY_FUNCTION)
        self.answer = json.dumps(answer).encode()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        try:
            while not self.stop.is_set():
                self.conn.send(gp.GRAB_JOB_UNIQ)
                pkt = self.conn.expect({gp.JOB_ASSIGN_UNIQ, gp.NO_JOB}, 10)
                if pkt.cmd == gp.NO_JOB:
                    self.conn.send(gp.PRE_SLEEP)
                    while not self.stop.is_set() and self.conn.recv(0.1) is None:
                        pass
                    continue
                self.conn.send(gp.WORK_COMPLETE, job_handle=pkt["job_handle"], data=self.answer)
        except Exception:
            pass

    def close(self):
        self.stop.set()
        self.conn.close()


def test_minor_failed_list_keeps_to_its_limit_against_a_rogue_answer(fresh_gearmand, make_config):
    srv = fresh_gearmand
    path, _ = make_config(srv)
    now = time.time()
    recs = [{"id": f"r{i}", "server": "s", "handle": f"H:{i}", "task": "t", "state": "failed",
             "finished_at": now - i, "unique": f"u{i}", "error": "e"} for i in range(1000)]
    rogue = RogueAnswerer(srv.address, {"ok": True, "result": {"records": recs, "more": False}})
    try:
        r = subprocess.run([*GEARTASK, "manage", "--config", str(path), "failed", "list", "--limit", "3"],
                           capture_output=True, text=True, timeout=60, cwd=path.parent)
        lines = [line for line in r.stdout.splitlines() if " u" in line]
        assert r.returncode == 0 and len(lines) == 3, (r.stdout[-500:], r.stderr)
        assert "more failed jobs" in r.stdout
    finally:
        rogue.close()


def test_minor_failed_import_goes_past_a_record_too_big_for_one_request(fresh_gearmand, make_config, dashboards):
    srv = fresh_gearmand
    path, _ = make_config(srv)
    d = dashboards(path, refresh=0.5)
    dead = path.parent / "dead-letter.jsonl"
    big = record(srv.address, "big-one", state="failed", reason={"error": "e"}, result=None,
                 data=b"d" * (20 * 1024 * 1024), max_result=32 * 1024 * 1024)
    small = record(srv.address, "small-one", state="failed", reason={"error": "e"}, result=None, data=b"x")
    dead.write_text(json.dumps(big) + "\n" + json.dumps(small) + "\n")
    r = subprocess.run([*GEARTASK, "manage", "--config", str(path), "failed", "import", str(dead)],
                       capture_output=True, text=True, timeout=120, cwd=path.parent)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert d.get_json("/job?key=small-one")["outcomes"] and d.get_json("/job?key=big-one")["outcomes"]


def test_minor_init_does_not_write_through_a_dangling_symlink(tmp_path):
    target = tmp_path / "fleet"
    target.mkdir()
    outside = tmp_path / "outside" / "config.yaml"
    (target / "config.yaml").symlink_to(outside)
    r = subprocess.run([*GEARTASK, "init", str(target)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "symbolic link" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not outside.exists() and not (target / "plugins" / "example.py").exists()
    plugins = tmp_path / "elsewhere"
    plugins.mkdir()
    (target / "config.yaml").unlink()
    (target / "plugins").symlink_to(plugins)
    r = subprocess.run([*GEARTASK, "init", str(target)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and not (plugins / "example.py").exists()
