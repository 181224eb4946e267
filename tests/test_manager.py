"""The manager against real gearmand servers and real worker processes (worker_client/runworkers.py)."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from geartask.gearman import (CAN_DO, GRAB_JOB_UNIQ, JOB_ASSIGN_UNIQ, JOB_CREATED, Connection, admin_command,
                               submit_command)
from geartask.errors import ServerError
from geartask.server import free_port
from helpers import PYTHON, REPO, run_script, wait_until
from geartask import fleet as admin
from geartask.admin.cli import main

SCRIPT = "manage_client/manage_client.py"


# -- helpers ------------------------------------------------------------------------------

def submit_bg(server, function: str, count: int, prefix: str = "j", priority: str = "normal",
              data: bytes = b"{}") -> list[str]:
    """Queue ``count`` background jobs (pipelined); returns their handles."""
    conn = Connection(server.host, server.port).connect()
    handles = []
    try:
        for start in range(0, count, 1000):
            n = min(1000, count - start)
            for i in range(start, start + n):
                conn.send(submit_command(priority, True), task=function, unique=f"{prefix}-{i}", data=data)
            handles += [conn.expect(JOB_CREATED, 10).text("job_handle") for _ in range(n)]
    finally:
        conn.close()
    return handles


def function_counts(server, function: str) -> tuple[int, int, int] | None:
    """(queued, running, workers) of one function on one server, None when not listed."""
    for f in admin.server_status(server.host, server.port)["functions"]:
        if f.function == function:
            return f.queued, f.running, f.workers
    return None


def queued(server, function: str) -> int:
    counts = function_counts(server, function)
    return counts[0] if counts else 0


def manage(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return run_script(SCRIPT, *args, timeout=timeout)


@pytest.fixture
def workers(tmp_path):
    """start(config_path, name, threads=2) -> Popen of a real runworkers process; all killed afterwards."""
    procs: list[subprocess.Popen] = []

    def start(config_path: Path, name: str, threads: int = 2, plugins: str = "eg") -> subprocess.Popen:
        log = open(tmp_path / f"runworkers-{name}-{len(procs)}.out", "wb")
        proc = subprocess.Popen([PYTHON, str(REPO / "worker_client/runworkers.py"), "--config", str(config_path),
                                 "--name", name, "--threads", str(threads), "--plugins", plugins],
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        log.close()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def control_function(name: str, proc: subprocess.Popen) -> str:
    return f"geartask.control:{name}:127.0.0.1:{proc.pid}"


def wait_registered(servers, name: str, proc: subprocess.Popen, timeout: float = 15) -> None:
    """Until the process's control function has a worker on every server."""
    fn = control_function(name, proc)

    def ready():
        assert proc.poll() is None, f"worker {name} exited early with {proc.returncode}"
        return all((function_counts(s, fn) or (0, 0, 0))[2] > 0 for s in servers)
    wait_until(ready, timeout, message=f"worker {name} registered on every server")


# -- status and workers ------------------------------------------------------------------------

