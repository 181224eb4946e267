"""IPv6 hosts are first-class: gearmand on an IPv6 address with real workers, once on [::1] and
once on a namespace network of ULA addresses (fd00:77::/64), each checked the same way:

- `manage workers` shows each connection's worker IP and PID (from the bracketed client id);
- `manage shutdown --host` (bare and bracketed) and `--name` find the process; `manage stop` finds its job;
- handles are printed HANDLE@[v6]:PORT, and `send status` answers that spelling;
- the dashboard counts the worker and names it on its Jobs page.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from geartask.address import format_address, format_host, split_address
from geartask.errors import LocalServerError
from geartask.fleet import Admin
from geartask.server import LocalServer, free_port

from dashboards import DashboardProc
from helpers import REPO, wait_until, write_config
from workers import WorkerProc

SENDER = REPO / "send_job_client" / "send_job_client.py"
MANAGER = REPO / "manage_client" / "manage_client.py"
SHELL_OK = "worker:\n  shell: {allow: [sleep]}\n"


@dataclass
class Site:
    """Where a scenario runs: the server's address and how to run each role there."""
    ip: str  # the workers' address, as their client ids carry it
    address: str  # the server, [v6]:port
    config: Path
    run: Callable[..., subprocess.CompletedProcess]  # (script, *args) -> finished process
    worker: Callable[[str], WorkerProc]  # (name) -> a started worker, attached
    get_json: Callable[[str], dict]  # dashboard page as JSON
    observe: Callable = lambda fn, *args: fn(*args)  # fn(*args) run where the test sees the server from


def _json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    return json.loads(proc.stdout)


def _running_on_worker(site: Site, handle: str) -> bool:
    """The worker itself runs ``handle`` (gearmand says running at JOB_ASSIGN, before that)."""
    def ask():
        pings = Admin([split_address(site.address)], 5).ping_workers()
        return [job.get("handle") for r in pings if r.ok for p in r.value for job in (p.reply or {}).get("running", [])]
    return handle in site.observe(ask)


def scenario(site: Site) -> None:
    w = site.worker("v6a")
    # manage workers: IP and PID from the client id, the peer column never garbage
    listing = _json(site.run(MANAGER, "--json", "workers"))
    conns = [c for s in listing["servers"] for c in s["connections"] if c["name"] == "v6a"]
    assert len(conns) == w.threads + 1
    assert {(c["worker_ip"], c["pid"]) for c in conns} == {(site.ip, w.pid)}
    assert all(c["client_id"].startswith(f"v6a:{format_host(site.ip)}:{w.pid}:") for c in conns)
    assert all(c["ip"] in (site.ip, "-") for c in conns), conns  # gearmand 1.1 garbles IPv6 peers: '-'
    table = site.run(MANAGER, "workers").stdout
    row = next(line for line in table.splitlines() if " v6a " in line)
    assert f" {site.ip} " in row and f" {w.pid} " in row, table

    # a background job: its handle is printed bracketed, and that spelling answers
    sent = site.run(SENDER, "shell", "--background", "--json", "--", "sleep", "60")
    rec = json.loads(sent.stdout.splitlines()[0])
    assert rec["server"] == site.address
    handle = rec["handle"]
    text = site.run(SENDER, "status").stdout
    assert f"{handle}@{site.address}" in text, text
    wait_until(lambda: _running_on_worker(site, handle), 20, 0.2, message="the worker runs the job")
    status = site.run(SENDER, "status", f"{handle}@{site.address}")
    assert status.stdout.startswith("running "), status.stdout + status.stderr

    # the dashboard counts the worker while it runs the job, and the Jobs page names it
    def counted():
        totals = site.get_json("/")["totals"]
        return totals["workers"] == 1 and totals["running"] >= 1
    wait_until(counted, 20, 0.3, message="the dashboard counts the IPv6 worker")
    assert [h["host"] for h in site.get_json("/")["hosts"]] == [site.ip]
    jobs = [j for s in site.get_json("/jobs")["servers"] for j in s["jobs"] if j["handle"] == handle]
    assert jobs and jobs[0]["worker"] == f"v6a:{format_host(site.ip)}:{w.pid}", jobs

    # stop finds the worker that runs it
    stop = _json(site.run(MANAGER, "--json", "stop", handle))
    assert [j["outcome"] for j in stop["jobs"]] == ["stopped"], stop

    # shutdown --host, bracketed, with --name: the one process, through its own control function
    shut = _json(site.run(MANAGER, "--json", "shutdown", "--host", format_host(site.ip), "--name", "v6a",
                          "--wait", "20"))
    assert [(p["name"], p["pid"], p["outcome"]) for p in shut["processes"]] == [("v6a", w.pid, "stopped")], shut
    assert w.wait(20) == 0

    # shutdown --host with the bare address
    w2 = site.worker("v6b")
    shut = _json(site.run(MANAGER, "--json", "shutdown", "--host", site.ip, "--wait", "20"))
    assert [(p["name"], p["pid"], p["outcome"]) for p in shut["processes"]] == [("v6b", w2.pid, "stopped")], shut
    assert w2.wait(20) == 0


