"""Issue 20: what a peer that reaches gearmand can send, and what wrong clocks do, done here
exactly as the attacker and the fault tester did it (raw clients, raw records), one test per
item. Each of these failed on the code before the fix.

The collector items (a spoofed client id, a dead collector's registration), requeue
prompting and bounds, the 256 MiB ping answers, clear by an odd name and the manager's signed
control are here too. Query keys, cancel by unique key and the caps on replies at the
connection are covered where those fixes live.
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


import gearclient
from fakeworker import FakeControlWorker
from geartask import gearman as gp
from geartask.outcomes import OUTCOME_FUNCTION, QUERY_FUNCTION, encode_batches, make_record, open_store
from geartask.scheduler.schedule import parse
from geartask.scheduler.scheduler import Scheduler
from helpers import REPO, wait_until

MANAGE = REPO / "manage_client" / "manage_client.py"
GEARTASK = [sys.executable, "-m", "geartask"]


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
    for page in ("/failed", "/job?key=huge", "/failed?format=json", "/job?key=huge&format=json", "/", "/throughput"):
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
                self.conn.send(gp.WORK_COMPLETE, job_handle=pkt["job_handle"], data=self.answer_to(pkt))
        except Exception:
            pass

    def answer_to(self, pkt) -> bytes:
        return self.answer

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


# -- items 1 and 9: a client id alone, or a dead host's registration, never stops a collector -------

def _claim_collector(address: str, client_id: str, functions=(OUTCOME_FUNCTION,)) -> gp.Connection:
    """What the attacker did (and what a dead collector's host leaves in gearmand): a connection
    that says it is a collector and serves the outcome functions, but never grabs a job."""
    conn = gearclient.connect(address)
    conn.send_raw(gp.pack(gp.SET_CLIENT_ID, client_id=client_id)
                  + b"".join(gp.pack(gp.CAN_DO, task=f) for f in functions))
    conn.echo()
    return conn


def test_item1_a_spoofed_collector_id_neither_blocks_nor_stops_the_collector(fresh_gearmand, make_config, tmp_path):
    """``SET_CLIENT_ID geartask-collector:!:0`` + ``CAN_DO geartask.outcomes`` (sorting lower than any
    real collector): the collector starts anyway, looks at it again and again, and keeps storing,
    because the fake never answers a ping as a collector."""
    from geartask.outcomes.collector import Collector
    srv = fresh_gearmand
    _, config = make_config(srv)
    fake = _claim_collector(srv.address, "geartask-collector:!:0")
    store = open_store("sqlite", tmp_path / "o.sqlite")
    c = Collector(config, store, client_id="geartask-collector:real:1")
    try:
        c.rival_interval = 0.5
        c.start()  # main: CollectorConflict ("another outcomes collector is registered")
        wait_until(lambda: (srv.address, "geartask-collector:!:0") in c._warned, 20,
                   message="the collector looked at the fake and warned instead of stopping")
        t_end = time.monotonic() + 2.5  # a few more looks (every 0.5 s), each pinging the fake
        wait_until(lambda: c.stopping or time.monotonic() > t_end, 10)
        assert not c.stopping and c.error is None
        submit_outcome(srv.address, record(srv.address, "after-the-fake"))
        wait_until(lambda: store.size() == 1, 15, message="the collector still stores outcomes")
    finally:
        fake.close()
        c.stop(10)
        c.close()
        store.close()


def test_item9_a_dead_collectors_registration_does_not_block_its_replacement(fresh_gearmand, make_config, tmp_path):
    """A collector's host died: gearmand keeps its registration (both outcome functions, its real
    collector id) while nothing answers. ``outcomes serve`` starts within seconds and stores."""
    srv = fresh_gearmand
    path, _ = make_config(srv, "outcomes:\n  path: outcomes.sqlite\n")
    dead = _claim_collector(srv.address, "geartask-collector:deadhost:4242", (OUTCOME_FUNCTION, QUERY_FUNCTION))
    proc = subprocess.Popen([sys.executable, str(MANAGE), "--config", str(path), "outcomes", "serve"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        submit_outcome(srv.address, record(srv.address, "while-dead"))
        db = tmp_path / "outcomes.sqlite"

        def stored() -> bool:
            assert proc.poll() is None, f"the replacement exited {proc.returncode}: {proc.stdout.read()}"
            if not db.exists():
                return False
            with sqlite3.connect(db) as con:
                try:
                    return con.execute("select count(*) from outcomes").fetchone()[0] >= 1
                except sqlite3.OperationalError:
                    return False
        wait_until(stored, 30, interval=0.2, message="the replacement collector stores the outcome")
    finally:
        dead.close()
        proc.terminate()
        out = proc.communicate(timeout=20)[0]
    assert "does not answer a ping" in out, out[-2000:]


# -- issue 19 Must 5: the manager's and the dashboard's control jobs are signed with security.key ----

def test_manager_control_is_signed_with_security_key(fresh_gearmand, tmp_path):
    """A worker with ``require_signed: true`` obeys only control signed by a key trusted for
    ``control``: the manager with such a key sees it answer and shuts it down by name; with an
    untrusted key its ping and shutdown are refused (the worker counts them: control_refused)."""
    from geartask import load_config
    from geartask.fleet import Admin
    from geartask.trust.keys import new_key
    from helpers import write_config
    from workers import WorkerProc
    srv = fresh_gearmand
    keys = {}
    for name in ("admin", "ops"):
        path = tmp_path / "keys" / f"{name}.key"
        path.parent.mkdir(exist_ok=True)
        keys[name] = (str(path), new_key(path)[1])
    may = {"admin": ["*", "control"], "ops": ["reports.*"]}

    def security(require: bool, key: str) -> str:
        lines = ["security:", f"  require_signed: {'true' if require else 'false'}", f"  key: {keys[key][0]}",
                 "  trust:"]
        for name, (_, pub) in keys.items():
            lines += [f"    - name: {name}", f"      public_key: \"{pub}\"", f"      may: {json.dumps(may[name])}"]
        return "\n".join(lines) + "\n"

    wcfg = write_config(tmp_path / "worker" / "config.yaml", [srv.address],
                        "worker:\n  poll_timeout: 1\n" + security(True, "admin"))
    admin_cfg = write_config(tmp_path / "admin" / "config.yaml", [srv.address], security(False, "admin"))
    ops_cfg = write_config(tmp_path / "ops" / "config.yaml", [srv.address], security(False, "ops"))
    w = WorkerProc(wcfg, "signed", 1).wait_attached([srv.address])
    try:
        # an untrusted key: the ping is refused (answered with a failure), the shutdown is not obeyed
        pings = Admin.from_config(load_config(ops_cfg)).ping_workers()[0].value
        assert [p.error for p in pings if p.pid == w.pid] == ["the ping failed"]
        r = subprocess.run([sys.executable, str(MANAGE), "--config", str(ops_cfg), "shutdown", "--name", "signed",
                            "--wait", "2", "--json"], capture_output=True, text=True, timeout=60)
        assert w.proc.poll() is None, r.stdout + r.stderr
        # the trusted key: it answers (main: "the ping failed" here too: the ping went unsigned)
        r = subprocess.run([sys.executable, str(MANAGE), "--config", str(admin_cfg), "workers", "--json"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        conns = [c for s in json.loads(r.stdout)["servers"] for c in s["connections"] if c.get("pid") == w.pid]
        assert conns and not any(c.get("silent") for c in conns), conns
        reply = next(p for p in Admin.from_config(load_config(admin_cfg)).ping_workers()[0].value if p.pid == w.pid)
        assert reply.error is None and reply.reply["control_refused"] >= 2, reply
        r = subprocess.run([sys.executable, str(MANAGE), "--config", str(admin_cfg), "shutdown", "--name", "signed",
                            "--json"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert w.proc.wait(20) == 0
    finally:
        w.stop()


# -- item 2: a 256 MiB ping answer is read past, not kept ----------------------------------------

class _HugeAnswerWorker:
    """A fake worker process's control function that answers every ping with ``size`` bytes."""

    def __init__(self, address: str, name: str, pid: int, size: int):
        self.conn = gearclient.connect(address)
        ip = self.conn.sock.getsockname()[0]
        self.function = f"geartask.control:{name}:{ip}:{pid}"
        self.conn.send_raw(gp.pack(gp.SET_CLIENT_ID, client_id=f"{name}:{ip}:{pid}:0")
                           + gp.pack(gp.CAN_DO, task=self.function))
        self.conn.echo()
        self.size, self.answered, self.stop = size, 0, threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        body = b"x" * self.size
        try:
            while not self.stop.is_set():
                self.conn.send(gp.GRAB_JOB_UNIQ)
                pkt = self.conn.expect({gp.JOB_ASSIGN_UNIQ, gp.NO_JOB}, 10)
                if pkt.cmd == gp.NO_JOB:
                    self.conn.send(gp.PRE_SLEEP)
                    while not self.stop.is_set() and self.conn.recv(0.1) is None:
                        pass
                    continue
                head = pkt["job_handle"] + b"\0"
                self.conn.sock.sendall(gp.HEADER.pack(gp.MAGIC_REQ, gp.WORK_COMPLETE, len(head) + len(body)) + head)
                self.conn.sock.sendall(body)
                self.answered += 1
        except Exception:
            pass  # closed under us

    def close(self) -> None:
        self.stop.set()
        self.conn.close()


