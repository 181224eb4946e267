"""`send status` at scale (issue 22): filters that narrow what is asked, and the outcomes of
finished jobs read in batches over one connection, cheap on gearmand."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from geartask.config import load_config
from geartask.outcomes.client import OutcomeClient
from helpers import PYTHON, REPO
from test_manager import submit_bg
from test_outcomes_collector import collector_config, collectors  # noqa: F401 (fixture)

STAMP = "%Y-%m-%dT%H:%M:%S%z"


def send_status(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "geartask", "send", "status", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def write_record(config: Path, lines: list[dict]) -> None:
    logs = config.parent / "logs"
    logs.mkdir(exist_ok=True)
    (logs / "sender-background.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_status_filters_by_task_age_state_and_limit(fresh_gearmand, tmp_path):
    srv = fresh_gearmand
    config = tmp_path / "config.yaml"
    config.write_text(f"servers:\n  - {srv.address}\nlog:\n  dir: logs\n")
    a = submit_bg(srv, "t.status.a", 6, "a")
    b = submit_bg(srv, "t.status.b", 4, "b")
    now = time.time()
    lines = [{"time": time.strftime(STAMP, time.localtime(now - (3 * 86400 if i == 0 else 60))), "task": "t.status.a",
              "unique": f"a-{i}", "handle": h, "server": srv.address} for i, h in enumerate(a)]
    lines += [{"time": time.strftime(STAMP, time.localtime(now - 30)), "task": "t.status.b", "unique": f"b-{i}",
               "handle": h, "server": srv.address} for i, h in enumerate(b)]
    write_record(config, lines)

    r = send_status(config, "--json")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 10
    r = send_status(config, "--task", "t.status.a", "--json")
    assert [json.loads(x)["unique"] for x in r.stdout.splitlines()] == [f"a-{i}" for i in range(6)]
    r = send_status(config, "--task", "t.status.a", "--since", "1d", "--json")
    assert [json.loads(x)["unique"] for x in r.stdout.splitlines()] == [f"a-{i}" for i in range(1, 6)]
    r = send_status(config, "--limit", "3", "--json")  # the newest three, oldest first
    assert [json.loads(x)["unique"] for x in r.stdout.splitlines()] == ["b-1", "b-2", "b-3"]
    r = send_status(config, "--state", "queued", "--limit", "2")
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "2 job(s): 2 queued", r.stdout
    r = send_status(config, "--state", "running")
    assert r.returncode == 0 and r.stdout.startswith("no background jobs match"), r.stdout
    for bad, why in ((["--since", "yesterday"], "expected a duration"), (["--limit", "0"], "greater than 0"),
                     (["--state", "done"], "invalid choice")):
        r = send_status(config, *bad)
        assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_status_of_2000_finished_jobs_reads_their_outcomes_cheaply(fresh_gearmand, tmp_path, collectors):  # noqa: F811
    srv = fresh_gearmand
    config = collector_config(tmp_path, [srv.address])
    collectors(config, [srv.address])
    client = OutcomeClient(load_config(config), timeout=10)
    n, now = 2000, time.time()
    client.import_records([{"id": f"id-{i}", "server": srv.address, "handle": f"H:gone:{i}", "unique": f"u-{i}",
                            "task": "t.done", "state": "failed" if i % 10 == 0 else "complete",
                            "finished_at": now - n + i, "attempts": 1, "background": True,
                            **({"reason": "boom"} if i % 10 == 0 else {"result": f"r{i}"})} for i in range(n)])
    write_record(config, [{"time": time.strftime(STAMP), "task": "t.done", "unique": f"u-{i}",
                           "handle": f"H:gone:{i}", "server": srv.address} for i in range(n)])
    before = cpu_seconds(srv.pid())
    r = send_status(config, "--json")
    spent = cpu_seconds(srv.pid()) - before
    states = [json.loads(x)["state"] for x in r.stdout.splitlines()]
    assert states.count("complete") == 1800 and states.count("failed") == 200, r.stderr[-500:]
    assert json.loads(r.stdout.splitlines()[1])["result"] == "r1"
    print(f"send status of {n} finished jobs: gearmand CPU {spent:.2f}s")
    # one connection per server, queries pipelined: it was ~1.1 s of gearmand CPU per 2,000
    # (a connection, an admin status and a query each)
    assert spent < 0.4, f"gearmand spent {spent:.2f}s CPU on send status"
