"""The dashboard over HTTP (no browser): safety (token, CSRF, Host), JSON pages, /metrics,
dead and silent servers, and stopping a running job. Real gearmand, real dashboard process;
the fake control worker (tests/fakeworker.py) stands in for workers where a test needs
replies a real worker can't be made to give (counters of a process that then exits)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

import gearclient
from dashboards import queue_background, report_outcome
from fakeworker import FakeControlWorker
from geartask import fleet as admin
from geartask.control import COMMANDS
from geartask.metrics import FleetCounters
from geartask.server import free_port
from helpers import run_script, wait_until
from netproxy import SliceProxy
from workers import WorkerProc

MANAGE = "manage_client/manage_client.py"
PAGES = ["/", "/functions", "/workers", "/jobs", "/failed", "/job?key=nothing"]


def _addr(server) -> tuple[str, int]:
    host, port = server.address.rsplit(":", 1)
    return host, int(port)


# -- where it listens, and who may ask ------------------------------------------------------

@pytest.mark.parametrize("how", ["flag", "config"])
def test_non_loopback_listen_without_token_refuses_to_start(gearmand, make_config, how):
    port = free_port()
    extra = f"dashboard:\n  listen: 0.0.0.0:{port}\n" if how == "config" else ""
    path, _ = make_config(gearmand, extra)
    args = ["--listen", f"0.0.0.0:{port}"] if how == "flag" else []
    r = run_script(MANAGE, "--config", str(path), "dashboard", *args, timeout=30)
    assert r.returncode == 2, r.stderr
    assert "not a loopback address" in r.stderr and "token" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    with socket.socket() as s:  # and nothing was left listening
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_bad_listen_is_a_usage_error(gearmand, make_config):
    path, _ = make_config(gearmand)
    r = run_script(MANAGE, "--config", str(path), "dashboard", "--listen", "127.0.0.1:99999", timeout=30)
    assert r.returncode == 2 and "--listen" in r.stderr and "port" in r.stderr, r.stderr


def test_with_a_token_every_request_needs_it_and_changes_nothing_without(gearmand, make_config, fname, dashboards):
    path, _ = make_config(gearmand)
    queue_background(gearmand, fname, 3)
    d = dashboards(path, "--token", "s3cret-token-for-tests")
    for page in PAGES + ["/metrics", "/static/dashboard.css"]:
        r = d.get(page)
        assert r.status == 401, (page, r.status)
        assert "Basic" in r.headers.get("WWW-Authenticate", "")
    assert d.get("/", headers={"Authorization": "Bearer wrong"}).status == 401
    # An action without the token: refused before anything else, queue untouched.
    r = d.post("/actions/clear", {"function": fname, "confirm": "yes", "csrf": "x"})
    assert r.status == 401
    assert gearclient.queued(gearmand.address, fname) == 3
    # With it: a bearer header, basic auth (a browser's prompt), or ?token= once (then a cookie).
    d.token = "s3cret-token-for-tests"
    assert d.get("/").status == 200
    basic = "Basic " + __import__("base64").b64encode(b"anyone:s3cret-token-for-tests").decode()
    assert d.get("/functions", headers={"Authorization": basic}).status == 200
    d.token = None
    r = d.get("/?token=s3cret-token-for-tests")
    assert r.status == 200
    cookie = r.headers["Set-Cookie"].split(";")[0]
    assert "HttpOnly" in r.headers["Set-Cookie"] and "SameSite=Strict" in r.headers["Set-Cookie"]
    assert d.get("/workers", headers={"Cookie": cookie}).status == 200
    d.token = "s3cret-token-for-tests"
    assert d.act("clear", function=fname).status == 200
    assert gearclient.queued(gearmand.address, fname) == 0


def test_post_without_csrf_or_confirmation_changes_nothing(gearmand, make_config, fname, dashboards):
    path, _ = make_config(gearmand)
    queue_background(gearmand, fname, 4)
    d = dashboards(path)
    json_hdr = {"Accept": "application/json"}
    for fields in ({"function": fname, "confirm": "yes"}, {"function": fname, "confirm": "yes", "csrf": "forged"}):
        r = d.post("/actions/clear", fields, headers=json_hdr)
        assert r.status == 403 and "CSRF" in r.json()["message"]
    r = d.post("/actions/clear", {"function": fname, "csrf": d.csrf()})  # the confirmation page, as HTML
    assert r.status == 200 and "Confirm: clear" in r.text and "Remove the 4 queued jobs" in r.text
    r = d.post("/actions/clear", {"function": fname, "csrf": d.csrf()}, headers=json_hdr)
    assert r.status == 409 and "confirm=yes" in r.json()["message"]
    assert gearclient.queued(gearmand.address, fname) == 4
    r = d.act("clear", function=fname)
    assert r.status == 200 and r.json()["ok"], r.text
    assert gearclient.queued(gearmand.address, fname) == 0
    log = dashboard_log(path, '"dashboard clear"')
    assert '"client": "127.0.0.1"' in log and fname in log


def test_foreign_host_header_is_refused_without_a_token(gearmand, make_config, dashboards):
    """DNS rebinding: a page elsewhere whose name now points at 127.0.0.1 must not read or act."""
    path, _ = make_config(gearmand)
    d = dashboards(path)
    assert d.get("/", headers={"Host": f"evil.example:{d.port}"}).status == 400
    assert d.get("/", headers={"Host": f"localhost:{d.port}"}).status == 200


def test_every_page_is_html_and_json(gearmand, make_config, dashboards):
    path, _ = make_config(gearmand)
    d = dashboards(path)
    for page in PAGES:
        html = d.get(page)
        assert html.status == 200 and "<html" in html.text and 'id="live"' in html.text, page
        assert "frame-ancestors 'none'" in html.headers["Content-Security-Policy"]
        frag = d.get(page + ("&" if "?" in page else "?") + "fragment=1")
        assert frag.status == 200 and "<html" not in frag.text, page
        for r in (d.get(page, headers={"Accept": "application/json"}), d.get(page + ("&" if "?" in page else "?")
                                                                              + "format=json")):
            assert r.status == 200 and r.headers["Content-Type"].startswith("application/json"), page
            assert "csrf" in r.json()
    overview = d.get_json("/")
    assert [s["server"] for s in overview["servers"]] == [gearmand.address] and overview["servers"][0]["up"]


def test_hostile_names_are_escaped(fresh_gearmand, make_config, dashboards):
    path, _ = make_config(fresh_gearmand)
    evil = "<script>alert(1)</script>\x1b[2J"
    queue_background(fresh_gearmand, evil, 1)
    d = dashboards(path)
    wait_until(lambda: any(f["function"] == evil for f in d.get_json("/functions")["functions"]), 10,
               message="the function is listed")
    for page in ("/functions", "/"):
        text = d.get(page).text
        assert "<script>alert" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;\\x1b[2J" in text


# -- dead and silent servers ---------------------------------------------------------------

def test_a_server_going_down_shows_within_two_refreshes_and_comes_back(gearmand_factory, make_config, dashboards):
    s1, s2 = gearmand_factory(), gearmand_factory()
    path, _ = make_config([s1, s2])
    refresh = 1.0
    d = dashboards(path, refresh=refresh)
    states = lambda: {s["server"]: s["up"] for s in d.get_json("/", timeout=5)["servers"]}  # noqa: E731
    wait_until(lambda: states() == {s1.address: True, s2.address: True}, 10, message="both up")
    s2.kill()
    t0 = time.monotonic()
    wait_until(lambda: states()[s2.address] is False, 2 * refresh + admin.DEFAULT_TIMEOUT + 5, message="s2 down")
    seen_after = time.monotonic() - t0
    assert states()[s1.address] is True
    metrics = {(s.name, s.labels.get("server")): s.value for f in text_string_to_metric_families(d.get("/metrics").text)
               for s in f.samples}
    assert metrics[("geartask_server_up", s2.address)] == 0 and metrics[("geartask_server_up", s1.address)] == 1
    s2.start()
    wait_until(lambda: states()[s2.address] is True, 2 * refresh + 10, message="s2 up again")
    print(f"down shown after {seen_after:.2f}s (refresh {refresh}s)")


class Blackhole:
    """A TCP listener that accepts and never answers: a server that hangs."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)

    def close(self):
        self.stopped = True
        self.sock.close()
        for c in self.conns:
            c.close()


