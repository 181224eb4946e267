"""Fleet commands (issue 23) on a test network: three worker hosts in namespaces, two labelled
db, one job server, the sender on a host of its own. Real gearmand, real workers, the real
`send` command.

Each worker runs its shell commands in its own folder (the shell task's default cwd), so a
command that touches a file there shows on which host it ran.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

import netlab as nl
from geartask.address import format_address
from geartask.trust.keys import new_key
from helpers import wait_until


# Issue 23 Must 7: the same tests on an IPv6 network (hosts in fd00:77::/64, servers named
# [v6]:4730). @BOTH marks the representative ones (targeting, a killed host, rolling batches,
# --follow, background per host with a collector, signed `may`, the Workers listing); the rest
# (usage refusals, plugin labels, a second killed-host case) is address-blind and runs on IPv4.
BOTH = pytest.mark.parametrize("netlab", ["ipv4", "ipv6"], indirect=True)

HOSTS = {"a": ("db1.test", ["db"]), "b": ("db2.test", ["db"]), "c": ("web1.test", [])}
HOSTS_BY_NAME = [host for host, _ in HOSTS.values()]


class Fleet:
    def __init__(self, lab: nl.NetLab, security: dict | None = None):
        self.lab = lab
        self.srv = lab.add_host("srv")
        lab.gearmand(self.srv)
        self.address = format_address(self.srv.ip, 4730)  # [fd00:77::a]:4730 on an IPv6 lab
        self.ctl = lab.add_host("ctl")
        self.workers: dict[str, nl.NetWorker] = {}
        self.hosts: dict[str, nl.Host] = {}
        self.folders: dict[str, Path] = {}
        for ns_name, (host, labels) in HOSTS.items():
            h = self.hosts[host] = lab.add_host(ns_name)
            extra = (f"worker:\n  host: {host}\n  labels: {json.dumps(labels)}\n  poll_timeout: 1\n  retries: 0\n"
                     "  shell:\n    allow: [hostname, sh, sleep, touch]\n" + (security or {}).get("worker", ""))
            config = lab.config(f"w-{ns_name}", [self.address], extra)
            self.folders[host] = config.parent
            self.workers[host] = lab.worker(h, config, f"w{ns_name}", 2).wait_attached([self.address])
        self.sender_config = lab.config("sender", [self.address], (security or {}).get("sender", ""))

    def send(self, *args: str, timeout: float = 90) -> tuple[int, str, str, float]:
        t0 = time.monotonic()
        proc = self.lab.sender(self.ctl, self.sender_config, *args)
        code = proc.wait(timeout)
        return code, proc.stdout, proc.stderr, time.monotonic() - t0

    def ran(self, host: str, marker: str) -> bool:
        return (self.folders[host] / marker).exists()


def table(stdout: str) -> dict[str, list[str]]:
    """HOST -> the row's cells (STATE may be two words), from the sender's table."""
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.split()[:2] == ["HOST", "STATE"])
    rows = {}
    for line in lines[head + 1:]:
        if " host(s): " in line:
            break
        cells = line.split()
        if cells[1] in ("no", "not"):
            cells[1:3] = [f"{cells[1]} {cells[2]}"]
        rows[cells[0]] = cells
    return rows


@pytest.fixture
def fleet(netlab: nl.NetLab) -> Fleet:
    return Fleet(netlab)


@BOTH
def test_label_all_and_a_host_with_no_worker(fleet: Fleet):
    """`--label db` runs on exactly the two db hosts, `--all` on the three; a named host that
    serves nothing is `no such host` at once, exit 1, and nothing runs."""
    code, out, err, _ = fleet.send("shell", "--label", "db", "--timeout", "30", "--", "hostname")
    rows = table(out)
    assert code == 0, (out, err)
    assert sorted(rows) == ["db1.test", "db2.test"]
    assert all(r[1] == "complete" and r[2] == "0" for r in rows.values()), out
    assert "2 host(s): 2 complete" in out

    code, out, err, _ = fleet.send("shell", "--all", "--timeout", "30", "--", "touch", "ran-all")
    rows = table(out)
    assert code == 0, (out, err)
    assert sorted(rows) == ["db1.test", "db2.test", "web1.test"]
    assert all(fleet.ran(h, "ran-all") for h in rows)

    code, out, err, seconds = fleet.send("shell", "--host", "nohost.test", "--timeout", "30", "--",
                                         "touch", "ran-nohost")
    assert code == 1 and "no such host: nohost.test" in err and seconds < 10, (code, out, err, seconds)
    assert "Traceback" not in err
    assert not any(fleet.ran(h, "ran-nohost") for h in fleet.folders)

    code, out, err, _ = fleet.send("shell", "--host", "web1.test", "--json", "--timeout", "30", "--", "hostname")
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [(x["host"], x["state"], x["task"]) for x in lines] == \
        [("web1.test", "complete", "shell@host:web1.test")]
    assert lines[0]["unique"].endswith("@web1.test")


@BOTH
def test_a_host_killed_during_an_all_run_is_reported_and_the_others_complete(fleet: Fleet):
    """web1's worker is killed once its command has started: its row says `no answer` (or
    `failed`), never missing; the db hosts complete; exit 1."""
    proc = fleet.lab.sender(fleet.ctl, fleet.sender_config, "shell", "--all", "--timeout", "12", "--",
                            "sh", "-c", "touch started; sleep 4; touch finished")
    wait_until(lambda: fleet.ran("web1.test", "started"), 30, message="the command started on web1")
    victim = fleet.workers["web1.test"]
    os.kill(victim.pid, signal.SIGKILL)
    code = proc.wait(90)
    rows = table(proc.stdout)
    assert sorted(rows) == ["db1.test", "db2.test", "web1.test"], proc.stdout
    assert rows["web1.test"][1] in ("no answer", "failed"), proc.stdout
    assert rows["db1.test"][1] == rows["db2.test"][1] == "complete", proc.stdout
    assert code == 1


@BOTH
def test_batch_one_max_fail_one_starts_only_the_first(fleet: Fleet):
    """`--batch 1 --max-fail 1` over three hosts whose first fails: only the first is started;
    the two others are `not started` and ran nothing."""
    (fleet.folders["db1.test"] / "fail-here").write_text("")
    code, out, err, _ = fleet.send("shell", "--all", "--batch", "1", "--max-fail", "1", "--timeout", "30", "--",
                                   "sh", "-c", "touch ran; test -e fail-here && exit 3; exit 0")
    rows = table(out)
    assert code == 1, (out, err)
    assert rows["db1.test"][1:3] == ["failed", "3"], out
    assert rows["db2.test"][1] == rows["web1.test"][1] == "not started", out
    assert fleet.ran("db1.test", "ran")
    assert not fleet.ran("db2.test", "ran") and not fleet.ran("web1.test", "ran")

    code, out, err, _ = fleet.send("shell", "--all", "--batch", "50%", "--timeout", "30", "--",
                                   "sh", "-c", "touch ran2; test -e fail-here && exit 3; exit 0")
    rows = table(out)  # 50% of 3: batches of 2; one failure without --max-fail stops nothing
    assert code == 1 and [rows[h][1] for h in sorted(rows)] == ["failed", "complete", "complete"], out


def test_background_fan_out_records_one_entry_per_host(fleet: Fleet):
    code, out, err, _ = fleet.send("shell", "--label", "db", "--background", "--", "touch", "bg")
    assert code == 0 and [r[1] for r in table(out).values()] == ["queued", "queued"], (out, err)
    wait_until(lambda: fleet.ran("db1.test", "bg") and fleet.ran("db2.test", "bg"), 30, message="both ran")
    code, out, err, _ = fleet.send("status", "--json")
    tasks = sorted(json.loads(line)["task"] for line in out.splitlines())
    assert tasks == ["shell@host:db1.test", "shell@host:db2.test"], (out, err)


@BOTH
def test_manage_workers_shows_hosts_and_labels(fleet: Fleet):
    proc = fleet.lab.manage(fleet.ctl, fleet.sender_config, "workers", "--json")
    assert proc.returncode == 0, proc.stderr
    procs = {p["host"]: p["labels"] for p in json.loads(proc.stdout)["processes"]}
    assert procs == {"db1.test": ["db"], "db2.test": ["db"], "web1.test": []}
    ips = {p["host"]: p["ips"] for p in json.loads(proc.stdout)["processes"]}
    assert ips == {h: [fleet.hosts[h].ip] for h in HOSTS_BY_NAME}, ips  # IPv6 from the client id too
    text = fleet.lab.manage(fleet.ctl, fleet.sender_config, "workers").stdout
    assert "HOST" in text and "LABELS" in text and "db1.test" in text


@BOTH
def test_a_key_allowed_shell_on_db_hosts_only(netlab: nl.NetLab, tmp_path):
    """Must 6: fanned-out jobs are signed; `may: [shell@label:db]` runs shell on the db hosts
    and is refused on web1, whose worker requires signed jobs."""
    key_path = tmp_path / "keys" / "ops.key"
    key_path.parent.mkdir()
    _, pub = new_key(key_path)
    trust = (f"security:\n  require_signed: true\n  trust:\n    - name: ops\n      public_key: \"{pub}\"\n"
             "      may: [\"shell@label:db\"]\n")
    fleet = Fleet(netlab, {"worker": trust, "sender": f"security:\n  key: {key_path}\n"})
    code, out, err, _ = fleet.send("shell", "--all", "--timeout", "30", "--", "touch", "signed")
    rows = table(out)
    assert code == 1, (out, err)
    assert rows["db1.test"][1] == rows["db2.test"][1] == "complete", out
    assert rows["web1.test"][1] == "failed" and "signer ops may not run shell@host:web1.test" in out, out
    assert fleet.ran("db1.test", "signed") and not fleet.ran("web1.test", "signed")


PLUGIN = '''
from geartask import hookimpl


@hookimpl
def geartask_jobs(config):
    yield {"task": "shell", "data": {"cmd": ["touch", "plugin-any"]}}
    yield {"task": "shell", "data": {"cmd": ["touch", "plugin-db"]}, "label": "db", "unique": "pdb"}
'''


def test_plugin_jobs_carry_their_own_label(fleet: Fleet, tmp_path):
    """A plugin's job with `label: db` runs once on each db host (unique pdb@HOST); the
    plugin's untargeted job runs once, anywhere."""
    plugins = tmp_path / "fleetplugins"
    plugins.mkdir()
    (plugins / "fleetjobs.py").write_text(PLUGIN)
    config = nl.write_config(tmp_path / "psender" / "config.yaml", [fleet.address], plugin_paths=[plugins])
    proc = fleet.lab.sender(fleet.ctl, config, "plugin", "fleetjobs", "--timeout", "30")
    code = proc.wait(90)
    assert code == 0, (proc.stdout, proc.stderr)
    assert sorted(table(proc.stdout)) == ["db1.test", "db2.test"]
    assert [h for h in fleet.folders if fleet.ran(h, "plugin-db")] == ["db1.test", "db2.test"]
    assert len([h for h in fleet.folders if fleet.ran(h, "plugin-any")]) == 1