def test_status_and_workers_two_servers_two_processes(gearmand_factory, make_config, workers, fname):
    s1, s2 = gearmand_factory(), gearmand_factory()
    path, _ = make_config([s1, s2])
    alpha, beta = workers(path, "alpha", 2), workers(path, "beta", 3)
    wait_registered([s1, s2], "alpha", alpha)
    wait_registered([s1, s2], "beta", beta)
    submit_bg(s1, fname, 4)
    submit_bg(s2, fname, 3)

    r = manage("status", "--json", "--config", str(path))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert [s["server"] for s in data["servers"]] == [s1.address, s2.address]
    assert all(s["reachable"] and s["version"] and s["rtt_ms"] >= 0 for s in data["servers"])
    totals = {t["function"]: t for t in data["totals"]}
    assert totals[fname] == {"function": fname, "queued": 7, "running": 0, "workers": 0}
    # each thread of each process serves eg.reverse on each server: (2 + 3) threads x 2 servers
    assert totals["eg.reverse"]["workers"] == 10
    assert totals[control_function("alpha", alpha)]["workers"] == 2

    r = manage("workers", "--json", "--no-ping", "--config", str(path))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert {(p["name"], p["pid"]): (p["ips"], len(p["servers"])) for p in data["processes"]} == {
        ("alpha", alpha.pid): (["127.0.0.1"], 2), ("beta", beta.pid): (["127.0.0.1"], 2)}
    for server in data["servers"]:
        conns = [c for c in server["connections"] if c["name"] in ("alpha", "beta")]
        by_proc = {(c["name"], c["pid"]) for c in conns}
        assert by_proc == {("alpha", alpha.pid), ("beta", beta.pid)}
        assert all(c["worker_ip"] == "127.0.0.1" and c["ip"] == "127.0.0.1" for c in conns)
        threads = {c["name"]: set() for c in conns}
        for c in conns:
            threads[c["name"]].add(c["thread"])
        assert {1, 2} <= threads["alpha"] and {1, 2, 3} <= threads["beta"]
        assert any("eg.reverse" in c["functions"] for c in conns)

    # the readable tables show the same, one row per function and per worker connection
    r = manage("status", "--config", str(path))
    assert r.returncode == 0
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith(fname))
    assert line.split()[1:4] == ["7", "0", "0"] and "4/0/0" in line and "3/0/0" in line
    r = manage("workers", "--no-ping", "--config", str(path))
    assert r.returncode == 0
    assert f"alpha  127.0.0.1  {alpha.pid}" in r.stdout and f"beta   127.0.0.1  {beta.pid}" in r.stdout


def test_workers_shows_foreign_client_ids_as_they_are(gearmand):
    conn = Connection(gearmand.host, gearmand.port).connect()
    try:
        from geartask.gearman import SET_CLIENT_ID
        conn.send(SET_CLIENT_ID, client_id="not-a-geartask-worker")
        conn.send(CAN_DO, task="x.foreign")
        conn.echo()
        (res,) = admin.Admin([(gearmand.host, gearmand.port)]).workers()
        w = next(w for w in res.value if w.client_id == "not-a-geartask-worker")
        assert w.name is None and w.functions == ["x.foreign"]
    finally:
        conn.close()


def test_dead_and_silent_servers_are_reported_while_the_live_one_is_shown(gearmand, fname):
    submit_bg(gearmand, fname, 2)
    dead = f"127.0.0.1:{free_port()}"
    # A server that accepts connections but never answers: only the timeout ends the wait.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    silent_addr = f"127.0.0.1:{silent.getsockname()[1]}"
    try:
        servers = f"{gearmand.address},{dead},{silent_addr}"
        t0 = time.monotonic()
        r = manage("status", "--servers", servers, "--timeout", "0.5")
        elapsed = time.monotonic() - t0
        assert r.returncode == 1
        assert elapsed < 5, f"a silent server held status up for {elapsed:.1f}s"
        assert fname in r.stdout and gearmand.address in r.stdout
        assert f"error: {dead}: cannot connect" in r.stderr
        assert f"error: {silent_addr}:" in r.stderr and "within 0.5s" in r.stderr
        assert "Traceback" not in r.stderr

        r = manage("workers", "--json", "--servers", servers, "--timeout", "0.5")
        assert r.returncode == 1
        data = json.loads(r.stdout)
        assert [s["reachable"] for s in data["servers"]] == [True, False, False]

        for command in (["version"], ["ping"], ["jobs"], ["clear", fname, "--yes"]):
            r = manage(*command, "--servers", f"{gearmand.address},{dead}", "--timeout", "0.5")
            assert r.returncode == 1, (command, r.stderr)
            assert gearmand.address in r.stdout and dead in r.stderr and "Traceback" not in r.stderr
    finally:
        silent.close()


# -- clear ------------------------------------------------------------------------------------