def test_pages_never_hang_on_a_server_that_does_not_answer(gearmand, make_config, dashboards):
    hole = Blackhole()
    try:
        path, _ = make_config([gearmand.address, f"127.0.0.1:{hole.port}"])
        d = dashboards(path, "--timeout", "1", refresh=1.0)
        for page in PAGES + ["/metrics"]:
            t0 = time.monotonic()
            r = d.get(page, timeout=10)
            assert r.status == 200, page
            assert time.monotonic() - t0 < 5, f"{page} took {time.monotonic() - t0:.1f}s"
        ov = d.get_json("/")
        by = {s["server"]: s for s in ov["servers"]}
        assert by[gearmand.address]["up"] and not by[f"127.0.0.1:{hole.port}"]["up"]
        assert "within 1s" in by[f"127.0.0.1:{hole.port}"]["error"]
        jobs = d.get_json("/jobs")
        assert {s["server"]: s["ok"] for s in jobs["servers"]} == {gearmand.address: True,
                                                                     f"127.0.0.1:{hole.port}": False}
    finally:
        hole.close()


# -- /metrics -------------------------------------------------------------------------------

def _samples(text: str) -> dict:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _promtool(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: scripts/install.sh installs Debian's prometheus package")
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


def test_metrics_fold_the_workers_counters_and_keep_an_exited_process_share(gearmand, make_config, fname, dashboards):
    """Two processes report per-task counters in their pings; the fleet totals add them up,
    pass promtool, and keep the share of a process that then exits."""
    def counters(complete, failed, retried, le):
        return {"tasks": {fname: {"complete": complete, "failed": failed, "retried": retried,
                                  "seconds_sum": 0.5 * (complete + failed), "buckets": le}},
                "threads": 4, "busy": 1}
    a = FakeControlWorker([_addr(gearmand)], "ma", 5001,
                          reply_extra=counters(7, 2, 1, {"0.1": 3, "1": 9, "+Inf": 9}))
    b = FakeControlWorker([_addr(gearmand)], "mb", 5002,
                          reply_extra=counters(5, 0, 0, {"0.1": 5, "1": 5, "+Inf": 5}))
    try:
        path, _ = make_config(gearmand)
        d = dashboards(path, refresh=0.5)
        key = lambda metric, **labels: (metric, tuple(sorted(labels.items())))  # noqa: E731
        wait_until(lambda: _samples(d.get("/metrics").text).get(key("geartask_jobs_total", task=fname,
                                                                     outcome="complete")) == 12, 15,
                   message="12 complete jobs counted")
        text = d.get("/metrics").text
        _promtool(text)
        m = _samples(text)
        assert m[key("geartask_jobs_total", task=fname, outcome="failed")] == 2
        assert m[key("geartask_jobs_total", task=fname, outcome="retried")] == 1
        assert m[key("geartask_job_duration_seconds_bucket", task=fname, le="0.1")] == 8
        assert m[key("geartask_job_duration_seconds_count", task=fname)] == 14
        assert m[key("geartask_job_duration_seconds_sum", task=fname)] == 7.0
        assert m[key("geartask_worker_threads", host="127.0.0.1", name="ma")] == 4
        assert m[key("geartask_worker_busy_threads", host="127.0.0.1", name="mb")] == 1
        assert m[key("geartask_server_up", server=gearmand.address)] == 1
        a.reply_extra.update(counters(10, 2, 1, {"0.1": 3, "1": 12, "+Inf": 12}))  # 3 more done
        wait_until(lambda: _samples(d.get("/metrics").text)[key("geartask_jobs_total", task=fname,
                                                                 outcome="complete")] == 15, 15,
                   message="15 complete")
        a.close()  # the process exits: its jobs stay counted
        wait_until(lambda: key("geartask_worker_threads", host="127.0.0.1", name="ma")
                   not in _samples(d.get("/metrics").text), 15, message="ma gone")
        assert _samples(d.get("/metrics").text)[key("geartask_jobs_total", task=fname, outcome="complete")] == 15
    finally:
        a.close()
        b.close()


def test_fleet_counters_ignore_malformed_replies():
    c = FleetCounters()
    c.update([{"name": "w", "pid": 1, "started": 1, "tasks": {"t": {"complete": "many", "failed": -3,
                                                                   "buckets": {"x": 1, "nan": 2, "0.5": 1}}}},
              {"name": "w", "pid": 2, "started": 1, "tasks": ["not", "a", "dict"]},
              "not a reply", {"name": "w", "pid": 3, "started": 1, "tasks": {"t": {"complete": 2}}}])
    assert c.snapshot()["t"]["complete"] == 2 and c.snapshot()["t"]["failed"] == 0
    assert c.snapshot()["t"]["buckets"] == {0.5: 1.0}


def test_metrics_count_the_jobs_a_real_worker_ran(gearmand_factory, make_config, fname, dashboards):
    s1, s2 = gearmand_factory(), gearmand_factory()
    path, _ = make_config([s1, s2])
    w = WorkerProc(path, "mw", 2).wait_attached([s1.address, s2.address])
    try:
        reply = admin.Admin([_addr(s1)]).ping_workers()[0].value[0].reply
        assert "tasks" in reply, reply  # the per-task counters the metrics are made of
        d = dashboards(path, refresh=0.5)
        assert all(o.state == "complete" for o in gearclient.run(s1.address, "eg.reverse", ["abc"] * 30))
        assert all(o.state == "complete" for o in gearclient.run(s2.address, "eg.reverse", ["xyz"] * 20))
        key = ("geartask_jobs_total", (("outcome", "complete"), ("task", "eg.reverse")))
        wait_until(lambda: _samples(d.get("/metrics").text).get(key) == 50, 15, message="50 jobs counted")
        text = d.get("/metrics").text
        _promtool(text)
        m = _samples(text)
        assert m[("geartask_job_duration_seconds_count", (("task", "eg.reverse"),))] == 50
        assert m[("geartask_function_workers", (("function", "eg.reverse"), ("server", s1.address)))] == 2
    finally:
        w.stop()


# -- stopping a running job -----------------------------------------------------------------

def test_stop_exits_1_when_no_worker_runs_it(gearmand, make_config):
    path, _ = make_config(gearmand)
    r = run_script(MANAGE, "--config", str(path), "stop", "no-such-unique-key", timeout=30)
    assert r.returncode == 1 and "no worker runs no-such-unique-key" in r.stderr, r.stderr


def test_stop_goes_to_the_process_that_runs_the_job_through_a_slicing_proxy(fresh_gearmand):
    srv = fresh_gearmand
    job = {"handle": "H:test:77", "task": "shell", "unique": "u-77", "server": srv.address, "seconds": 3.5}
    other = FakeControlWorker([_addr(srv)], "idle", 6001)
    runner = FakeControlWorker([_addr(srv)], "busy", 6002, reply_extra={"running": [dict(job)]})
    proxy = SliceProxy(_addr(srv), seed=5).start()
    try:
        sliced = admin.Admin([(proxy.host, proxy.port)], timeout=10)
        report = sliced.stop_job("u-77")
        assert report.ok, report.to_dict()
        (j,) = report.jobs
        assert (j.handle, j.name, j.pid, j.outcome) == ("H:test:77", "busy", 6002, "stopped")
        assert [c for _, c in runner.received if c["command"] == "stop"] == [{"command": "stop", "handle": "H:test:77",
                                                                                 "server": srv.address}]
        assert not [c for _, c in other.received if c["command"] == "stop"]
        again = sliced.stop_job("H:test:77")  # no longer running anywhere
        assert not again.ok and again.jobs == []
        assert proxy.slices > 10
    finally:
        proxy.stop()
        other.close()
        runner.close()


def test_stop_command_line_and_dashboard_action(fresh_gearmand, make_config, dashboards):
    srv = fresh_gearmand
    jobs = [{"handle": f"H:test:{i}", "task": "shell", "unique": f"u-{i}", "server": srv.address, "seconds": 1}
            for i in (1, 2)]
    runner = FakeControlWorker([_addr(srv)], "busy", 6003, reply_extra={"running": jobs})
    try:
        path, _ = make_config(srv)
        r = run_script(MANAGE, "--config", str(path), "--json", "stop", "u-1", timeout=30)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["jobs"][0]["outcome"] == "stopped"
        d = dashboards(path, refresh=0.5)
        wait_until(lambda: [j["handle"] for j in d.get_json("/job?key=u-2")["running"]] == ["H:test:2"], 10,
                   message="the Job page shows it running")
        r = d.act("stop", target="u-2")
        assert r.status == 200 and r.json()["ok"], r.text
        r = d.act("stop", target="u-2")
        assert r.status == 409 and "no worker runs u-2" in r.json()["message"]
    finally:
        runner.close()


def test_stop_a_real_running_shell_job(gearmand, make_config, fname):
    assert "stop" in COMMANDS
    path, _ = make_config(gearmand, "worker:\n  shell:\n    allow: [sleep]\n")
    w = WorkerProc(path, "sw", 1).wait_attached([gearmand.address])
    try:
        conn = gearclient.connect(gearmand.address)
        (handle,) = gearclient.submit(conn, "shell", [{"cmd": ["sleep", "60"]}], uniques=[fname])
        adm = admin.Admin([_addr(gearmand)])
        wait_until(lambda: any(j.get("unique") == fname for r in adm.ping_workers() for p in r.value
                               for j in (p.reply or {}).get("running", [])), 10, message="running")
        r = run_script(MANAGE, "--config", str(path), "stop", fname, timeout=30)
        assert r.returncode == 0, r.stderr
        out = gearclient.wait(conn, [handle], timeout=15)[handle]
        assert out.state == "failed" and "stopped by operator" in json.dumps(out.warnings)
        conn.close()
    finally:
        w.stop()


# -- failed jobs, through the collector the dashboard runs ----------------------------------

def _report_failed(server, task: str, unique: str, data: bytes, attempts: int = 3, **fields) -> dict:
    """What a worker does for a job that failed for good: a background job of geartask.outcomes
    (``fields`` change the record: state="complete", result=...)."""
    fields = {"handle": f"H:test:{unique}", "task": task, "unique": unique, "attempts": attempts,
              "reason": {"error": f"exit status 1 ({unique})"}, "data": data, **fields}
    return report_outcome(server, **fields)


def test_failed_page_lists_filters_requeues_and_purges(fresh_gearmand, make_config, fname, dashboards):
    srv = fresh_gearmand
    path, _ = make_config(srv)
    d = dashboards(path, refresh=0.5)
    a = _report_failed(srv, fname, f"{fname}-a", b'{"n": 1}')
    b = _report_failed(srv, fname + ".other", f"{fname}-b", b'{"n": 2}')
    c = _report_failed(srv, fname, f"{fname}-c", b'{"n": 3}')
    wait_until(lambda: len(d.get_json("/failed")["failed"]) == 3, 15, message="3 failed jobs stored and listed")
    page = d.get_json(f"/failed?task={fname}&since=1h")
    assert sorted(r["unique"] for r in page["failed"]) == [f"{fname}-a", f"{fname}-c"]
    assert all(r["attempts"] == 3 and "exit status 1" in r["error"] for r in page["failed"])
    assert d.get("/failed?since=soon").status == 400
    html = d.get(f"/failed?task={fname}").text
    assert f"{fname}-a" in html and f"{fname}-b" not in html
    job = d.get_json(f"/job?key={fname}-a")
    assert job["state"] == "failed" and job["outcomes"][0]["reason"] == {"error": f"exit status 1 ({fname}-a)"}
    # requeue one: the original task and data go back to gearmand (no worker runs fname here)
    r = d.act("requeue", only=a["id"])
    assert r.status == 200 and r.json()["ok"], r.text
    assert gearclient.queued(srv.address, fname) == 1
    assert [x["unique"] for x in d.get_json("/failed")["failed"]] == [c["unique"], b["unique"]]
    rec = d.get_json(f"/job?key={fname}-a")["outcomes"][0]
    assert rec["requeues"][0]["by"] == "dashboard@127.0.0.1" and rec["requeues"][0]["handle"]
    # purge one by id, then everything older than now
    r = d.act("purge", only=b["id"])
    assert r.status == 200 and r.json()["details"] == {"purged": 1}
    r = d.act("purge", older_than="1h")
    assert r.status == 200 and r.json()["details"] == {"purged": 0}
    r = d.act("purge", all="yes", task=fname)  # every one shown (a, requeued, is not)
    assert r.status == 200 and r.json()["details"] == {"purged": 1}
    assert d.get_json("/failed")["failed"] == []
    assert d.get_json(f"/job?key={fname}-a")["outcomes"][0]["requeues"]  # the requeued record stays
    log = dashboard_log(path, '"dashboard purge"')
    assert '"dashboard requeue"' in log


def test_no_collector_reads_outcomes_from_the_collector_elsewhere(fresh_gearmand, make_config, fname, dashboards):
    srv = fresh_gearmand
    path, _ = make_config(srv)
    lone = dashboards(path, "--no-collector", refresh=0.5)
    err = lone.get_json("/failed")["error"]
    assert "no outcomes collector answered" in err  # shown on the page, not a crash
    path2, _ = make_config(srv, f"outcomes:\n  path: {path.parent / 'other.sqlite'}\n", name="collector.yaml")
    with_collector = dashboards(path2, refresh=0.5)
    _report_failed(srv, fname, f"{fname}-x", b"{}")
    wait_until(lambda: [r["unique"] for r in lone.get_json("/failed")["failed"]] == [f"{fname}-x"], 15,
               message="read through gearmand from the other dashboard's collector")
    assert with_collector.get_json("/failed")["failed"][0]["unique"] == f"{fname}-x"
    # the throughput chart asks the collector elsewhere too (the per_minute op, through gearmand)
    wait_until(lambda: lone.get_json("/throughput")["totals"]["failed"] == 1, 15, message="charted from elsewhere")
    assert lone.get_json("/throughput")["error"] is None


def test_a_worker_process_serves_its_own_metrics(gearmand, make_config, fname):
    """worker.metrics_listen: geartask.metrics.start_worker_metrics fed by a real WorkerProcess's
    ping reply (here asked through its control function; the worker passes its own)."""
    import urllib.request

    from geartask.metrics import start_worker_metrics
    from workers import in_process_worker
    path, config = make_config(gearmand)
    with in_process_worker(config, gearmand.address, "mx", 2):
        port = free_port()
        adm = admin.Admin([_addr(gearmand)])

        def reply() -> dict:
            (p,) = [p for p in adm.ping_workers()[0].value if p.name == "mx"]
            return p.reply
        server = start_worker_metrics(f"127.0.0.1:{port}", reply)
        try:
            assert all(o.state == "complete" for o in gearclient.run(gearmand.address, "eg.reverse", ["ab"] * 7))
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            _promtool(text)
            m = _samples(text)
            assert m[("geartask_worker_threads", (("host", "127.0.0.1"), ("name", "mx")))] == 2
            if "tasks" in reply():  # the per-task counters (branch worker12)
                assert m[("geartask_jobs_total", (("outcome", "complete"), ("task", "eg.reverse")))] == 7
        finally:
            server.shutdown()
            server.server_close()


def test_jobs_page_cancels_a_queued_job_and_searches_by_unique(fresh_gearmand, make_config, fname, dashboards):
    srv = fresh_gearmand
    path, _ = make_config(srv)
    conn = gearclient.connect(srv.address)
    handles = gearclient.submit(conn, fname, [{"i": 1}, {"i": 2}], background=True,
                                uniques=[f"{fname}-1", f"{fname}-2"])
    conn.close()
    d = dashboards(path)
    jobs = d.get_json("/jobs")["servers"][0]
    assert sorted(j["handle"] for j in jobs["jobs"]) == sorted(handles)
    assert all(j["state"] == "queued" for j in jobs["jobs"])
    assert sorted(jobs["unique_keys"]) == [f"{fname}-1", f"{fname}-2"]
    assert d.get_json(f"/jobs?unique={fname}-2")["servers"][0]["unique_keys"] == [f"{fname}-2"]
    html = d.get("/jobs").text
    assert html.count('class="danger cancel"') == 2 and handles[0] in html
    r = d.act("cancel", handle=handles[0])
    assert r.status == 200 and r.json()["ok"], r.text
    states = {j["handle"]: j["state"] for j in d.get_json("/jobs")["servers"][0]["jobs"]}
    assert states[handles[0]] == "cancelled" and states[handles[1]] == "queued"
    r = d.act("cancel", handle=handles[0])
    assert r.status == 409 and "already cancelled" in r.json()["message"]


def test_functions_sort_and_shutdown_per_host(fresh_gearmand, make_config, fname, dashboards):
    srv = fresh_gearmand
    path, _ = make_config(srv)
    queue_background(srv, fname + ".few", 2)
    queue_background(srv, fname + ".many", 9)
    here = FakeControlWorker([_addr(srv)], "here", 7001)
    there = FakeControlWorker([_addr(srv)], "there", 7002, source_ips=["127.0.0.2"])
    try:
        d = dashboards(path, refresh=0.5)
        rows = d.get_json("/functions?sort=queued&desc=1")["functions"]
        assert [r["function"] for r in rows[:2]] == [fname + ".many", fname + ".few"]
        assert [r["function"] for r in d.get_json("/functions?sort=queued")["functions"]
                if r["function"].startswith(fname)] == [fname + ".few", fname + ".many"]
        wait_until(lambda: {h["host"] for h in d.get_json("/workers")["hosts"]} == {"127.0.0.1", "127.0.0.2"}, 10,
                   message="two hosts")
        r = d.act("shutdown", host="127.0.0.2")
        assert r.status == 200 and r.json()["ok"], r.text
        wait_until(lambda: there.stopped.is_set(), 10, message="the worker on 127.0.0.2 told to stop")
        assert [c["command"] for _, c in there.received if c["command"] != "ping"] == ["shutdown"]
        assert not [c for _, c in here.received if c["command"] == "shutdown"]
        # 'now' needs a second confirmation
        r = d.post("/actions/shutdown", {"csrf": d.csrf(), "confirm": "yes", "name": "here", "pid": "7001",
                                         "now": "yes"}, headers={"Accept": "application/json"})
        assert r.status == 409 and "confirm_now=yes" in r.json()["message"]
        assert not [c for _, c in here.received if c["command"] == "shutdown"]
        r = d.act("shutdown", name="here", pid="7001", now="yes", confirm_now="yes")
        assert r.status == 200 and r.json()["ok"], r.text
        wait_until(lambda: [c for _, c in here.received if c["command"] == "shutdown"] ==
                   [{"command": "shutdown", "now": True}], 10, message="shutdown now received")
    finally:
        here.close()
        there.close()


def test_silent_and_lying_worker_processes(fresh_gearmand, make_config, dashboards):
    """A process that never answers its control function is flagged silent; one whose ping reply
    has the wrong shapes (anyone can register a control function) breaks no page."""
    srv = fresh_gearmand
    silent = FakeControlWorker([_addr(srv)], "mute", 8001, answer=False)
    liar = FakeControlWorker([_addr(srv)], "liar", 8002, reply_extra={
        "threads": "many", "busy": True, "jobs_done": 1e300, "started": "yesterday",
        "running": [1, {"handle": 5, "seconds": "long", "unique": ["x"]}, "<b>"],
        "tasks": {"t": "x", "u": {"complete": "7", "buckets": {"nope": 1}}}, "name": "<script>"})
    try:
        path, _ = make_config(srv)
        d = dashboards(path, "--timeout", "1", refresh=0.5)
        def procs():
            return {p["name"]: p for h in d.get_json("/workers")["hosts"] for p in h["processes"]}
        wait_until(lambda: procs().get("mute", {}).get("silent") is True, 15, message="mute flagged silent")
        liar_row = procs()["liar"]
        assert liar_row["silent"] is False and liar_row["threads"] is None and liar_row["started"] is None
        assert liar_row["running"] == [{"handle": "5", "task": None, "unique": "['x']", "server": None,
                                        "seconds": None}]
        for page in PAGES + ["/metrics"]:
            assert d.get(page).status == 200, page
        assert "<script>" not in d.get("/workers").text
        _promtool(d.get("/metrics").text)
        assert d.get_json("/")["totals"]["silent"] == 1
    finally:
        silent.close()
        liar.close()


def test_worker_metrics_on_a_taken_port_is_a_clear_usage_error():
    from geartask.errors import UsageError
    from geartask.metrics import start_worker_metrics
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(UsageError, match=r"worker.metrics_listen 127.0.0.1:\d+: cannot listen there"):
            start_worker_metrics(f"127.0.0.1:{taken.getsockname()[1]}", dict)


def test_job_page_shows_outcomes_results_and_timings(fresh_gearmand, make_config, fname, dashboards):
    srv = fresh_gearmand
    path, _ = make_config(srv)
    d = dashboards(path, refresh=0.5)
    _report_failed(srv, "eg.reverse", fname, b'"abc"', attempts=2, started_at=time.time() - 1.5)
    _report_failed(srv, "eg.reverse", fname, b'"abc"', state="complete", reason=None, attempts=1,
                   result=json.dumps({"reversed": "cba", "note": "<i>peer text</i>"}).encode(),
                   started_at=time.time() - 0.25, submitted_at=time.time() - 3)
    big = "x" * 200_000
    _report_failed(srv, "shell", fname + "-big", b"{}", state="complete", reason=None, result=big.encode())
    wait_until(lambda: d.get_json(f"/job?key={fname}-big")["state"] == "complete", 15, message="stored")
    job = d.get_json(f"/job?key={fname}")
    assert job["state"] == "complete" and [o["state"] for o in job["outcomes"]] == ["failed", "complete"]
    html = d.get(f"/job?key={fname}")
    assert html.status == 200, html.text[:300]
    text = html.text
    assert "exit status 1" in text and "&#34;reversed&#34;: &#34;cba&#34;" in text and "<i>peer" not in text
    assert "Duration" in text and "Submitted" in text and "fw:127.0.0.1:1" in text
    by_handle = d.get_json(f"/job?key=H:test:{fname}-big")
    assert by_handle["outcomes"] and by_handle["outcomes"][0]["result_shown_cut"] is True
    big_html = d.get(f"/job?key={fname}-big").text
    assert "first 64 KiB shown" in big_html and big_html.count("x" * 1000) < 70
    unknown = d.get("/job?key=no-such-job")
    assert unknown.status == 200 and "No outcome recorded" in unknown.text


def dashboard_log(config_path, wanted: str) -> str:
    """The dashboard's log file once it holds ``wanted`` (log lines are written by a thread, a
    few milliseconds after the action)."""
    path = config_path.parent / "logs" / "dashboard.log"
    return wait_until(lambda: wanted in (text := path.read_text() if path.exists() else "") and text, 10,
                      message=f"{wanted} in {path}")


def test_schedules_page_shows_next_runs_and_the_last_run(fresh_gearmand, make_config, dashboards):
    """The Schedules page: each schedule of the dashboard's config, its next three runs, and its
    last run as the outcomes store knows it (here: none yet)."""
    srv = fresh_gearmand
    path, _ = make_config(srv, 'schedules:\n  - {"name": "nightly", "cron": "0 2 * * *", '
                               '"timezone": "Europe/Berlin", "task": "shell", "data": {"cmd": ["true"]}}\n')
    d = dashboards(path, refresh=0.5)
    page = d.get_json("/schedules")
    (row,) = page["schedules"]
    assert row["name"] == "nightly" and row["when"] == "0 2 * * *" and len(row["next"]) == 3
    assert all(t.endswith(("00:00:00Z", "01:00:00Z")) for t in row["next"])  # 02:00 Berlin, in UTC
    assert row["last"] is None and page["error"] is None
    html = d.get("/schedules").text
    assert "nightly" in html and "Europe/Berlin" in html


def test_fleet_counters_cap_task_names_and_expire_tasks_nobody_reports():
    from geartask.metrics import MAX_FLEET_TASKS, MAX_TASKS
    c = FleetCounters()
    many = {f"t{i}": {"complete": 1} for i in range(MAX_TASKS + 50)}
    c.update([{"name": "w", "pid": 1, "started": 1, "tasks": many}], now=0.0)
    assert len(c.snapshot()) == MAX_TASKS and c.dropped == 50
    for p in range(2, 40):  # fresh names from many processes: the fleet keeps MAX_FLEET_TASKS
        c.update([{"name": "w", "pid": p, "started": 1,
                   "tasks": {f"p{p}.{i}": {"complete": 1} for i in range(MAX_TASKS)}}], now=1.0)
    assert len(c.snapshot()) == MAX_FLEET_TASKS and c.dropped > 50
    c.update([{"name": "w", "pid": 99, "started": 1, "tasks": {"alive": {"complete": 1}}}], now=3602.0)
    assert set(c.snapshot()) == {"alive"}  # the rest went unreported for an hour


# -- issue 22: charts from the outcome store, the Job page, internal queues -----------------------

def test_throughput_chart_reads_the_outcome_store_and_survives_a_restart(fresh_gearmand, make_config, fname,
                                                                          dashboards):
    """Outcomes stored before the dashboard ever ran are on its chart, by minute and state."""
    from geartask.outcomes import open_store
    path, config = make_config(fresh_gearmand)
    minute = int(time.time() // 60) * 60
    store = open_store("sqlite", config.outcomes.path)
    records = [dict(unique=f"{fname}-{i}", finished_at=minute - 600 + 5 + i) for i in range(3)]
    records += [dict(unique=f"{fname}-f{i}", finished_at=minute - 300 + 1, state="failed") for i in range(2)]
    records += [dict(unique=f"{fname}-old", finished_at=minute - 7200)]  # over an hour ago: not charted
    from geartask.outcomes import make_record
    store.add([make_record(server="127.0.0.1:1", handle=f"H:x:{r['unique']}", task=fname,
                           **{"state": "complete", **r}) for r in records])
    store.close()
    for _ in range(2):  # the second dashboard, a restart, shows the same hour
        d = dashboards(path, refresh=0.5)
        data = d.get_json("/throughput")
        assert data["unit"] == "jobs per minute" and data["error"] is None
        assert len(data["minutes"]) == 60 and data["minutes"][-1]["minute"] <= time.time()
        by_minute = {m["minute"]: (m["complete"], m["failed"]) for m in data["minutes"]}
        assert by_minute[minute - 600] == (3, 0) and by_minute[minute - 300] == (0, 2)
        assert sum(c + f for c, f in by_minute.values()) == 5 and data["totals"] == {"complete": 3, "failed": 2}
        assert d.get_json("/")["throughput"]["totals"] == {"complete": 3, "failed": 2}
        html = d.get("/").text
        assert 'class="tchart"' in html and ">jobs per minute</text>" in html and ">time (UTC)</text>" in html
        assert 'id="throughput-complete">3<' in html and 'id="throughput-failed">2<' in html
        d.stop()


def test_queue_depth_chart_says_what_the_queued_tile_counts(fresh_gearmand, make_config, fname, dashboards):
    path, _ = make_config(fresh_gearmand)
    queue_background(fresh_gearmand, fname, 5)
    d = dashboards(path, refresh=0.5)
    page = d.get_json("/")
    assert page["totals"]["queued"] == 5 and page["queued_now"][fname] == 5
    html = d.get("/").text
    # a function with jobs comes before the idle ones (the collector's own queues here)
    assert html.index(f'data-function="{fname}"') < html.index('figure class="chart" data-function="geartask.outcomes"')
    chart = html[html.index(f'data-function="{fname}"'):]
    chart = chart[:chart.index("</figure>")]
    assert 'queued now <b class="now">5</b>' in chart and "peak 5" in chart
    assert ">minutes ago</text>" in chart and ">queued</text>" in chart and ">5</text>" in chart  # axes, scale


def test_targeted_names_get_a_queue_chart_only_when_they_had_jobs(fresh_gearmand, make_config, fname, dashboards):
    """Every worker registers TASK@host:H and TASK@label:L: charting each idle one would list
    every task once per host and label; one with jobs waiting is shown."""
    from geartask import gearman as gp
    path, _ = make_config(fresh_gearmand)
    idle = gearclient.connect(fresh_gearmand.address)  # registers an idle targeted name, as a worker does
    idle.send(gp.CAN_DO, task=f"{fname}@label:idle")
    queue_background(fresh_gearmand, f"{fname}@host:web9", 3)
    try:
        d = dashboards(path, refresh=0.5)
        wait_until(lambda: f"{fname}@label:idle" in [f["function"] for f in d.get_json("/functions")["functions"]],
                   10, message="the idle targeted name listed by gearmand")
        page = d.get_json("/")
        assert f"{fname}@host:web9" in page["charts"] and page["queued_now"][f"{fname}@host:web9"] == 3
        assert f"{fname}@label:idle" not in page["charts"]
    finally:
        idle.close()


def test_clear_is_neither_offered_nor_done_on_internal_queues(fresh_gearmand, make_config, fname, dashboards):
    path, _ = make_config(fresh_gearmand)
    queue_background(fresh_gearmand, fname, 2)
    queue_background(fresh_gearmand, "geartask.control.nobody", 2)
    d = dashboards(path, refresh=0.5)  # its collector registers geartask.outcomes and .query
    wait_until(lambda: "geartask.outcomes" in [f["function"] for f in d.get_json("/functions")["functions"]], 10,
               message="the collector's queue listed")
    html = d.get("/functions").text
    row = html[html.index('<tr data-function="geartask.outcomes">'):]
    row = row[:row.index("</tr>")]
    assert "/actions/clear" not in row and "internal" in row
    mine = html[html.index(f'<tr data-function="{fname}">'):]
    assert "/actions/clear" in mine[:mine.index("</tr>")]
    for internal in ("geartask.outcomes", "geartask.control.nobody"):
        r = d.act("clear", function=internal)
        assert r.status == 400 and not r.json()["ok"], r.text
        assert "internal queues" in r.json()["message"] and "nothing was changed" in r.json()["message"]
    assert gearclient.queued(fresh_gearmand.address, "geartask.control.nobody") == 2
    r = d.post("/actions/clear", {"function": "geartask.outcomes", "csrf": d.csrf()})  # the HTML form's way
    assert r.status == 400 and "internal queues" in r.text
    assert d.act("clear", function=fname).status == 200  # any other queue still clears
    assert gearclient.queued(fresh_gearmand.address, fname) == 0


def test_job_page_shows_traceback_and_input_escaped(fresh_gearmand, make_config, fname, dashboards):
    from dashboards import report_outcome
    path, _ = make_config(fresh_gearmand)
    d = dashboards(path, refresh=0.5)
    tb = 'Traceback (most recent call last):\n  File "p.py", line 3, in parse\nValueError: <script>alert(1)</script>'
    report_outcome(fresh_gearmand, handle="H:t:1", task="t.parse", unique=fname, data=b'{"row": "<b>1042</b>"}',
                   reason={"error": "ValueError: <script>alert(1)</script>", "traceback": tb}, extra={"traceback": tb})
    report_outcome(fresh_gearmand, handle="H:t:2", task="shell", unique=fname + "-plain", data=b"{}",
                   reason={"error": "exit status 1"}, extra={"function": "shell@host:<web1>"})
    wait_until(lambda: d.get_json(f"/job?key={fname}-plain")["state"] == "failed", 15, message="both stored")
    job = d.get_json(f"/job?key={fname}")
    assert job["key"] == fname  # (it used to say "reason")
    rec = job["outcomes"][-1]
    assert rec["traceback"] == tb and "traceback" not in rec["reason"] and job["requeue_id"] == rec["id"]
    html = d.get(f"/job?key={fname}").text
    assert "<script>" not in html and "&lt;b&gt;1042&lt;/b&gt;" in html
    assert "&#34;error&#34;: &#34;ValueError: &lt;script&gt;" in html  # the reason readable, and escaped
    section = html[html.index('<section class="job-traceback">'):]
    section = section[:section.index("</section>")]
    assert '<pre class="traceback">Traceback (most recent call last):\n  File &#34;p.py&#34;, line 3' in section
    assert "ValueError: &lt;script&gt;alert(1)&lt;/script&gt;</pre>" in section
    assert 'action="/actions/requeue"' in html and f'value="{rec["id"]}"' in html
    plain = d.get(f"/job?key={fname}-plain").text
    assert "none recorded" in plain and '<pre class="traceback">' not in plain
    # a targeted job says where it was sent (the name a peer reported, escaped); others don't
    assert '<th>Sent to</th><td class="fn">shell@host:&lt;web1&gt;</td>' in plain and "Sent to" not in html


def test_shown_outcome_takes_the_record_traceback_and_caps_it():
    from geartask.dashboard.app import RESULT_SHOWN, shown_outcome
    rec = shown_outcome({"id": "1", "state": "failed", "traceback": "T" * (RESULT_SHOWN + 5),
                         "reason": {"error": "x", "traceback": "other"}, "data": "d"})
    assert rec["traceback"] == "T" * RESULT_SHOWN and rec["traceback_shown_cut"] is True
    assert rec["reason"] == {"error": "x"} and rec["data"] == "d" and "data_shown_cut" not in rec
    assert "traceback" not in shown_outcome({"id": "2", "state": "failed", "reason": {"error": "x"}})


def test_job_page_progress_of_a_running_job_and_requeue_runs_it_again(fresh_gearmand, make_config, fname,
                                                                      dashboards, tmp_path):
    from geartask.sender.sender import JobSender
    srv = fresh_gearmand
    path, config = make_config(srv, "worker:\n  shell:\n    allow: [sh, sleep]\n  retries: 0\n")
    w = WorkerProc(path, "pw", 3)
    try:
        w.wait_attached([srv.address])
        d = dashboards(path, refresh=0.5)
        flag = tmp_path / "flag"
        with JobSender(config, record_background=False) as sender:
            sender.submit_many([{"task": "eg.slow", "data": {"seconds": 60}, "unique": fname + "-slow",
                                 "background": True},
                                {"task": "shell", "data": {"cmd": ["sleep", "60"]}, "unique": fname + "-quiet",
                                 "background": True},
                                {"task": "shell", "data": {"cmd": ["sh", "-c", f"test -e {flag}"]},
                                 "unique": fname, "background": True, "retries": 0}], wait=False)

        def progress():
            running = d.get_json(f"/job?key={fname}-slow")["running"]
            return running and running[0]["progress"].get("numerator", 0) >= 1 and running[0]["progress"]
        p = wait_until(progress, 20, 0.2, message="the slow job's WORK_STATUS shown")
        assert p["denominator"] == 10 and p["known"] and 0 < p["percent"] <= 100
        html = d.get(f"/job?key={fname}-slow").text
        assert '<b class="progress-text">' in html and '/ 10</b>' in html
        # a running job that sends no WORK_STATUS: its progress is "unknown", and why
        wait_until(lambda: d.get_json(f"/job?key={fname}-quiet")["running"], 20, message="the quiet job runs")
        quiet = d.get_json(f"/job?key={fname}-quiet")["running"][0]["progress"]
        assert "percent" not in quiet and "no progress" in quiet["why"]
        assert '<b class="progress-text">unknown</b>' in d.get(f"/job?key={fname}-quiet").text
        assert d.act("stop", target=fname + "-quiet").status == 200
        assert d.act("stop", target=fname + "-slow").status == 200
        # the failed shell job: Requeue from its page, after the cause is fixed
        wait_until(lambda: d.get_json(f"/job?key={fname}")["state"] == "failed", 20, message="failed stored")
        job = d.get_json(f"/job?key={fname}")
        assert job["requeue_id"] == job["outcomes"][-1]["id"]
        flag.write_text("fixed")
        r = d.act("requeue", only=job["requeue_id"], back=f"/job?key={fname}")
        assert r.status == 200 and r.json()["message"] == "1 of 1 failed job requeued", r.text
        wait_until(lambda: d.get_json(f"/job?key={fname}")["state"] == "complete", 20, message="it ran again")
        after = d.get_json(f"/job?key={fname}")
        assert [o["state"] for o in after["outcomes"]] == ["failed", "complete"] and after["requeue_id"] is None
        html = d.post("/actions/requeue", {"csrf": d.csrf(), "confirm": "yes", "only": job["requeue_id"],
                                           "back": f"/job?key={fname}"}).text
        assert f'href="/job?key={fname}"' in html  # the result links to the job's page
    finally:
        w.stop()


def test_chart_scales_are_round_whole_numbers_and_names_are_escaped():
    from geartask.dashboard.charts import Series, nice_top, time_chart
    assert nice_top(0) == (1, 1) and nice_top(1) == (1, 1) and nice_top(5) == (5, 1) and nice_top(6) == (6, 2)
    assert nice_top(25) == (25, 5) and nice_top(68) == (80, 20) and nice_top(20_000) == (20_000, 5_000)
    svg = str(time_chart([Series("<b>x</b>", [(0, 3), (60, 68)], "c")], 0, 3600, y_label="jobs <per> minute"))
    assert "<b>" not in svg and "&lt;b&gt;x&lt;/b&gt;" in svg and ">jobs &lt;per&gt; minute</text>" in svg
    ticks = [t.split(">")[-1] for t in svg.split("</text>") if 'class="tick"' in t]
    assert ticks[:5] == ["0", "20", "40", "60", "80"] and ticks[5:] == ["00:00", "00:10", "00:20", "00:30", "00:40",
                                                                         "00:50", "01:00"]