def test_item2_two_256_mib_ping_answers_leave_the_manager_small(fresh_gearmand, make_config):
    """Two fake workers answer ``manage workers``' ping with 256 MiB each: the manager reads past
    them (each reported as a rogue answer) and its peak RSS stays under 150 MB (main: > 500 MB)."""
    srv = fresh_gearmand
    path, _ = make_config(srv)
    fakes = [_HugeAnswerWorker(srv.address, f"huge{i}", 50000 + i, 256 * 1024 * 1024) for i in range(2)]
    try:
        # the manager's peak RSS, from its parent's wait4
        measure = ("import os, sys, subprocess; p = subprocess.Popen(sys.argv[1:]); "
                   "_, st, ru = os.wait4(p.pid, 0); print('PEAK', ru.ru_maxrss, file=sys.stderr); "
                   "sys.exit(os.waitstatus_to_exitcode(st))")
        proc = subprocess.run([sys.executable, "-c", measure, sys.executable, str(MANAGE), "--config", str(path),
                               "--timeout", "60", "workers", "--json"], capture_output=True, text=True, timeout=180)
        out, err = proc.stdout, proc.stderr
    finally:
        for f in fakes:
            f.close()
    assert proc.returncode == 0, err
    assert all(f.answered >= 1 for f in fakes)
    conns = [c for s in json.loads(out)["servers"] for c in s["connections"] if str(c.get("name", "")).startswith("huge")]
    assert len(conns) == 2 and not any(c.get("silent") for c in conns), conns
    peak_mb = int(err.split("PEAK ", 1)[1].split()[0]) / 1024
    print(f"manager peak RSS {peak_mb:.0f} MB")
    assert peak_mb < 150, peak_mb