def test_clear_without_workers_stays_cleared_after_kill_and_restart(fresh_gearmand, make_config):
    srv = fresh_gearmand
    path, _ = make_config(srv)
    submit_bg(srv, "t.clear.a", 300, "a")
    submit_bg(srv, "t.clear.a", 20, "a-high", priority="high")
    submit_bg(srv, "t.clear.b", 30, "b")
    assert queued(srv, "t.clear.a") == 320

    r = manage("clear", "t.clear.a", "--yes", "--json", "--config", str(path))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["cleared"] == 320
    assert data["servers"][0]["value"] == {"cleared": {"t.clear.a": 320}, "stranded": 0}
    assert queued(srv, "t.clear.a") == 0 and queued(srv, "t.clear.b") == 30
    assert len(admin_command(srv.host, srv.port, "show jobs")) == 30

    srv.kill()
    srv.start()
    assert queued(srv, "t.clear.a") == 0, "cleared jobs came back from the sqlite queue"
    assert queued(srv, "t.clear.b") == 30
    uniques = admin_command(srv.host, srv.port, "show unique jobs")
    assert sorted(uniques) == sorted(f"b-{i}" for i in range(30))

    # clear with no function clears everything; the change is logged with where and outcome
    r = manage("clear", "--yes", "--config", str(path))
    assert r.returncode == 0, r.stderr
    assert "t.clear.b" in r.stdout and "30 queued jobs cleared" in r.stdout
    srv.kill()
    srv.start()
    assert admin_command(srv.host, srv.port, "show jobs") == []
    events = [json.loads(line) for line in (path.parent / "logs" / "manager.log").read_text().splitlines()]
    clears = [e for e in events if e["event"] == "clear"]
    assert clears[-1]["server"] == srv.address and clears[-1]["cleared"] == {"t.clear.b": 30}
    assert all(e["role"] == "manager" for e in clears)


def test_clear_with_workers_connected_keeps_running_job_and_stays_cleared(fresh_gearmand, make_config, workers):
    srv = fresh_gearmand
    path, _ = make_config(srv)
    proc = workers(path, "busy", 1)
    wait_registered([srv], "busy", proc)
    submit_bg(srv, "eg.slow", 40, "slow", data=json.dumps({"seconds": 60}).encode())
    wait_until(lambda: function_counts(srv, "eg.slow")[1] == 1, 10, message="one eg.slow job running")

    t0 = time.monotonic()
    (res,) = admin.Admin([(srv.host, srv.port)]).clear(["eg.slow"])
    assert time.monotonic() - t0 < 5
    assert res.ok and res.value == {"cleared": {"eg.slow": 39}, "stranded": 0}
    assert function_counts(srv, "eg.slow") == (0, 1, 1)  # the running job is left alone
    assert proc.poll() is None

    # gearmand crashes: the worker goes too (else it would re-grab the job at once)
    proc.kill()
    proc.wait(10)
    srv.kill()
    srv.start()
    uniques = admin_command(srv.host, srv.port, "show unique jobs")
    assert len(uniques) == 1 and uniques[0].startswith("slow-"), uniques
    assert queued(srv, "eg.slow") == 1  # only the job that was running comes back


def test_clear_while_workers_race_for_the_same_jobs_does_not_hang(gearmand_factory, make_config, workers):
    srv = gearmand_factory(queue="none")
    path, _ = make_config(srv)
    proc = workers(path, "racer", 4)
    wait_registered([srv], "racer", proc)
    submit_bg(srv, "eg.reverse", 3000, "race", data=b'"abc"')
    t0 = time.monotonic()
    (res,) = admin.Admin([(srv.host, srv.port)]).clear(["eg.reverse"])
    assert res.ok and time.monotonic() - t0 < 10
    assert res.value["cleared"]["eg.reverse"] <= 3000
    wait_until(lambda: queued(srv, "eg.reverse") == 0, 10, message="eg.reverse queue empty")
    assert proc.poll() is None


