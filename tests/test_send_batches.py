"""Big foreground batches print a summary (each line with --each), and --timeout means one
thing: the wait for the result; a shell command's kill deadline is --kill-after (issue 22)."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from helpers import PYTHON, REPO, write_config
from workers import WorkerProc

PLUGIN = '''
from geartask import hookimpl

def echo(job):
    return job.data

def fail(job):
    raise ValueError("bad input " + str(job.data))

@hookimpl
def geartask_tasks():
    return {"bb.echo": echo, "bb.fail": fail}

@hookimpl
def geartask_jobs():
    for i in range(50):
        yield {"task": "bb.echo", "data": i}
        if i in (10, 40):
            yield {"task": "bb.fail", "data": i}
'''


@pytest.fixture
def fleet(fresh_gearmand, tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "big.py").write_text(PLUGIN)
    config = write_config(tmp_path / "config.yaml", [fresh_gearmand.address],
                          "worker:\n  shell:\n    allow: [sleep, echo]\noutcomes:\n  report: false\n",
                          plugin_paths=[plugins])
    w = WorkerProc(config, "bb", 4)
    w.wait_attached([fresh_gearmand.address])
    yield config
    w.stop()


def send(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "geartask", "send", "--config", str(config), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def test_a_big_batch_prints_its_failures_and_a_summary_and_every_line_with_each(fleet):
    r = send(fleet, "plugin", "big")
    assert r.returncode == 1, r.stderr
    lines = r.stdout.splitlines()
    assert len([x for x in lines if x.startswith("complete ")]) <= 20
    failed = [x for x in lines if x.startswith("failed ")]
    assert len(failed) == 2 and all("bad input" in x for x in failed)  # failures always shown
    shown = len([x for x in lines if x.startswith(("complete ", "failed "))])
    assert f"({52 - shown} more complete or queued job(s) not shown; --each prints every one)" in lines
    assert re.match(r"52 job\(s\): 50 complete, 2 failed in ", lines[-1]), lines[-1]

    r = send(fleet, "plugin", "big", "--each")
    lines = r.stdout.splitlines()
    assert len([x for x in lines if x.startswith(("complete ", "failed "))]) == 52 and "not shown" not in r.stdout
    r = send(fleet, "plugin", "big", "--json")  # machine output: always one object per job
    assert len([json.loads(x) for x in r.stdout.splitlines()]) == 52


def test_timeout_is_the_wait_and_kill_after_the_shell_deadline(fleet):
    # --timeout: the wait for the result. The command runs on (to --kill-after), the sender stops waiting.
    r = send(fleet, "shell", "--json", "--timeout", "1", "--kill-after", "10", "--", "sleep", "4")
    (line,) = [json.loads(x) for x in r.stdout.splitlines()]
    assert line["state"] == "timeout" and r.returncode == 1 and line["seconds"] < 3, line  # not the 4 s
    # --kill-after: the command is killed on the worker; the answer says so
    r = send(fleet, "shell", "--json", "--kill-after", "1", "--", "sleep", "30")
    (line,) = [json.loads(x) for x in r.stdout.splitlines()]
    assert line["state"] == "failed" and r.returncode == 1 and '"timed_out": true' in json.dumps(line["error"]), line
    # the old invocation (--timeout alone) still kills the command then, and reports why
    t0 = time.monotonic()
    r = send(fleet, "shell", "--json", "--timeout", "1", "--", "sleep", "30")
    (line,) = [json.loads(x) for x in r.stdout.splitlines()]
    assert line["state"] == "failed" and '"timed_out": true' in json.dumps(line["error"]), line
    assert time.monotonic() - t0 < 15
    r = send(fleet, "shell", "--kill-after", "0", "--", "true")
    assert r.returncode == 2 and "--kill-after" in r.stderr and "Traceback" not in r.stderr