# -- the seams between fan-out, --follow, the no-worker check and the collector ---------------

@BOTH
def test_follow_over_a_label_prefixes_lines_with_the_tables_hosts(fleet: Fleet):
    """`--label db --follow`: each host's lines arrive while the jobs still run, each prefixed
    with the host name its table row shows (worker.host), and the table follows."""
    proc = fleet.lab.sender(fleet.ctl, fleet.sender_config, "shell", "--label", "db", "--follow", "--timeout", "60",
                            "--", "sh", "-c", "echo one; sleep 2; echo two")
    try:
        for host in ("db1.test", "db2.test"):  # each host's first line, while the jobs still run
            wait_until(lambda: f"{host} | one" in proc.stdout or proc.proc.poll() is not None, 30, interval=0.05,
                       message=f"{host}'s first line")
            early = proc.stdout
            assert proc.proc.poll() is None and "HOST" not in early, (early, proc.stderr)
        code = proc.wait(60)
    finally:
        if proc.proc.poll() is None:
            proc.proc.kill()
    out = proc.stdout
    assert code == 0, (out, proc.stderr)
    rows = table(out)
    assert sorted(rows) == ["db1.test", "db2.test"] and all(r[1] == "complete" for r in rows.values()), out
    streamed = [line for line in out.splitlines()[:out.splitlines().index(next(
        line for line in out.splitlines() if line.split()[:2] == ["HOST", "STATE"]))]]
    prefixes = {line.split(" |", 1)[0] for line in streamed}
    assert prefixes == set(rows), streamed  # the same names as the table, nothing else
    assert sorted(streamed) == ["db1.test | one", "db1.test | two", "db2.test | one", "db2.test | two"], streamed