def test_jobs_stranded_by_drop_function_are_reported_and_cleared_after_restart(fresh_gearmand):
    """gearmand's `drop function` leaves its jobs in memory and in sqlite, out of any worker's reach."""
    srv = fresh_gearmand
    adm = admin.Admin([(srv.host, srv.port)])
    submit_bg(srv, "t.dropped", 12, "d")
    assert admin_command(srv.host, srv.port, "drop function t.dropped") == ["OK"]
    assert function_counts(srv, "t.dropped") is None
    assert len(admin_command(srv.host, srv.port, "show jobs")) == 12  # still there
    (res,) = adm.clear()
    assert res.ok and res.value == {"cleared": {}, "stranded": 12}
    srv.kill()
    srv.start()
    assert queued(srv, "t.dropped") == 12  # back under their function after the restart...
    (res,) = adm.clear()
    assert res.value == {"cleared": {"t.dropped": 12}, "stranded": 0}  # ...where clear reaches them
    srv.kill()
    srv.start()
    assert admin_command(srv.host, srv.port, "show jobs") == []


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_clear_asks_on_a_terminal_unless_yes(gearmand, make_config, fname):
    path, _ = make_config(gearmand)
    submit_bg(gearmand, fname, 5)
    out, err = io.StringIO(), io.StringIO()
    assert main(["clear", fname, "--config", str(path)], stdout=out, stderr=err, stdin=_Terminal("n\n")) == 1
    assert f"Remove the queued jobs of {fname} on {gearmand.address} ({fname} 5)?" in out.getvalue()
    assert "nothing cleared" in err.getvalue()
    assert queued(gearmand, fname) == 5
    out = io.StringIO()
    assert main(["clear", fname, "--config", str(path)], stdout=out, stderr=err, stdin=_Terminal("y\n")) == 0
    assert "5 queued jobs cleared" in out.getvalue() and queued(gearmand, fname) == 0


# -- shutdown ---------------------------------------------------------------------------------

def test_shutdown_by_name_stops_that_name_only(gearmand_factory, make_config, workers):
    s1, s2 = gearmand_factory(), gearmand_factory()
    path, _ = make_config([s1, s2])
    alpha1, alpha2, beta = workers(path, "alpha", 1), workers(path, "alpha", 1), workers(path, "beta", 1)
    for name, proc in (("alpha", alpha1), ("alpha", alpha2), ("beta", beta)):
        wait_registered([s1, s2], name, proc)

    r = manage("shutdown", "--name", "alpha", "--json", "--config", str(path))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert sorted((p["name"], p["pid"], p["outcome"]) for p in data["processes"]) == sorted(
        [("alpha", alpha1.pid, "stopped"), ("alpha", alpha2.pid, "stopped")])
    assert alpha1.wait(10) == 0 and alpha2.wait(10) == 0
    assert beta.poll() is None
    alive = admin.Admin([(s1.host, s1.port), (s2.host, s2.port)]).processes()
    assert {(p.name, p.pid) for p in alive} == {("beta", beta.pid)}
    # no control job is left behind in any queue
    for s in (s1, s2):
        for f in admin.server_status(s.host, s.port)["functions"]:
            assert f.total == 0, f

    # nothing matching is a failure (a typo must not look like success), and stops nothing
    r = manage("shutdown", "--name", "nobody", "--config", str(path))
    assert r.returncode == 1 and "no worker process matches --name nobody" in r.stderr
    r = manage("shutdown", "--host", "10.9.9.9", "--config", str(path))
    assert r.returncode == 1 and "no worker process matches --host 10.9.9.9" in r.stderr and beta.poll() is None
    r = manage("shutdown", "--host", "127.0.0.1", "--now", "--config", str(path))
    assert r.returncode == 0 and "stopped" in r.stdout
    assert beta.wait(10) == 0
    events = [json.loads(line) for line in (path.parent / "logs" / "manager.log").read_text().splitlines()]
    assert {e["worker"] for e in events if e["event"] == "shutdown"} == {
        f"alpha:127.0.0.1:{alpha1.pid}", f"alpha:127.0.0.1:{alpha2.pid}", f"beta:127.0.0.1:{beta.pid}"}