# -- [::1] on this machine --------------------------------------------------------------------

def _ipv6_loopback_server(base: Path) -> LocalServer:
    for attempt in range(3):
        port = free_port("::1")
        run_dir = base / f"gearmand6-{port}"
        server = LocalServer(host="::1", port=port, run_dir=run_dir, queue_type="sqlite",
                             queue_path=run_dir / "queue.sqlite")
        try:
            server.start()
            return server
        except LocalServerError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def test_ipv6_loopback(tmp_path):
    server = _ipv6_loopback_server(tmp_path)
    workers: list[WorkerProc] = []
    dash: list[DashboardProc] = []
    try:
        assert server.address.startswith("[::1]:")
        config = write_config(tmp_path / "config.yaml", [server.address], SHELL_OK)

        def run(script, *args):
            return subprocess.run([sys.executable, str(script), "--config", str(config), *args],
                                  capture_output=True, text=True, timeout=90, cwd=tmp_path)

        def worker(name):
            workers.append(WorkerProc(config, name, 2).wait_attached([server.address]))
            return workers[-1]

        def get_json(path):
            if not dash:
                dash.append(DashboardProc(config, refresh=0.3, host="::1").wait_ready())
            return dash[0].get_json(path)

        scenario(Site("::1", server.address, config, run, worker, get_json))
    finally:
        for d in dash:
            d.stop()
        for w in workers:
            w.stop()
        server.stop(timeout=5)


# -- a namespace network of IPv6 hosts --------------------------------------------------------

@pytest.fixture
def netlab6(tmp_path):
    import netlab as lab_module
    with lab_module.open_lab(tmp_path, ipv6=True) as lab:
        yield lab


def test_ipv6_namespace_network(netlab6):
    """gearmand on one host, workers on another, the roles on a third: all by fd00:77:: addresses."""
    lab = netlab6
    gear, box, ops = lab.add_host("gear"), lab.add_host("box"), lab.add_host("ops")
    assert ":" in gear.ip and ":" in box.ip
    server = lab.gearmand(gear)
    assert server.address == f"[{gear.ip}]:4730"
    config = lab.config("v6", [server.address], SHELL_OK)
    token = "t0ken-for-the-ipv6-lab"
    dash_port = 8470
    dash: list = []

    def run(script, *args):
        proc = lab.run(ops, script, config, *args, label="role")
        code = proc.wait(90)
        return subprocess.CompletedProcess(proc.proc.args, code, proc.stdout, proc.stderr)

    def worker(name):
        return lab.worker(box, config, name, 2).wait_attached([server.address])

    def fetch(path):
        url = f"http://{format_address(ops.ip, dash_port)}{path}{'&' if '?' in path else '?'}format=json"
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=15) as r:
            return json.loads(r.read())

    def get_json(path):
        if not dash:
            dash.append(lab.run(ops, MANAGER, config, "dashboard", "--listen", format_address(ops.ip, dash_port),
                                "--token", token, "--refresh", "0.3", label="dashboard"))

            def ready():
                assert dash[0].proc.poll() is None, dash[0].stderr[-2000:]
                try:
                    return lab.observe(fetch, "/") is not None
                except OSError:
                    return False
            wait_until(ready, 30, 0.2, message="the dashboard answers on its IPv6 address")
        return lab.observe(fetch, path)

    scenario(Site(box.ip, server.address, config, run, worker, get_json, lab.observe))
