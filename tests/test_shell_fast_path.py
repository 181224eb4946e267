"""Shell jobs on the fast start path (geartask/shell/spawn.py, posix_spawn without the GIL):
many through one worker at once, none lost or run twice, and the reaper still ends every
command of a worker killed -9 while its threads start commands as fast as they can."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

import gearclient as gc
from geartask.shell import spawn
from helpers import REPO, wait_until, write_config
from workers import WorkerProc

SLEEP = ["sleep", "877.25"]  # a duration no other test uses: these processes are ours

CONFIG = """outcomes:
  report: false
worker:
  poll_timeout: 1
  shell:
    allow: ["true", sleep]
"""


def sleeps() -> dict[int, int]:
    """Our sleep commands now alive: pid -> parent pid (zombies left out)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[:-1]
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if [a.decode(errors="replace") for a in argv] == SLEEP and fields[0] != "Z":
            found[int(entry)] = int(fields[1])
    return found


@pytest.fixture
def workers(tmp_path):
    started: list[WorkerProc] = []

    def start(server, name: str, threads: int) -> WorkerProc:
        cfg = write_config(tmp_path / f"{name}.yaml", [server.address], CONFIG, plugin_paths=[REPO / "plugins"])
        w = WorkerProc(cfg, name, threads)
        started.append(w)
        return w.wait_attached([server.address])

    yield start
    for w in started:
        w.stop()
    wait_until(lambda: not sleeps(), 15, message="no sleep command left by a stopped worker")


def test_2000_true_jobs_none_lost_or_run_twice_and_a_worker_killed_9_leaves_no_command(fresh_gearmand, workers):
    if not spawn.available():
        pytest.skip("posix_spawn with closefrom/chdir is not usable here (glibc < 2.34): Popen starts commands")
    w = workers(fresh_gearmand, "fast", 4)
    conn = gc.connect(fresh_gearmand.address)
    try:
        # 2,000 `true` through 4 threads: each answered once, each run once (one "job" line each).
        handles = gc.submit(conn, "shell", [{"cmd": ["true"]}] * 2000, timeout=60)
        out = gc.wait(conn, handles, 180)
        assert len(set(handles)) == 2000
        bad = [o for o in out.values() if o.state != "complete" or o.result.get("returncode") != 0]
        assert not bad, f"{len(bad)} of 2000 not completed: {bad[0]}"

        def runs() -> list[str]:
            return [e["handle"] for e in w.log_lines() if e.get("event") == "job" and e.get("task") == "shell"]
        wait_until(lambda: len(runs()) >= 2000, 30, message="the worker's 2000 job lines written")
        ran = runs()
        assert sorted(ran) == sorted(handles), "a job missing from the worker's lines, or run twice"

        # Kill -9 in the middle of a stream: 4 threads hold a long command each while more
        # `true` jobs wait. The reaper ends every command; another worker answers the rest.
        long_jobs = gc.submit(conn, "shell", [{"cmd": SLEEP, "timeout": 500}] * 4, background=True)
        assert len(long_jobs) == 4
        trues = gc.submit(conn, "shell", [{"cmd": ["true"]}] * 300, timeout=60)
        wait_until(lambda: [p for p, parent in sleeps().items() if parent == w.pid][3:], 30,
                   message=f"4 sleep commands started by the worker {w.pid}: {sleeps()} {w.log_lines()[-3:]}")
        w.signal(signal.SIGKILL)
        w.wait(10)
        wait_until(lambda: not sleeps(), 10, message="every command of the killed worker ended by its reaper")

        rescuer = workers(fresh_gearmand, "rescuer", 8)  # 4 threads take the sleeps again, 4 the rest
        out = gc.wait(conn, trues, 120)
        assert [o.state for o in out.values()] == ["complete"] * 300, "a `true` job lost with the worker"
        rescuer.signal(signal.SIGKILL)
        rescuer.wait(10)
        wait_until(lambda: not sleeps(), 10, message="the rescuer's commands ended by its reaper too")
    finally:
        conn.close()
