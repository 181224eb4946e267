"""`fleet: NAME` keeps fleets apart on shared job servers (issue 22): carried in every worker's
client id and ping, filtered on by manage workers/status/shutdown and the dashboard's snapshot;
a worker that finds another fleet on its servers warns."""

from __future__ import annotations

import json
import subprocess

import pytest

from geartask.config import load_config
from geartask.control import WorkerIdentity, parse_client_id
from geartask.fleet import Admin
from helpers import PYTHON, REPO, wait_until, write_config
from workers import WorkerProc


def test_client_ids_carry_the_fleet_and_old_ones_still_parse():
    assert parse_client_id("w1:10.0.0.5:1234:3") == WorkerIdentity("w1", "10.0.0.5", 1234, 3, "")
    ident = WorkerIdentity("w1", "10.0.0.5", 1234, fleet="blue").for_thread(2).at("10.0.0.6")
    assert ident.client_id == "w1:10.0.0.6:1234:2:blue"
    assert parse_client_id(ident.client_id) == ident
    assert WorkerIdentity("w1", "10.0.0.5", 1234, 0).client_id == "w1:10.0.0.5:1234:0"  # no fleet: as before
    for bad in ("w1:10.0.0.5:1234:3:", "w1:10.0.0.5:1234:3:\x1b[2J", "w1:fe80::1:1234:3", "w1:1.2.3.4:x:3:blue"):
        assert parse_client_id(bad) is None, bad


def test_a_bad_fleet_name_is_a_config_error(tmp_path):
    path = write_config(tmp_path / "config.yaml", ["127.0.0.1:4730"], "fleet: 'blue green'\n")
    r = subprocess.run([PYTHON, "-m", "geartask", "manage", "workers", "--config", str(path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "fleet" in r.stderr and "Traceback" not in r.stderr, r.stderr


def manage(config, *args):
    return subprocess.run([PYTHON, "-m", "geartask", "manage", "--config", str(config), *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO)


@pytest.fixture
def two_fleets(fresh_gearmand, tmp_path):
    started = []
    configs = {f: write_config(tmp_path / f / "config.yaml", [fresh_gearmand.address],
                               f"fleet: {f}\noutcomes:\n  report: false\n") for f in ("blue", "green")}

    def start(fleet):
        w = WorkerProc(configs[fleet], "w1", 2)  # the same name in both fleets
        started.append(w)
        return w.wait_attached([fresh_gearmand.address])
    yield configs, start
    for w in started:
        w.stop()


def test_workers_status_snapshot_and_shutdown_see_only_their_fleet(fresh_gearmand, two_fleets):
    configs, start = two_fleets
    blue = start("blue")
    green = start("green")

    # the later worker says at start that another fleet is on its server
    wait_until(lambda: "another fleet's workers on this server" in green.output.read_text(), 15,
               message="green's warning")
    warning = [x for x in green.output.read_text().splitlines() if "another fleet" in x][0]
    assert "blue" in warning and fresh_gearmand.address in warning

    r = manage(configs["blue"], "workers", "--json", "--no-ping")
    pids = {p["pid"] for p in json.loads(r.stdout)["processes"]}
    assert pids == {blue.pid}, r.stdout
    r = manage(configs["blue"], "workers", "--json", "--no-ping", "--any-fleet")
    assert {p["pid"] for p in json.loads(r.stdout)["processes"]} == {blue.pid, green.pid}

    def workers_of(config, *extra):
        data = json.loads(manage(config, "status", "--json", *extra).stdout)
        return {f["function"]: f["workers"] for s in data["servers"] for f in s["functions"]}
    assert workers_of(configs["blue"])["eg.reverse"] == 2  # blue's two job threads
    assert workers_of(configs["blue"], "--any-fleet")["eg.reverse"] == 4

    (snap,) = Admin.from_config(load_config(configs["green"])).snapshot(ping=True)
    assert {c.pid for c in snap.value["connections"] if c.name} == {green.pid}
    assert {p.pid for p in snap.value["pings"]} == {green.pid}
    assert all(p.reply["fleet"] == "green" for p in snap.value["pings"])

    # shutdown without a filter stops only this fleet's workers
    r = manage(configs["green"], "shutdown", "--yes")
    assert r.returncode == 0, r.stderr
    assert green.wait(15) == 0
    assert blue.proc.poll() is None


def test_workers_text_has_a_fleet_column_only_when_a_worker_names_one():
    from geartask.admin.cli import workers_text

    def conn(name, pid, fleet):
        return {"client_id": f"{name}:10.0.0.5:{pid}:0", "name": name, "worker_ip": "10.0.0.5", "pid": pid,
                "thread": 0, "ip": "10.0.0.5", "silent": False, "functions": ["eg.reverse"], "fleet": fleet}
    procs = [{"name": "w1", "pid": 7, "ips": ["10.0.0.5"], "servers": ["a:1"], "connections": 1, "silent_on": [],
              "fleet": "blue"}]
    down = {"server": "b:2", "reachable": False, "error": "connection refused", "connections": []}
    text = workers_text({"servers": [{"server": "a:1", "reachable": True, "connections": [conn("w1", 7, "blue")]},
                                     down], "processes": procs})
    head, _rule, row, unreachable = text.splitlines()[:4]
    assert head.split()[:3] == ["SERVER", "NAME", "FLEET"] and row.split()[:3] == ["a:1", "w1", "blue"]
    assert "connection refused" in unreachable
    procs_table = text.split("PROCESS")[1]
    assert procs_table.split()[:2] == ["PID", "FLEET"] and "blue" in procs_table
    plain = workers_text({"servers": [{"server": "a:1", "reachable": True, "connections": [conn("w1", 7, "")]}],
                          "processes": [{**procs[0], "fleet": ""}]})
    assert "FLEET" not in plain  # fleets not in use: the table as before


def test_the_dashboard_shows_its_fleet_and_its_workers_fleet(fresh_gearmand, two_fleets):
    from dashboards import DashboardProc
    configs, start = two_fleets
    blue = start("blue")
    start("green")
    d = DashboardProc(configs["blue"], refresh=0.5)
    try:
        d.wait_ready()
        wait_until(lambda: d.get_json("/")["fleets"]["seen"] == ["blue"], 15, message="blue's worker seen")
        assert d.get_json("/")["fleets"]["filter"] == "blue"
        (host,) = d.get_json("/workers")["hosts"]
        assert [(p["pid"], p["fleet"]) for p in host["processes"]] == [(blue.pid, "blue")]
        assert '<span class="badge fleet" id="fleet">blue</span>' in d.get("/").text
        (host,) = d.get_json("/")["hosts"]  # by name too (worker.host: this machine's name by default)
        assert host["host"] == "127.0.0.1" and host["names"] and all(host["names"])
        assert f'{host["names"][0]} <span class="dim">127.0.0.1</span>' in d.get("/").text
    finally:
        d.stop()
