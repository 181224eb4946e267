"""What a worker tells and takes beyond results: the attempts of a job that needed retries,
ping's per-task counters, and the stop command. Real gearmand, real worker processes, raw
clients; the protocol paths also through the slicing proxy."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import gearclient as gc
from geartask.control import parse_command, ping_request, stop_request
from geartask.errors import UsageError
from helpers import processes, wait_until
from netproxy import SliceProxy
from test_worker import start_worker, wait_running  # noqa: F401 (start_worker: a fixture)
from workers import worker_connections

BUCKETS = ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "30", "60", "300", "+Inf"]


def control_function(address: str, pid: int) -> str:
    return [line.split()[-1] for line in worker_connections(address) if f":{pid}:0 " in line][0]


def ping(address: str, pid: int) -> dict:
    return gc.run_one(address, control_function(address, pid), ping_request(), timeout=10).result


def dead_letters(w) -> list[dict]:
    path = w.config.parent / "logs" / "dead-letter.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def children_running(*words: str, parent: int | None = None) -> list[int]:
    """Live processes whose command line has every one of ``words`` (and whose parent is
    ``parent``, if given: other test runs may run the same commands)."""
    found = [p for p, (argv, _) in processes().items() if all(any(w in a for a in argv) for w in words)]
    return [p for p in found if parent is None or _parent(p) == parent]


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rfind(")") + 2:].split()[1])


def stop_and_see_it_fail(address: str, pid: int, conn, handle: str) -> None:
    """Stop the running job ``handle`` of worker ``pid``; its client (``conn``) sees it fail
    with "stopped by operator" after its first attempt."""
    # gearmand counts the job running at JOB_ASSIGN; ask until the thread has begun it (a stop
    # of a job not begun yet answers stopped: false at once)
    wait_until(lambda: gc.run_one(address, control_function(address, pid), stop_request(handle),
                                  timeout=10).result["stopped"] is True, 10, message="the stop to find the job")
    o = gc.wait(conn, [handle], 10)[handle]
    conn.close()
    assert o.state == "failed" and o.reason["error"] == "stopped by operator" and o.reason["attempts"] == 1
    assert o.reason["stopped"] is True


# -- the attempts of a job that succeeded after retries ----------------------------------------
def test_a_job_that_succeeds_after_retries_says_how_many_attempts_it_took(gearmand, start_worker):
    """WORK_WARNING {"geartask": {"attempts": N}} comes right before WORK_COMPLETE, through a
    sliced link too; a first-attempt success sends nothing extra."""
    with SliceProxy(gearmand.address) as proxy:
        start_worker(proxy.address, name="tries", wait=False).wait_attached([gearmand.address])
        o = gc.run_one(gearmand.address, "eg.flaky", {})
        assert o.state == "complete" and o.result == {"ok": True, "attempt": 2}
        assert o.warnings == [{"geartask": {"attempts": 2}}]
        o = gc.run_one(gearmand.address, "eg.reverse", "abc")
        assert o.state == "complete" and o.warnings == []
        o = gc.run_one(gearmand.address, "t.fail", {"retries": 1})
        assert o.state == "failed" and len(o.warnings) == 1 and o.reason["attempts"] == 2


def test_the_c_gearman_client_gets_the_result_and_the_attempts_on_stderr(gearmand, start_worker):
    start_worker(gearmand, name="ctries")
    r = subprocess.run(["gearman", "-p", str(gearmand.port), "-h", "127.0.0.1", "-f", "eg.flaky", "{}"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and json.loads(r.stdout) == {"ok": True, "attempt": 2}
    assert '{"geartask":{"attempts":2}}' in r.stderr


# -- ping's counters -----------------------------------------------------------------------------
def test_ping_counts_jobs_per_task_with_a_duration_histogram(gearmand, start_worker):
    w = start_worker(gearmand, name="counted", threads=2)
    assert all(o.state == "complete" for o in gc.run(gearmand.address, "eg.reverse", ["a"] * 20))
    assert gc.run_one(gearmand.address, "eg.flaky", {}).state == "complete"
    assert gc.run_one(gearmand.address, "t.fail", {"retries": 1}).state == "failed"
    assert gc.run_one(gearmand.address, "shell", {"cmd": ["sleep", "0.3"]}).state == "complete"
    reply = ping(gearmand.address, w.pid)
    assert reply["threads"] == 2 and reply["busy"] == 0 and reply["max_jobs"] == 0 and reply["dedicated"] == {}
    tasks = reply["tasks"]
    assert {"eg.reverse", "eg.flaky", "eg.wordcount", "t.fail", "t.hang", "shell"} <= set(tasks)
    for name, c in tasks.items():
        assert list(c["buckets"]) == BUCKETS
        counts = list(c["buckets"].values())
        assert counts == sorted(counts) and counts[-1] == c["complete"] + c["failed"], name
    assert tasks["eg.reverse"]["complete"] == 20 and tasks["eg.reverse"]["failed"] == 0
    assert tasks["eg.reverse"]["retried"] == 0 and 0 < tasks["eg.reverse"]["seconds_sum"] < 5
    assert (tasks["eg.flaky"]["complete"], tasks["eg.flaky"]["retried"], tasks["eg.flaky"]["failed"]) == (1, 1, 0)
    assert (tasks["t.fail"]["complete"], tasks["t.fail"]["retried"], tasks["t.fail"]["failed"]) == (0, 1, 1)
    shell = tasks["shell"]
    assert shell["complete"] == 1 and shell["buckets"]["0.25"] == 0 and shell["seconds_sum"] >= 0.3
    assert tasks["eg.wordcount"]["complete"] == 0 and tasks["eg.wordcount"]["buckets"]["+Inf"] == 0


# -- stop ----------------------------------------------------------------------------------------
def test_stop_kills_a_running_shell_command_and_fails_the_job_once(gearmand, start_worker):
    """Through a sliced link: the command's process group is killed, the job fails with
    "stopped by operator" after 1 attempt (it asked for 3 retries), a dead letter is written,
    and the thread goes on. A stop naming another server, or a job not running, says false."""
    with SliceProxy(gearmand.address) as proxy:
        w = start_worker(proxy.address, name="stopper", threads=1, wait=False).wait_attached([gearmand.address])
        control = control_function(gearmand.address, w.pid)
        conn = gc.connect(gearmand.address)
        [h] = gc.submit(conn, "shell", [{"cmd": ["sleep", "876.5"], "timeout": 100, "retries": 3}])
        wait_until(lambda: children_running("sleep", "876.5"), 10, message="the command running")
        reply = gc.run_one(gearmand.address, control, stop_request(h, server=gearmand.address), timeout=10).result
        assert reply["stopped"] is False  # the worker knows that job as the proxy's
        reply = gc.run_one(gearmand.address, control, stop_request(h, server=proxy.address), timeout=10).result
        assert reply == {"ok": True, "command": "stop", "worker": f"stopper:127.0.0.1:{w.pid}", "handle": h,
                         "stopped": True}
        o = gc.wait(conn, [h], 15)[h]
        conn.close()
        assert o.state == "failed" and o.reason["error"] == "stopped by operator"
        assert o.reason["attempts"] == 1 and o.reason["stopped"] is True
        assert not children_running("sleep", "876.5")
        assert [d["reason"] for d in dead_letters(w)] == ["stopped by operator"]
        reply = gc.run_one(gearmand.address, control, stop_request(h), timeout=10).result
        assert reply["stopped"] is False and reply["handle"] == h
        assert gc.run_one(gearmand.address, "shell", {"cmd": ["echo", "next"]}).result["output"] == "next\n"
        assert ping(gearmand.address, w.pid)["tasks"]["shell"]["failed"] == 1


def test_stop_abandons_a_plugin_task_and_replaces_its_thread(gearmand, start_worker):
    """A Python task can't be killed: like the watchdog, the job fails at once and a new
    thread serves; the job is never run here again."""
    w = start_worker(gearmand, name="stopplug", threads=1)
    conn = gc.connect(gearmand.address)
    [h] = gc.submit(conn, "t.hang", [{"seconds": 60, "retries": 2}])
    wait_running(gearmand, "t.hang")
    stop_and_see_it_fail(gearmand.address, w.pid, conn, h)
    assert gc.run_one(gearmand.address, "eg.reverse", "ok", timeout=10).result == {"reversed": "ko"}

    def threads() -> list[str]:
        ids = [line.split()[2] for line in worker_connections(gearmand.address) if " stopplug:" in line]
        return sorted(i.rsplit(":", 1)[1] for i in ids)
    # the stuck thread's connection is closed when it is abandoned; gearmand's list may show it
    # for a moment after (its close is handled in gearmand's own time)
    wait_until(lambda: threads() == ["0", "1"], 10, message=f"control and one job thread only, not {threads()}")
    reply = ping(gearmand.address, w.pid)
    assert reply["tasks"]["t.hang"]["failed"] == 1 and reply["busy"] == 0
    assert [d["task"] for d in dead_letters(w)] == ["t.hang"]


def test_stop_kills_an_isolated_tasks_process(gearmand, start_worker):
    w = start_worker(gearmand, name="stopiso", threads=1, extra="  isolate: [t.hang]\n")
    conn = gc.connect(gearmand.address)
    [h] = gc.submit(conn, "t.hang", [{"seconds": 60}])
    wait_running(gearmand, "t.hang")
    # the job's child and the spare started beside it
    wait_until(lambda: len(children_running("isolate.py", "t.hang", parent=w.pid)) == 2, 10,
               message="two children")
    stop_and_see_it_fail(gearmand.address, w.pid, conn, h)
    wait_until(lambda: len(children_running("isolate.py", "t.hang", parent=w.pid)) == 1, 10,
               message="the job's child gone")


@pytest.mark.parametrize("payload, message", [
    (b'{"command": "stop"}', "'handle'"),
    (b'{"command": "stop", "handle": 7}', "'handle'"),
    (b'{"command": "stop", "handle": ""}', "'handle'"),
    (b'{"command": "stop", "handle": "H:x:1", "server": ["a"]}', "'server'"),
    (json.dumps({"command": "stop", "handle": "H" * 2000}).encode(), "at most 1024"),
])
def test_a_malformed_stop_fails_that_control_job_and_the_worker_goes_on(gearmand, start_worker, payload, message):
    with pytest.raises(UsageError, match=message):
        parse_command(payload)
    w = start_worker(gearmand, name="badstop", threads=1)
    o = gc.run_one(gearmand.address, control_function(gearmand.address, w.pid), payload, timeout=10)
    assert o.state == "failed" and message in o.reason["error"]
    assert ping(gearmand.address, w.pid)["ok"] is True


def test_stop_request_round_trips_through_parse_command():
    assert parse_command(stop_request("H:gm:5")) == {"command": "stop", "handle": "H:gm:5"}
    assert parse_command(stop_request("H:gm:5", "10.0.0.2:4730"))["server"] == "10.0.0.2:4730"