def test_shutdown_with_10000_jobs_queued_returns_within_2s(gearmand_factory, make_config, workers):
    srv = gearmand_factory(queue="none")  # sqlite takes ~1 ms per job to queue: 10 s of setup
    path, _ = make_config(srv)
    proc = workers(path, "loaded", 4)
    wait_registered([srv], "loaded", proc)
    submit_bg(srv, "t.nobody.serves", 10_000, "q")
    submit_bg(srv, "eg.reverse", 2_000, "r", data=b'"abc"')  # keeps the worker's threads busy
    assert queued(srv, "t.nobody.serves") == 10_000

    t0 = time.monotonic()
    report = admin.Admin([(srv.host, srv.port)]).shutdown(name="loaded", wait=10)
    elapsed = time.monotonic() - t0
    assert [(p.pid, p.outcome) for p in report.processes] == [(proc.pid, "stopped")]
    print(f"shutdown with 10,000 jobs queued: {elapsed:.3f}s")
    assert elapsed < 2.5, f"shutdown took {elapsed:.2f}s"
    assert proc.wait(10) == 0
    assert queued(srv, "t.nobody.serves") == 10_000


def test_shutdown_reports_a_process_that_does_not_stop(gearmand):
    """A process whose control function is registered but never takes its job: still running, exit 1."""
    conn = Connection(gearmand.host, gearmand.port).connect()
    fn = "geartask.control:deaf:127.0.0.9:4242"
    try:
        conn.send(CAN_DO, task=fn)
        conn.echo()
        t0 = time.monotonic()
        r = manage("shutdown", "--name", "deaf", "--wait", "0.5", "--servers", gearmand.address)
        assert r.returncode == 1 and "still running" in r.stdout
        assert time.monotonic() - t0 < 5
    finally:
        conn.close()
        admin.Admin([(gearmand.host, gearmand.port)]).clear([fn])


# -- jobs, cancel, maxqueue, version, ping -------------------------------------------------------

def test_jobs_and_cancel(fresh_gearmand, make_config):
    srv = fresh_gearmand
    path, _ = make_config(srv)
    handles = submit_bg(srv, "t.cancel", 3, "c")
    r = manage("jobs", "--json", "--config", str(path))
    assert r.returncode == 0, r.stderr
    (server,) = json.loads(r.stdout)["servers"]
    assert sorted(j["handle"] for j in server["value"]["jobs"]) == sorted(handles)
    assert {j["state"] for j in server["value"]["jobs"]} == {"queued"}
    assert sorted(server["value"]["unique_keys"]) == ["c-0", "c-1", "c-2"]

    # a worker takes one job: it can't be cancelled
    worker = Connection(srv.host, srv.port).connect()
    try:
        worker.send(CAN_DO, task="t.cancel")
        worker.send(GRAB_JOB_UNIQ)
        running = worker.expect(JOB_ASSIGN_UNIQ, 5).text("job_handle")
        r = manage("cancel", running, "--config", str(path))
        assert r.returncode == 1 and "running" in r.stdout
        waiting = [h for h in handles if h != running]
        r = manage("cancel", waiting[0], "--config", str(path))
        assert r.returncode == 0 and "cancelled" in r.stdout, r.stdout + r.stderr
        r = manage("cancel", waiting[0], "--config", str(path))
        assert r.returncode == 1 and "already cancelled" in r.stdout
        r = manage("jobs", "--config", str(path))
        assert r.returncode == 0 and "running" in r.stdout and "cancelled" in r.stdout
        r = manage("cancel", "H:nowhere:1", "--config", str(path))
        assert r.returncode == 1 and "unknown" in r.stdout
    finally:
        worker.close()
    srv.kill()
    srv.start()
    uniques = admin_command(srv.host, srv.port, "show unique jobs")
    assert len(uniques) == 2  # the cancelled one is gone from sqlite; the other two are back


def test_maxqueue_version_ping(gearmand, make_config, fname):
    path, _ = make_config(gearmand)
    # the function doesn't exist yet: gearmand would answer OK and keep no limit
    r = manage("maxqueue", fname, "2", "--config", str(path))
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr
    submit_bg(gearmand, fname, 2)
    conn = Connection(gearmand.host, gearmand.port).connect()
    try:  # the limit is real: the third job is refused
        conn.send(submit_command("normal", True), task=fname, unique="third", data=b"{}")
        with pytest.raises(ServerError, match="QUEUE_ERROR"):
            conn.expect(JOB_CREATED, 5)
    finally:
        conn.close()
    assert manage("maxqueue", fname, "0", "--config", str(path)).returncode == 0
    submit_bg(gearmand, fname, 1, "after")  # no limit any more
    for command, key in (("version", "1.1"), ("ping", gearmand.address)):
        r = manage(command, "--json", "--config", str(path))
        assert r.returncode == 0, r.stderr
        (res,) = json.loads(r.stdout)["servers"]
        assert res["ok"] and (key in str(res["value"]) or key == res["server"])


