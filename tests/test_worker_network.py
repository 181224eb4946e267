"""The worker on networks that are not a quiet loopback: sliced streams, cuts, several addresses.

tests/netproxy.py's SliceProxy sits between a worker and gearmand: it delivers the stream
in random 1-48-byte slices, and can cut the link silently (bytes held, nothing closed) and
restore it. The address tests run in a network namespace the test makes for itself.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


import gearclient as gc
from geartask.control import ping_request
from geartask.server import LocalServer, free_port
from helpers import REPO, missing_in_this_environment, wait_until, write_config
from netproxy import SliceProxy
from test_worker import start_worker, wait_running  # noqa: F401 (start_worker: a fixture)
from workers import WorkerProc, in_process_worker, worker_connections


def runs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def events(w, name: str) -> list[dict]:
    return [e for e in w.log_lines() if e.get("event", "").startswith(name)]


def test_5000_jobs_through_the_slicing_proxy_each_run_once(gearmand_factory, start_worker, tmp_path):
    """Every packet the worker reads arrives in pieces; 5,000 foreground jobs all complete, none twice."""
    server = gearmand_factory(queue="none")
    with SliceProxy(server.address) as proxy:
        start_worker(proxy.address, name="sliced", threads=4, wait=False).wait_attached([server.address])
        rec = tmp_path / "runs.jsonl"
        outs = gc.run(server.address, "t.record", [{"file": str(rec), "id": i} for i in range(5000)], timeout=300)
        assert all(o.state == "complete" for o in outs)
        done = runs(rec)
        assert len(done) == 5000 and len({r["unique"] for r in done}) == 5000
        assert proxy.connections == 5 and proxy.slices > 5000 * 4  # no reconnection; really sliced


def test_a_result_finished_during_a_cut_is_delivered_after_it(fresh_gearmand, start_worker, tmp_path):
    """The link to the server is cut silently while a job runs; the job finishes during the cut,
    its result waits in the connection (not dropped with it 5 s later, as before), and the
    client has it once the link is back, ~10 s later. The job ran once; nothing reconnected."""
    with SliceProxy(fresh_gearmand.address) as proxy:
        w = start_worker(proxy.address, name="cut", threads=1, wait=False).wait_attached([fresh_gearmand.address])
        connections = proxy.connections
        rec = tmp_path / "runs.jsonl"
        conn = gc.connect(fresh_gearmand.address)
        started = tmp_path / "started"
        [h] = gc.submit(conn, "t.record", [{"file": str(rec), "sleep": 1.0, "id": "during-cut",
                                            "started": str(started)}])
        # The worker has the job (gearmand's "running" may precede the assignment's delivery).
        wait_until(started.exists, 10, message="the worker starting the job")
        proxy.cut()
        cut_at = time.monotonic()
        wait_until(lambda: runs(rec), 10, message="the job finished during the cut")
        # The GRAB sent with the result goes unanswered: the link is late, and kept.
        wait_until(lambda: events(w, "server slow to answer") or events(w, "server unreachable"), 15,
                   message="the worker noticing the silence")
        assert not events(w, "server unreachable")
        time.sleep(max(0.0, 10 - (time.monotonic() - cut_at)))  # a 10-second outage is the point
        proxy.restore()
        out = gc.wait(conn, [h], 30)[h]
        assert out.state == "complete" and out.result == {"id": "during-cut", "pid": w.pid}
        assert len(runs(rec)) == 1
        assert gc.run_one(fresh_gearmand.address, "eg.reverse", "ab", timeout=20).result == {"reversed": "ba"}
        assert proxy.connections == connections
        conn.close()


def test_a_late_server_does_not_hold_up_the_others_and_its_late_job_is_served(gearmand_factory, start_worker,
                                                                              tmp_path):
    """One thread, two servers, one of them cut off: the thread serves the other server while
    its GRAB to the cut one is late, and when the cut one answers at last with a job, that job
    is served too (gearmand thinks it assigned it)."""
    a, b = gearmand_factory(queue="none"), gearmand_factory(queue="none")
    with SliceProxy(a.address) as proxy:
        w = start_worker([proxy.address, b.address], name="late", threads=1, wait=False)
        w.wait_attached([a.address, b.address])
        connections = proxy.connections
        proxy.cut()
        wait_until(lambda: events(w, "server slow to answer"), 20, message="the GRAB to the cut server late")
        conn_a = gc.connect(a.address)
        [ha] = gc.submit(conn_a, "eg.reverse", ["from-a"])
        for i in range(5):
            t0 = time.monotonic()
            assert gc.run_one(b.address, "eg.reverse", f"b{i}", timeout=10).state == "complete"
            assert time.monotonic() - t0 < 5
        proxy.restore()
        assert gc.wait(conn_a, [ha], 20)[ha].result == {"reversed": "a-morf"}
        assert proxy.connections == connections
        wait_until(lambda: events(w, "server reachable again"), 10, message="the late server logged back")
        conn_a.close()


def test_worker_sockets_have_keepalive_and_a_user_timeout(gearmand, make_config):
    """worker.keepalive 20: idle 10 s, then 3 probes 3 s apart; unacknowledged data waits 20 s."""
    _, config = make_config(gearmand, "worker:\n  keepalive: 20\n")
    with in_process_worker(config, gearmand.address, "ka", 2) as process:
        for t in [*process.job_threads, process.control]:
            sock = t.links[0].conn.sock
            opts = {name: sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name))
                    for name in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT", "TCP_USER_TIMEOUT")}
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert opts == {"TCP_KEEPIDLE": 10, "TCP_KEEPINTVL": 3, "TCP_KEEPCNT": 3, "TCP_USER_TIMEOUT": 20_000}


def test_ping_through_the_slicing_proxy_lists_the_running_jobs(gearmand, start_worker, tmp_path):
    """A ping control job is answered at once, even with every job thread busy, with what the
    process runs now; through a sliced link too."""
    with SliceProxy(gearmand.address) as proxy:
        w = start_worker(proxy.address, name="pinged", threads=1, wait=False).wait_attached([gearmand.address])
        control = [l.split()[-1] for l in worker_connections(gearmand.address) if f":{w.pid}:0 " in l][0]
        conn = gc.connect(gearmand.address)
        [h] = gc.submit(conn, "t.record", [{"file": str(tmp_path / "r.jsonl"), "sleep": 3, "id": "busy"}],
                        uniques=["the-busy-one"])
        wait_running(gearmand, "t.record")
        # gearmand counts the job running once it sends JOB_ASSIGN; through the sliced link the
        # worker may not have it whole yet: ask until the thread has begun it (each answer at once)

        def ping() -> dict:
            t0 = time.monotonic()
            answer = gc.run_one(gearmand.address, control, ping_request(), timeout=10).result
            assert time.monotonic() - t0 < 2
            return answer
        reply = wait_until(lambda: (r := ping())["busy"] == 1 and r, 10, message="the job begun in the worker")
        assert reply["ok"] is True and reply["command"] == "ping" and reply["pid"] == w.pid
        assert reply["name"] == "pinged" and reply["ips"] == ["127.0.0.1"] and reply["threads"] == 1
        assert reply["worker"] == f"pinged:127.0.0.1:{w.pid}" and reply["busy"] == 1
        assert reply["started"] <= time.time() and reply["jobs_done"] == 0
        [job] = reply["running"]
        assert job["handle"] == h and job["task"] == "t.record" and job["unique"] == "the-busy-one"
        assert job["server"] == proxy.address and 0 <= job["seconds"] < 3
        assert gc.wait(conn, [h], 15)[h].state == "complete"
        conn.close()


# -- several addresses: in a network namespace of the test's own ---------------------------
def _can_unshare() -> str | None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip (util-linux, iproute2)"
    r = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    return None if r.returncode == 0 else f"cannot make a network namespace: {r.stderr.strip()}"


def two_addresses_scenario(work: Path) -> dict:
    """Runs inside a fresh network namespace: lo with 127.0.0.1 and 127.0.0.2 as addresses of
    their own (so each is its own source address), a gearmand on each, one worker on both."""
    for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", "127.0.0.2/32", "dev", "lo"]):
        subprocess.run(cmd, check=True)
    servers = [LocalServer(host=h, port=free_port(h), run_dir=work / f"gearmand-{h}", queue_type="none",
                           queue_path=work / "unused.sqlite") for h in ("127.0.0.1", "127.0.0.2")]
    for s in servers:
        s.start()
    try:
        cfg = write_config(work / "w.yaml", [s.address for s in servers], "worker:\n  poll_timeout: 1\n")
        w = WorkerProc(cfg, "twoip", 2)
        try:
            w.wait_attached([s.address for s in servers])
            out: dict = {"pid": w.pid, "servers": {}}
            for s in servers:
                rows = [l for l in worker_connections(s.address) if " twoip:" in l]
                control = [l.split()[-1] for l in rows if l.split()[2].endswith(":0")][0]
                out["servers"][s.host] = {"rows": rows, "control": control}
            for s in servers:
                seen = out["servers"][s.host]
                try:
                    seen["ping"] = gc.run_one(s.address, seen["control"], ping_request(), timeout=10).result
                except AssertionError as e:
                    seen["ping"] = {"error": str(e)}
            return out
        finally:
            w.stop()
    finally:
        for s in servers:
            s.stop()


def test_each_server_sees_the_workers_own_address(tmp_path):
    """A host with two addresses, a server on each: every client id and control function names
    the address that server sees the connection come from (before: one address for all)."""
    reason = _can_unshare()
    if reason:
        missing_in_this_environment(reason)
    result = tmp_path / "result.json"
    code = ("import json, sys; from pathlib import Path; import test_worker_network as t; "
            f"Path({str(result)!r}).write_text(json.dumps(t.two_addresses_scenario(Path({str(tmp_path)!r}))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    r = subprocess.run(["unshare", "--net", sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(result.read_text())
    pid = out["pid"]
    for host, seen in out["servers"].items():
        assert len(seen["rows"]) == 3  # 2 job threads and the control thread
        for row in seen["rows"]:
            fd, peer, client_id = row.split()[:3]
            assert peer == host and client_id.split(":")[1] == host
        assert seen["control"] == f"geartask.control:twoip:{host}:{pid}"
    for _host, seen in out["servers"].items():  # the ping through each server's own control function
        assert seen["ping"]["ips"] == ["127.0.0.1", "127.0.0.2"]
        assert seen["ping"]["worker"] == f"twoip:127.0.0.1,127.0.0.2:{pid}"