def test_follow_refusals_are_the_same_with_fan_out_flags(fleet: Fleet):
    """--follow with --json or --background is a usage error (exit 2) whether or not the job
    is fanned out, and nothing runs."""
    for extra in (["--json"], ["--background"], ["--no-wait"]):
        for target in ([], ["--label", "db"]):
            code, out, err, _ = fleet.send("shell", *target, "--follow", *extra, "--", "touch", "refused")
            assert code == 2 and "--follow" in err and "Traceback" not in err, (extra, target, out, err)
    assert not any(fleet.ran(h, "refused") for h in fleet.folders)


def test_a_killed_host_without_timeout_is_no_answer_after_no_worker_timeout(fleet: Fleet, tmp_path):
    """Foreground fan-out with no --timeout: web1's worker is killed -9 mid-job, so gearmand
    requeues its `shell@host:web1.test` job for nobody. The sender notices nobody serves it any
    more and, after sender.no_worker_timeout (2 s here), reports web1 `no answer`; the db hosts
    complete; exit 1; the run ends instead of waiting forever."""
    config = nl.write_config(tmp_path / "nwsender" / "config.yaml", [fleet.address],
                             "sender:\n  no_worker_timeout: 2\n")

    def kill_mid_run(host: str, started, *args: str):
        """The sender run with ``args``, ``host``'s worker killed -9 once ``started(proc)``:
        (proc, its exit code)."""
        proc = fleet.lab.sender(fleet.ctl, config, "shell", *args)
        try:
            wait_until(lambda: started(proc), 30, message=f"the command started on {host}")
            os.kill(fleet.workers[host].pid, signal.SIGKILL)
            return proc, proc.wait(60)
        finally:
            if proc.proc.poll() is None:
                proc.proc.kill()

    proc, code = kill_mid_run("web1.test", lambda p: "web1.test | started" in p.stdout, "--all", "--follow",
                              "--", "sh", "-c", "touch started; echo started; sleep 3; touch finished")
    rows = table(proc.stdout)
    assert sorted(rows) == ["db1.test", "db2.test", "web1.test"], (proc.stdout, proc.stderr)
    assert rows["web1.test"][1] == "no answer", proc.stdout
    assert "no_worker_timeout" in proc.stdout and "any more" in proc.stdout, proc.stdout
    assert rows["db1.test"][1] == rows["db2.test"][1] == "complete", proc.stdout
    assert code == 1
    assert "any more" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr  # the warning, once
    assert fleet.ran("db1.test", "finished") and not fleet.ran("web1.test", "finished")
    assert proc.stdout.index("web1.test | started") < proc.stdout.index("HOST "), proc.stdout

    # The only host targeted, killed: the same `no answer` row, not exit 3 with no table.
    (fleet.folders["db2.test"] / "started").unlink()
    proc, code = kill_mid_run("db2.test", lambda _: fleet.ran("db2.test", "started"), "--host", "db2.test",
                              "--", "sh", "-c", "touch started; sleep 30")
    rows = table(proc.stdout)
    assert list(rows) == ["db2.test"] and rows["db2.test"][1] == "no answer", (proc.stdout, proc.stderr)
    assert code == 1, proc.stderr