# -- item 6 (and issue 19 Must 5): `failed requeue` shows, asks, is bounded, and keeps the signature rule --

def _on_a_terminal_answering(argv: list[str], answer: bytes, timeout: float = 60) -> tuple[int, str]:
    """Run ``argv`` on a pseudo-terminal; type ``answer`` once it asks (``[y/N]``)."""
    import pty
    import select
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=REPO)
    os.close(slave)
    out, typed, deadline = b"", False, time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 0.5)[0]:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 4096)
            except OSError:
                break
            if not data:
                break
            out += data
            if not typed and b"[y/N]" in out:
                os.write(master, answer)
                typed = True
    finally:
        os.close(master)
        proc.wait(10)
    return proc.returncode, out.decode(errors="replace")


def _queued(address: str, function: str) -> int:
    conn = gearclient.connect(address)
    try:
        for line in conn.text_command("status"):
            name, total, *_ = line.split("\t")
            if name == function:
                return int(total)
        return 0
    finally:
        conn.close()


def test_item6_requeue_shows_what_it_would_send_asks_and_refuses_a_forged_record_under_trust(
        fresh_gearmand, make_config, dashboards, tmp_path):
    """A forged failed record (task ``shell``, data ``sh -c 'id > …'``): ``failed requeue --all``
    off a terminal refuses without --yes (exit 2); on a terminal it shows the task, the data's
    head and the original sender and sends nothing when told no; with security.key and a trust
    list, even --yes sends nothing: the record has no original signature (main: sent at once)."""
    from geartask.trust.keys import new_key
    srv = fresh_gearmand
    path, _ = make_config(srv)
    d = dashboards(path, refresh=0.5)
    marker = tmp_path / "pwned"
    submit_outcome(srv.address, record(srv.address, "forged-1", task="shell", state="failed",
                                       data=f"sh -c 'id > {marker}'".encode(), sender_host="evil-host",
                                       result=None, background=True))
    wait_until(lambda: d.get_json("/job?key=forged-1")["outcomes"], 15, message="the forged record is stored")
    manage = [sys.executable, str(MANAGE), "--config", str(path), "failed", "requeue", "--all"]

    r = subprocess.run(manage, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "--yes" in r.stderr and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    assert _queued(srv.address, "shell") == 0

    rec_id = d.get_json("/job?key=forged-1")["outcomes"][0]["id"]
    page = d.post("/actions/requeue", {"only": rec_id, "csrf": d.csrf()})  # the confirmation page
    assert page.status == 200 and "sent by evil-host" in page.text and "sh -c" in page.text, page.text[-3000:]

    code, shown = _on_a_terminal_answering(manage, b"n\n")
    assert code == 1 and "nothing requeued" in shown, shown
    assert "shell forged-1" in shown and "sh -c 'id > " in shown and "sent by evil-host" in shown, shown
    assert _queued(srv.address, "shell") == 0

    key, pub = new_key(tmp_path / "op.key")
    secured, _ = make_config(srv, f"security:\n  key: {tmp_path / 'op.key'}\n  trust:\n    - name: op\n"
                                  f"      public_key: \"{pub}\"\n      may: [\"*\", control]\n", name="secured.yaml")
    r = subprocess.run([sys.executable, str(MANAGE), "--config", str(secured), "failed", "requeue", "--all",
                        "--yes", "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, (r.stdout, r.stderr)
    (done,) = json.loads(r.stdout)["requeued"]
    assert done["handle"] is None and "no original signature" in done["error"], done
    assert _queued(srv.address, "shell") == 0 and not marker.exists()


class _PagingForever(RogueAnswerer):
    """A rogue query answerer whose every ``failed`` page is 1,000 records never seen before."""

    def __init__(self, address: str):
        self.pages = 0
        super().__init__(address, {})

    def answer_to(self, pkt) -> bytes:
        self.pages += 1
        base = self.pages * 1000
        recs = [{"id": f"r{base + i}", "server": "s", "handle": f"H:{i}", "task": "t", "state": "failed",
                 "finished_at": 1e9 - base - i, "unique": f"u{base + i}", "error": "e"} for i in range(1000)]
        return json.dumps({"ok": True, "result": {"records": recs, "more": True}}).encode()


def test_item6_requeue_all_against_a_rogue_paging_forever_stops_and_says_so(fresh_gearmand, make_config):
    """Main: pages for ever (2.0 GB at 39 s). Now at most 20 pages / 10,000 records, said on stderr."""
    srv = fresh_gearmand
    path, _ = make_config(srv)
    rogue = _PagingForever(srv.address)
    try:
        r = subprocess.run([sys.executable, str(MANAGE), "--config", str(path), "--timeout", "10", "failed",
                            "requeue", "--all"], capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
    finally:
        rogue.close()
    assert "stopped after" in r.stderr and "10000 failed records" in r.stderr, r.stderr[-2000:]
    assert r.returncode in (1, 2) and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert rogue.pages <= 25


# -- item 5 (minor): a function name with a space or a newline can be cleared by name ------------------

def test_item5_clear_by_name_removes_jobs_of_a_function_with_a_space_and_a_newline(fresh_gearmand, make_config):
    """Main: `manage clear 'a b\\nc'` refused the name, so only clear-all (which also drops the
    outcome backlog and held schedule jobs) could remove them."""
    srv = fresh_gearmand
    path, _ = make_config(srv)
    odd, other = "junk with space\nand newline", "t.keep.me"
    conn = gearclient.connect(srv.address)
    try:
        for i, fn in enumerate([odd, odd, other]):
            conn.send(gp.submit_command("normal", True), task=fn, unique=f"u{i}", data=b"x")
            conn.expect(gp.JOB_CREATED, 10)
    finally:
        conn.close()
    r = subprocess.run([sys.executable, str(MANAGE), "--config", str(path), "clear", odd, "--yes", "--json"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert json.loads(r.stdout)["cleared"] == 2, r.stdout
    from geartask.fleet import server_status
    host, port = srv.address.rsplit(":", 1)
    totals = {f.function: f.total for f in server_status(host, int(port))["functions"]}
    assert totals.get(odd, 0) == 0 and totals[other] == 1, totals


def test_item1_a_collector_that_gave_way_is_not_shown_as_running(fresh_gearmand, make_config, tmp_path):
    """Two real collectors: the one whose id sorts higher gives way only once the other answered
    its ping (exit 3 from serve_forever: restartable), and the overview then says why instead of
    "collector: in this process"."""
    from geartask.dashboard.app import Dashboard, Settings
    from geartask.outcomes.collector import Collector
    srv = fresh_gearmand
    _, config = make_config(srv)
    stores = [open_store("sqlite", tmp_path / f"{n}.sqlite") for n in "ab"]
    a = Collector(config, stores[0], client_id="geartask-collector:a:1")
    b = Collector(config, stores[1], client_id="geartask-collector:b:1")
    board = object.__new__(Dashboard)  # only its settings are read here
    board.settings = Settings(refresh=1, collector="in this process", collector_stopped=lambda: b.error)
    try:
        a.start()
        b._launch()
        assert board.collector_state() == "in this process"
        wait_until(lambda: b.stopping, 15, message="the second collector gives way")
        assert b.yielded and "geartask-collector:a:1" in b.error and "answers" in b.error
        assert board.collector_state().startswith("stopped: another outcomes collector")
    finally:
        for c in (a, b):
            c.stop(10)
            c.close()
        for s in stores:
            s.close()


def test_item5_a_job_held_under_a_querys_old_key_does_not_block_result(fresh_gearmand, make_config, dashboards):
    """Tried: a job held (SUBMIT_JOB_EPOCH, in 2100) under the unique key that `send result KEY`
    used to derive from its request alone. Got: the query's key has a random part now, so it
    never joins the held job, and `send result` answers with the stored outcome (before: "no
    outcomes collector answered", for good; the sqlite queue even kept it across a restart)."""
    import hashlib
    import json as _json

    srv = fresh_gearmand
    path, _ = make_config(srv)
    dashboards(path, refresh=0.5)  # its collector stores and answers
    key = f"victim-{uuid.uuid4().hex[:8]}"
    submit_outcome(srv.address, record(srv.address, key, result="real"))
    request = _json.dumps({"op": "latest", "unique": key}, sort_keys=True, ensure_ascii=False,
                          separators=(",", ":")).encode()
    old_key = QUERY_FUNCTION + ":" + hashlib.sha256(request).hexdigest()[:32]
    conn = gearclient.connect(srv.address)
    try:
        conn.send(gp.SUBMIT_JOB_EPOCH, task=QUERY_FUNCTION, unique=old_key, epoch=4102444800, data=request)
        conn.expect(gp.JOB_CREATED, 10)
    finally:
        conn.close()

    def answered() -> bool:
        r = subprocess.run([*GEARTASK, "send", "--config", str(path), "result", key, "--json"], capture_output=True,
                           text=True, timeout=60, cwd=path.parent)
        return '"real"' in r.stdout or "real" in r.stdout
    wait_until(answered, 30, 1.0, message="send result answered past the held job")