# -- server -----------------------------------------------------------------------------------

def test_server_start_status_stop(tmp_path, make_config):
    port = free_port()
    path, _ = make_config([f"127.0.0.1:{port}"],
                          f"server:\n  port: {port}\n  queue:\n    path: {tmp_path / 'q.sqlite'}\n"
                          "  keepalive: {idle: 9, interval: 3, count: 2}\n")
    try:
        r = manage("server", "start", "--config", str(path))
        assert r.returncode == 0 and f"127.0.0.1:{port}" in r.stdout, r.stderr
        r = manage("server", "status", "--json", "--config", str(path))
        assert r.returncode == 0 and json.loads(r.stdout)["running"] is True
        argv = Path(f"/proc/{json.loads(r.stdout)['pid']}/cmdline").read_bytes().decode().split("\0")
        i = argv.index("--keepalive")  # server.keepalive reaches gearmand
        assert argv[i:i + 7] == ["--keepalive", "--keepalive-idle", "9", "--keepalive-interval", "3",
                                 "--keepalive-count", "2"]
        assert manage("ping", "--config", str(path)).returncode == 0
    finally:
        r = manage("server", "stop", "--config", str(path))
    assert r.returncode == 0 and "stopped" in r.stdout
    r = manage("server", "status", "--config", str(path))
    assert r.returncode == 1 and "no" in r.stdout
    events = [json.loads(line) for line in (path.parent / "logs" / "manager.log").read_text().splitlines()]
    assert [e["event"] for e in events if e["event"].startswith("server")] == ["server start", "server stop"]


