"""veryeasyprocess: timeouts kill the whole process group, output is captured, errors are results."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from helpers import REPO, wait_until
from worker_client import veryeasyprocess as vep


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_timeout_kills_the_whole_group_and_reaps():
    t0 = time.monotonic()
    r = vep.shell_2_tempfile("sleep 100 & sleep 100", timeout=0.5, shell=True)
    assert r.timed_out and not r.ok
    assert "timed out" in r.reason
    assert time.monotonic() - t0 < 10
    assert not os.path.exists(f"/proc/{r.pid}"), "the child was not reaped (zombie)"
    # The orphaned sleep is killed at once; init reaps it a moment later.
    wait_until(lambda: group_gone(r.pid), 10, message="every sleep of the killed command gone")


def test_a_daemonised_grandchild_is_ended_when_the_command_exits():
    r = vep.shell_2_tempfile(["sh", "-c", "sleep 100 & echo started"], timeout=10)
    assert r.ok and r.output == "started\n"
    wait_until(lambda: group_gone(r.pid), 10, message="the background sleep gone")


def test_twenty_megabytes_of_output_are_captured():
    r = vep.shell_2_tempfile(["sh", "-c", "head -c 20000000 /dev/zero | tr '\\0' x"], timeout=30,
                             max_output=32 * 1024 * 1024)
    assert r.ok and len(r.output) == 20_000_000 and not r.cut


def test_output_over_max_output_is_cut_and_flagged():
    r = vep.shell_2_tempfile(["sh", "-c", "head -c 5000 /dev/zero"], max_output=1000)
    assert r.ok and len(r.output) == 1000 and r.cut


def test_failures_are_results_with_reasons(tmp_path):
    r = vep.shell_2_tempfile(["false"])
    assert r.returncode == 1 and r.reason == "exit status 1" and not r.ok
    r = vep.shell_2_tempfile(["no-such-program-geartask"])
    assert r.returncode is None and "program not found" in r.reason
    r = vep.shell_2_tempfile(["ls"], cwd="/no/such/dir")
    assert r.returncode is None and "/no/such/dir" in r.reason
    not_executable = tmp_path / "script"
    not_executable.write_text("echo hi\n")
    not_executable.chmod(0o644)
    r = vep.shell_2_tempfile([str(not_executable)])
    assert r.returncode is None and "permission denied" in r.reason
    r = vep.shell_2_tempfile("echo hi")
    assert r.returncode is None and "shell=True" in r.reason
    r = vep.shell_2_tempfile([])
    assert r.returncode is None and "non-empty list" in r.reason


def test_a_string_runs_through_sh_only_when_asked():
    r = vep.shell_2_tempfile("echo $((6*7))", shell=True)
    assert r.ok and r.output == "42\n"
    r = vep.shell_2_tempfile(["echo", "$((6*7))"])
    assert r.output == "$((6*7))\n"


def test_stderr_is_captured_with_stdout_and_env_and_cwd_apply(tmp_path):
    r = vep.shell_2_tempfile(["sh", "-c", "echo out; echo err >&2; echo $GT_X; pwd"], cwd=str(tmp_path),
                             env={"GT_X": "yes"})
    assert r.output.splitlines() == ["out", "err", "yes", str(tmp_path)]


def test_shell_2_tty_writes_to_our_own_output():
    code = ("import sys; sys.path.insert(0, %r); from worker_client import veryeasyprocess as v; "
            "r = v.shell_2_tty(['echo', 'to the tty']); print('rc', r.returncode, repr(r.output))" % str(REPO))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30).stdout
    assert out == "to the tty\nrc 0 ''\n"


def test_heartbeat_ticks_while_a_command_runs():
    ticks = []
    r = vep.shell_2_tempfile(["sleep", "0.7"], on_tick=ticks.append, tick_interval=0.2)
    assert r.ok and len(ticks) >= 2 and ticks == sorted(ticks)


def test_cancel_kills_the_command():
    cancel = threading.Event()
    threading.Timer(0.3, cancel.set).start()
    r = vep.shell_2_tempfile(["sleep", "100"], timeout=60, cancel=cancel)
    assert r.cancelled and not r.ok and r.duration < 10
    wait_until(lambda: group_gone(r.pid), 10, message="the cancelled command gone")
