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
from geartask.trust.keys import new_key
from helpers import wait_until


HOSTS = {"a": ("db1.test", ["db"]), "b": ("db2.test", ["db"]), "c": ("web1.test", [])}


class Fleet:
    def __init__(self, lab: nl.NetLab, security: dict | None = None):
        self.lab = lab
        self.srv = lab.add_host("srv")
        lab.gearmand(self.srv)
        self.address = f"{self.srv.ip}:4730"
        self.ctl = lab.add_host("ctl")
        self.workers: dict[str, nl.NetWorker] = {}
        self.folders: dict[str, Path] = {}
        for ns_name, (host, labels) in HOSTS.items():
            h = lab.add_host(ns_name)
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


def test_manage_workers_shows_hosts_and_labels(fleet: Fleet):
    proc = fleet.lab.manage(fleet.ctl, fleet.sender_config, "workers", "--json")
    assert proc.returncode == 0, proc.stderr
    procs = {p["host"]: p["labels"] for p in json.loads(proc.stdout)["processes"]}
    assert procs == {"db1.test": ["db"], "db2.test": ["db"], "web1.test": []}
    text = fleet.lab.manage(fleet.ctl, fleet.sender_config, "workers").stdout
    assert "HOST" in text and "LABELS" in text and "db1.test" in text


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