# -- command line -----------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    [], ["bogus"], ["status", "--watch", "0"], ["status", "--watch", "x"], ["maxqueue", "f", "-1"],
    ["cancel"], ["shutdown", "--wait", "-1"], ["server", "restart"], ["status", "--timeout", "0"],
    ["status", "--config", "/nonexistent/config.yaml"], ["status", "--servers", "host:notaport"],
])
def test_usage_errors_exit_2_without_traceback(args):
    r = manage(*args)
    assert r.returncode == 2, (args, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.strip()


def test_options_before_and_after_the_command(gearmand):
    for args in (["--json", "--servers", gearmand.address, "ping"], ["ping", "--json", "--servers", gearmand.address]):
        r = manage(*args)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["servers"][0]["server"] == gearmand.address


def test_runs_from_inside_its_folder(gearmand):
    r = subprocess.run([PYTHON, "manage_client.py", "version", "--servers", gearmand.address],
                       cwd=REPO / "manage_client", capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "1.1" in r.stdout, r.stderr


def test_watch_redraws_on_a_terminal_and_stops_cleanly_on_ctrl_c(gearmand, fname):
    submit_bg(gearmand, fname, 1)
    master, slave = pty.openpty()
    proc = subprocess.Popen([PYTHON, str(REPO / SCRIPT), "status", "--watch", "0.2", "--servers", gearmand.address],
                            stdin=slave, stdout=slave, stderr=slave, cwd=REPO)
    os.close(slave)
    output = b""
    try:
        deadline = time.monotonic() + 15
        while output.count(b"\x1b[H") < 3 and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    output += os.read(master, 65536)
                except OSError:
                    break
        assert output.count(b"\x1b[H") >= 3, output[-500:]
        assert fname.encode() in output and b"Ctrl-C to stop" in output
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        while True:  # drain what it wrote on its way out
            ready, _, _ = select.select([master], [], [], 0.2)
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        assert b"Traceback" not in output and b"KeyboardInterrupt" not in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        os.close(master)


def test_watch_json_without_terminal_prints_one_document_per_refresh(gearmand):
    proc = subprocess.Popen([PYTHON, str(REPO / SCRIPT), "workers", "--watch", "0.1", "--json",
                             "--servers", gearmand.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
        assert all(json.loads(line)["servers"][0]["reachable"] for line in lines)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


# -- silent workers, addresses, and every admin path through a slicing proxy (issue 10) ----------

from fakeworker import FakeControlWorker  # noqa: E402
from netproxy import SliceProxy  # noqa: E402


def _addr(server) -> tuple[str, int]:
    return (server.host, server.port)


def test_workers_marks_a_process_that_does_not_answer_its_ping_as_silent(gearmand_factory):
    """A process whose host is cut off keeps its connections listed; the ping tells it apart."""
    s1, s2 = gearmand_factory(queue="none"), gearmand_factory(queue="none")
    alive = FakeControlWorker([_addr(s1), _addr(s2)], "alive", 1001)
    frozen = FakeControlWorker([_addr(s1), _addr(s2)], "frozen", 1002, answer=False)
    try:
        servers = f"{s1.address},{s2.address}"
        t0 = time.monotonic()
        r = manage("workers", "--json", "--timeout", "1", "--servers", servers)
        elapsed = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        silent = {(c["name"], s["server"]): c["silent"] for s in data["servers"] for c in s["connections"]
                  if c["name"] in ("alive", "frozen")}
        assert silent == {("alive", s1.address): False, ("alive", s2.address): False,
                          ("frozen", s1.address): True, ("frozen", s2.address): True}
        procs = {p["name"]: p for p in data["processes"]}
        assert procs["frozen"]["silent_on"] == [s1.address, s2.address] and procs["alive"]["silent_on"] == []
        assert elapsed < 8, f"the ping's deadline did not hold: {elapsed:.1f}s"
        assert [c["command"] for _, c in alive.received] == ["ping", "ping"]  # one per server
        # an unanswered ping stays, marked ignored (never handed out); the next one joins it
        assert manage("workers", "--json", "--timeout", "0.5", "--servers", servers).returncode == 0
        for s in (s1, s2):
            assert function_counts(s, frozen.control_function())[0] == 1
            (job,) = admin.server_jobs(s.host, s.port)["jobs"]
            assert job["cancelled"]

        r = manage("workers", "--timeout", "1", "--servers", servers)
        assert r.returncode == 0
        rows = {ln.split()[1]: ln.split() for ln in r.stdout.splitlines() if ln.split()[1:2] in (["alive"], ["frozen"])}
        assert rows["alive"][6] == "no" and rows["frozen"][6] == "yes"  # the SILENT column
    finally:
        alive.close()
        frozen.close()


def test_ping_workers_is_a_library_call_with_each_reply(gearmand):
    worker = FakeControlWorker([_addr(gearmand)], "lib", 2001)
    try:
        (res,) = admin.Admin([_addr(gearmand)], timeout=2).ping_workers()
        assert res.ok
        (ping,) = [p for p in res.value if p.name == "lib"]
        assert ping.answered and ping.pid == 2001 and ping.ip == "127.0.0.1" and ping.seconds < 2
        assert ping.reply["command"] == "ping" and ping.reply["pid"] == 2001
    finally:
        worker.close()


def test_workers_pings_real_worker_processes_which_keep_running(gearmand, make_config, workers):
    path, _ = make_config(gearmand)
    proc = workers(path, "real", 1)
    wait_registered([gearmand], "real", proc)
    (res,) = admin.Admin([_addr(gearmand)], timeout=3).ping_workers()
    (ping,) = [p for p in res.value if p.pid == proc.pid]
    assert ping.answered and ping.reply["pid"] == proc.pid
    r = manage("workers", "--json", "--config", str(path))
    conns = [c for s in json.loads(r.stdout)["servers"] for c in s["connections"] if c["pid"] == proc.pid]
    assert conns and all(c["silent"] is False for c in conns)
    assert proc.poll() is None


def test_a_process_seen_at_two_addresses_is_one_process_and_shutdown_host_matches_either(gearmand_factory):
    """Each server sees the process at the address it connected from (127.0.0.2 and 127.0.0.3)."""
    s1, s2 = gearmand_factory(queue="none"), gearmand_factory(queue="none")
    servers = f"{s1.address},{s2.address}"
    for host in ("127.0.0.3", "127.0.0.2"):
        w = FakeControlWorker([_addr(s1), _addr(s2)], "multi", 3001, source_ips=["127.0.0.2", "127.0.0.3"])
        try:
            r = manage("workers", "--json", "--no-ping", "--servers", servers)
            (proc,) = [p for p in json.loads(r.stdout)["processes"] if p["name"] == "multi"]
            assert proc["ips"] == ["127.0.0.2", "127.0.0.3"] and proc["servers"] == [s1.address, s2.address]

            r = manage("shutdown", "--host", host, "--json", "--wait", "5", "--servers", servers)
            assert r.returncode == 0, r.stdout + r.stderr
            (p,) = json.loads(r.stdout)["processes"]
            assert (p["name"], p["pid"], p["outcome"], p["ip"]) == ("multi", 3001, "stopped", host)
            assert p["sent_to"] == (s2.address if host == "127.0.0.3" else s1.address)  # where it is that address
            assert [c["command"] for _, c in w.received] == ["shutdown"]  # one job, never two
            for s in (s1, s2):  # and nothing left queued to outlive the process
                assert all(f.total == 0 for f in admin.server_status(s.host, s.port)["functions"])
        finally:
            w.close()


def test_status_workers_jobs_and_clear_answer_the_same_through_a_slicing_proxy(fresh_gearmand, fname):
    """Every admin path reads its replies correctly however the stream is cut (1-48-byte slices)."""
    srv = fresh_gearmand
    submit_bg(srv, fname + ".a", 150, "a")
    submit_bg(srv, fname + ".b", 150, "b")
    many = [f"{fname}.fn{i:03d}" for i in range(150)]  # a long 'workers' line
    worker = FakeControlWorker([_addr(srv)], "sliced", 4001, extra_functions=many)
    proxy = SliceProxy(_addr(srv), seed=11).start()
    try:
        direct = admin.Admin([_addr(srv)], timeout=10)
        sliced = admin.Admin([(proxy.host, proxy.port)], timeout=10)

        def status(adm):
            (r,) = adm.status()
            assert r.ok, r.error
            return sorted((f.function, f.queued, f.running, f.workers) for f in r.value["functions"])

        def listing(adm):
            (r,) = adm.workers(ping=True)
            assert r.ok, r.error
            return sorted((w.client_id, tuple(sorted(w.functions)), w.silent) for w in r.value if w.functions)

        def jobs(adm):
            (r,) = adm.jobs()
            assert r.ok, r.error
            return sorted((j["handle"], j["state"]) for j in r.value["jobs"]), sorted(r.value["unique_keys"])

        assert status(sliced) == status(direct)
        assert listing(sliced) == listing(direct)
        assert ("sliced:127.0.0.1:4001:0", tuple(sorted([worker.control_function()] + many)), False) in listing(direct)
        assert jobs(sliced) == jobs(direct) and len(jobs(direct)[0]) == 300
        (a,) = sliced.clear([fname + ".a"])
        (b,) = direct.clear([fname + ".b"])
        assert a.ok and b.ok, (a.error, b.error)
        assert a.value == {"cleared": {fname + ".a": 150}, "stranded": 0}
        assert b.value == {"cleared": {fname + ".b": 150}, "stranded": 0}
        assert queued(srv, fname + ".a") == 0 and queued(srv, fname + ".b") == 0
        assert proxy.slices > 1000  # the replies really came in pieces
    finally:
        proxy.stop()
        worker.close()


def test_workers_reply_with_a_closing_connection_is_read():
    """gearmand lists a connection it is closing with file descriptor -1 (seen under load):
    that is a gearmand reply, not a sign of a foreign peer."""
    (w,) = admin.parse_workers(["-1 127.0.0.1 - :"])
    assert (w.fd, w.ip, w.client_id, w.functions) == (-1, "127.0.0.1", "-", [])
    with pytest.raises(ServerError):
        admin.parse_workers(["-2 127.0.0.1 - :"])
