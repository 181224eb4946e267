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


# -- what a command gets on the fast path: what Popen(start_new_session=True, close_fds=True) gave --

needs_spawn = pytest.mark.skipif(not spawn.available(), reason="posix_spawn with closefrom/chdir not usable here")


@needs_spawn
def test_the_child_leads_its_session_and_inherits_no_descriptor_of_ours(tmp_path):
    from geartask.shell import veryeasyprocess as vep
    r_fd, w_fd = os.pipe()
    os.set_inheritable(w_fd, True)  # even an inheritable one: close_fds closed it, so does closefrom
    try:
        script = ('echo FDS $(ls /proc/self/fd); echo IDS $$ $(cut -d" " -f5,6 /proc/$$/stat); '
                  'grep ^SigIgn /proc/self/status')
        r = vep.shell_2_tempfile(["sh", "-c", script], cwd=str(tmp_path), timeout=10)
    finally:
        os.close(r_fd)
        os.close(w_fd)
    assert r.ok, r
    fields = {line.split()[0]: line.split()[1:] for line in r.output.splitlines()}
    fds = {int(x) for x in fields["FDS"]}
    assert fds <= {0, 1, 2, 3}, f"descriptors open in the command: {fds} (ours: {w_fd}; 3 is ls's own)"
    assert [int(x) for x in fields["IDS"]] == [r.pid] * 3, "the command leads its own group and session"
    ignored = int(fields["SigIgn:"][0], 16)
    assert not ignored & (1 << (signal.SIGPIPE - 1)), "SIGPIPE is back to its default, as Popen restores it"


@needs_spawn
def test_cwd_env_and_start_failures_read_as_they_did_with_popen(tmp_path, monkeypatch):
    from geartask.shell import veryeasyprocess as vep
    fast = [vep.shell_2_tempfile(["sh", "-c", 'pwd; echo "$X"; echo err >&2'], cwd=str(tmp_path), env={"X": "y"}),
            vep.shell_2_tempfile(["no-such-program-here"]),
            vep.shell_2_tempfile(["/no/such/program"]),
            vep.shell_2_tempfile(["true"], cwd=str(tmp_path / "missing")),
            vep.shell_2_tempfile(["echo", "a\0b"]),
            vep.shell_2_tempfile(["true"], env={"X": "a\0b"})]
    monkeypatch.setattr(spawn, "available", lambda: False)  # the same calls through Popen
    slow = [vep.shell_2_tempfile(["sh", "-c", 'pwd; echo "$X"; echo err >&2'], cwd=str(tmp_path), env={"X": "y"}),
            vep.shell_2_tempfile(["no-such-program-here"]),
            vep.shell_2_tempfile(["/no/such/program"]),
            vep.shell_2_tempfile(["true"], cwd=str(tmp_path / "missing")),
            vep.shell_2_tempfile(["echo", "a\0b"]),
            vep.shell_2_tempfile(["true"], env={"X": "a\0b"})]
    assert fast[0].output == slow[0].output == f"{tmp_path}\ny\nerr\n"
    for f, s in zip(fast[1:], slow[1:], strict=True):
        assert (f.returncode, f.reason) == (s.returncode, s.reason)
        assert f.reason