@BOTH
def test_background_fan_out_results_and_status_per_host_with_a_collector(fleet: Fleet):
    """Background fan-out, then `send result UNIQUE@HOST` for each host from the outcomes
    collector (each host's own output), and `send status` answering per host."""
    collector = fleet.lab.config("collector", [fleet.address], "outcomes:\n  path: outcomes.sqlite\n")
    fleet.lab.run(fleet.srv, nl.MANAGER, collector, "outcomes", "serve", label="collector")
    wait_until(lambda: any(line.startswith("geartask.outcomes.query\t") and not line.endswith("\t0")
                           for line in fleet.lab.observe(nl.admin_status, fleet.address)),
               30, message="the collector attached")
    code, out, err, _ = fleet.send("shell", "--all", "--background", "--json", "--",
                                   "sh", "-c", "touch bgrun; echo from-$(basename \"$PWD\")")
    queued = {x["host"]: x for x in map(json.loads, out.splitlines())}
    assert code == 0 and sorted(queued) == ["db1.test", "db2.test", "web1.test"], (out, err)
    assert {x["state"] for x in queued.values()} == {"queued"}, out
    base = queued["db1.test"]["unique"].rsplit("@", 1)[0]
    assert all(x["unique"] == f"{base}@{h}" for h, x in queued.items()), out  # one key, per host
    wait_until(lambda: all(fleet.ran(h, "bgrun") for h in fleet.folders), 30, message="every host ran")
    for host, folder in fleet.folders.items():
        code, out, err, _ = fleet.send("result", f"{base}@{host}", "--wait", "30", "--json")
        o = json.loads(out)
        assert code == 0 and o["state"] == "complete", (host, out, err)
        assert o["unique"] == f"{base}@{host}" and o["task"] == "shell", o  # the task its worker ran
        assert o["result"]["output"].strip() == f"from-{folder.name}", o  # ran on that host, in its folder
    code, out, err, _ = fleet.send("result", f"{base}@db1.test")
    assert code == 0 and out.startswith(f"complete shell [{base}@db1.test]"), (out, err)
    code, out, err, _ = fleet.send("result", f"{base}@nohost.test")
    assert code == 1 and out.startswith("unknown"), (out, err)

    code, out, err, _ = fleet.send("status", "--json")
    got = {json.loads(line)["unique"]: json.loads(line) for line in out.splitlines()}
    assert sorted(got) == [f"{base}@db1.test", f"{base}@db2.test", f"{base}@web1.test"], (out, err)
    assert {s["state"] for s in got.values()} == {"complete"} and code == 0, out
    assert {s["task"] for s in got.values()} == {f"shell@host:{h}" for h in fleet.folders}, out
    code, out, err, _ = fleet.send("status", "--task", "shell@host:web1.test")
    assert code == 0 and f"{base}@web1.test" in out and "db1.test" not in out, out
    assert "1 job(s): 1 complete" in out, out
