"""What a hostile client (or a broken plugin, or a rogue job server) may try against a worker,
and what it gets.

gearmand has no authentication: whoever reaches it can send any job, with any bytes, to
every worker. Each test below is one such attempt, made with real gearmand and worker
processes (and a raw client where the tools can't send the bytes); its docstring says what
is tried and what happens. The rule throughout: the attempt fails that one job, cleanly and
once, is recorded in the dead-letter file, and the worker goes on serving.
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import gearclient as gc
from fakegearmand import FakeGearmand
from geartask import gearman as gp
from geartask.control import ping_request, shutdown_request
from helpers import REPO, run_script, wait_until, write_config
from test_worker import start_worker  # noqa: F401 (a fixture)
from workers import worker_connections

DEEP = b"[" * 100_000 + b"]" * 100_000  # JSON nested 100,000 deep: more than any parser's stack


def runs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def dead_letters(w) -> list[dict]:
    path = w.config.parent / "logs" / "dead-letter.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def control_function(address: str, pid: int) -> str:
    return [line.split()[-1] for line in worker_connections(address) if f":{pid}:0 " in line][0]


def thread_errors(w) -> list[dict]:
    return [e for e in w.log_lines() if e.get("event") == "worker thread error; reconnecting"]


@pytest.mark.parametrize("kind", ["SystemExit", "KeyboardInterrupt", "BaseException"])
def test_a_task_raising_systemexit_or_keyboardinterrupt_fails_its_job_not_the_thread(gearmand, start_worker,
                                                                                     tmp_path, kind):
    """Tried: a task raises SystemExit, KeyboardInterrupt or a bare BaseException, three times
    on a one-thread worker. Got: each job fails once with the exception named; the one thread
    serves the next job (before, each such job ended a thread for good, and the client waited
    forever)."""
    w = start_worker(gearmand, name="baseexc", threads=1)
    rec = tmp_path / "runs.jsonl"
    for _i in range(3):
        o = gc.run_one(gearmand.address, "h.raise", {"raise": kind, "file": str(rec), "retries": 0}, timeout=15)
        assert o.state == "failed" and o.reason["error"].startswith(kind) and o.reason["attempts"] == 1
    assert len(runs(rec)) == 3
    assert gc.run_one(gearmand.address, "eg.reverse", "ok", timeout=10).result == {"reversed": "ko"}
    assert w.proc.poll() is None


def test_a_real_sigint_still_stops_the_worker(gearmand, start_worker, tmp_path):
    """Catching a task's KeyboardInterrupt must not swallow the operator's Ctrl-C: SIGINT to the
    process still stops it (gracefully, exit 0)."""
    w = start_worker(gearmand, name="ctrlc", threads=1)
    w.signal(signal.SIGINT)
    assert w.wait(15) == 0


def test_json_nested_100000_deep_fails_once_and_is_dead_lettered(gearmand, start_worker, fname):
    """Tried: a job whose data is JSON nested 100,000 deep (RecursionError in the decoder).
    Got: the job fails once with a clear reason and one dead letter; gearmand does not hand it
    out again; no 'worker thread error' loop (before: forever, 4 errors a second)."""
    w = start_worker(gearmand, name="deep", threads=1)
    o = gc.run_one(gearmand.address, "t.record", DEEP, timeout=15)
    assert o.state == "failed"
    assert "nested too deeply" in o.reason["error"] or "Error" in o.reason["error"]
    assert gc.queued(gearmand.address, "t.record") == 0
    records = wait_until(lambda: [d for d in dead_letters(w) if d["task"] == "t.record"], 5,
                         message="the dead letter")
    assert len(records) == 1 and records[0]["data_bytes"] == len(DEEP)
    assert len(json.dumps(records[0])) < 20_000  # the payload is capped, not stored whole
    assert gc.run_one(gearmand.address, "eg.reverse", "ab", timeout=10).result == {"reversed": "ba"}
    assert not thread_errors(w)


def test_a_result_too_deep_for_json_fails_the_job(gearmand, start_worker):
    """A task (not the client) returns a list nested 100,000 deep: the job fails with the
    reason, the thread goes on."""
    start_worker(gearmand, name="deepres", threads=1)
    o = gc.run_one(gearmand.address, "h.deep_result", {"depth": 100_000, "retries": 0}, timeout=15)
    assert o.state == "failed" and "cannot be serialised" in o.reason["error"]
    assert gc.run_one(gearmand.address, "eg.reverse", "ab", timeout=10).result == {"reversed": "ba"}


def test_deep_json_to_the_control_function_does_not_disable_shutdown(gearmand, start_worker):
    """Tried: the deep payload sent to a worker's control function (and 1 MB of garbage, and a
    'now' that is not true/false). Got: each control job fails with a reason; the control
    thread still answers ping and shutdown (before: it looped, and shutdown never came through)."""
    w = start_worker(gearmand, name="ctl", threads=1)
    fn = control_function(gearmand.address, w.pid)
    for payload in (DEEP, b"[" * 2000 + b"]" * 2000, b"x" * 1_000_000, b'{"command": "shutdown", "now": NaN}'):
        o = gc.run_one(gearmand.address, fn, payload, timeout=10)
        assert o.state == "failed" and o.reason["error"]
    assert gc.run_one(gearmand.address, fn, ping_request(), timeout=10).result["pid"] == w.pid
    assert gc.run_one(gearmand.address, fn, shutdown_request(), timeout=10).result["ok"] is True
    assert w.wait(15) == 0


@pytest.mark.parametrize("payload", [b'{"retries": NaN}', b'{"retries": Infinity}', b'{"retries": -Infinity}',
                                     b'{"retries": 1e400}', b'{"retries": -1}', b'{"retries": 2.5}',
                                     b'{"retries": "3"}', b'{"retries": true}'])
def test_a_retries_that_is_not_a_whole_number_is_refused(gearmand, start_worker, tmp_path, payload):
    """Tried: "retries" as NaN, infinity, a negative, a fraction, a string or a bool. Got: the
    job is refused (failed, not run, not retried) with a reason naming "retries"."""
    start_worker(gearmand, name="nan", threads=1)
    o = gc.run_one(gearmand.address, "t.fail", payload, timeout=10)
    assert o.state == "failed" and "'retries' must be a whole number" in o.reason["error"]
    assert o.reason["attempts"] == 1


def test_a_task_holding_the_gil_past_job_timeout_fails_once_and_never_runs_again(gearmand, start_worker,
                                                                                 tmp_path):
    """Tried: a task that holds the GIL (one long C call) well past worker.job_timeout. Got:
    the watchdog fails it (late: nothing runs while the GIL is held), the client sees that
    failure, and the job is not run a second time (before: gearmand requeued it as the
    watchdog shut the connection, and another thread ran it again, and again)."""
    w = start_worker(gearmand, name="gil", threads=2, extra="  job_timeout: 1\n")
    rec = tmp_path / "runs.jsonl"
    o = gc.run_one(gearmand.address, "h.gil", {"file": str(rec), "n": 2 * 10**8, "retries": 0}, timeout=60)
    # Whoever comes first answers: the watchdog (a failure) or the task, done at last (its result).
    assert o.state == "complete" or o.reason.get("timed_out") is True
    # The stuck thread's connection is gone once gearmand has the answer: the moment it
    # requeued the job before.
    wait_until(lambda: len([l for l in worker_connections(gearmand.address) if " gil:" in l]) == 3, 15,
               message="two job threads and the control thread, no stale connection")
    assert gc.run_one(gearmand.address, "eg.reverse", "ab", timeout=10).result == {"reversed": "ba"}
    assert gc.queued(gearmand.address, "h.gil") == 0
    assert len(runs(rec)) == 1
    assert w.proc.poll() is None


def test_an_isolated_task_holding_the_gil_is_killed_at_job_timeout_and_others_go_on(gearmand, start_worker,
                                                                                    tmp_path):
    """With worker.isolate naming the task, the same GIL hog runs in a child process: it is
    killed at job_timeout, jobs on the other thread are served meanwhile, and SIGTERM is quick."""
    w = start_worker(gearmand, name="iso", threads=2, extra="  job_timeout: 2\n  isolate: [h.gil]\n")
    rec = tmp_path / "runs.jsonl"
    conn = gc.connect(gearmand.address)
    t0 = time.monotonic()
    [h] = gc.submit(conn, "h.gil", [{"file": str(rec), "n": 10**11, "retries": 0}])
    wait_until(lambda: runs(rec), 15, message="the isolated task started")
    for i in range(5):  # the other thread serves while the hog runs
        assert gc.run_one(gearmand.address, "eg.reverse", f"j{i}", timeout=5).state == "complete"
    out = gc.wait(conn, [h], 30)[h]
    assert out.state == "failed" and out.reason["timed_out"] is True and "killed" in out.reason["error"]
    assert time.monotonic() - t0 < 15
    assert runs(rec)[0]["pid"] != w.pid
    t1 = time.monotonic()
    w.signal(signal.SIGTERM)
    assert w.wait(15) == 0 and time.monotonic() - t1 < 5
    conn.close()


def test_an_isolated_task_runs_in_its_own_process_with_progress_and_failures(gearmand, start_worker, tmp_path):
    """worker.isolate: the task's result, progress and partial data reach the client as usual;
    a SystemExit or a crash of the child fails that attempt (and is retried like any failure)."""
    w = start_worker(gearmand, name="iso2", threads=1, extra="  isolate: [h.pid, h.raise, h.crash]\n")
    rec = tmp_path / "runs.jsonl"
    o = gc.run_one(gearmand.address, "h.pid", {"x": [1, "ü"]}, timeout=30)
    assert o.state == "complete" and o.result["pid"] != w.pid and o.result["data"] == {"x": [1, "ü"]}
    assert o.statuses == [(1, 2)] and o.data == [{"partial": True}]
    assert o.result["task"] == "h.pid" and o.result["attempt"] == 1
    o = gc.run_one(gearmand.address, "h.raise", {"raise": "SystemExit", "retries": 0}, timeout=30)
    assert o.state == "failed" and o.reason["error"].startswith("SystemExit")
    o = gc.run_one(gearmand.address, "h.crash", {"file": str(rec), "status": 7, "retries": 1}, timeout=30)
    assert o.state == "failed" and "exited with status 7" in o.reason["error"] and o.reason["attempts"] == 2
    assert len(runs(rec)) == 2
    assert gc.run_one(gearmand.address, "eg.reverse", "ab", timeout=10).result == {"reversed": "ba"}


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_an_isolated_task_dies_with_a_killed_worker(fresh_gearmand, start_worker, tmp_path):
    """kill -9 of the worker while an isolated task runs: the task's process (and the spare
    one waiting for the next job) dies too, rather than running on, adopted by init, while
    gearmand gives the job to another worker."""
    w = start_worker(fresh_gearmand, name="orphan", threads=1, extra="  isolate: [h.gil]\n")
    rec = tmp_path / "runs.jsonl"
    conn = gc.connect(fresh_gearmand.address)
    gc.submit(conn, "h.gil", [{"file": str(rec), "n": 10**11, "retries": 0}])
    [run] = wait_until(lambda: runs(rec), 15, message="the isolated task started")
    children = [int(p) for p in subprocess.run(["pgrep", "-P", str(w.pid)], capture_output=True,
                                               text=True).stdout.split()]
    assert run["pid"] in children and len(children) == 2  # the task's process and the spare
    w.signal(signal.SIGKILL)
    w.wait(10)
    wait_until(lambda: not any(_alive(p) for p in children), 10, message="the isolated processes gone")
    conn.close()


def test_worker_isolate_naming_no_task_is_a_config_error(gearmand, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", [gearmand.address], "worker:\n  isolate: [no.such]\n",
                       plugin_paths=[REPO / "plugins"])
    r = run_script("worker_client/runworkers.py", "--config", str(cfg), "--name", "x", "--threads", "1", timeout=30)
    assert r.returncode == 2 and "worker.isolate[0]" in r.stderr and "'no.such'" in r.stderr
    assert "Traceback" not in r.stderr


def _limit_files(n: int, hard: int | None = None):
    def set_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard or n))
    return set_limit


def test_more_threads_than_the_open_file_limit_allows_is_refused_in_one_line(gearmand, tmp_path):
    """Tried: --threads 600 under `ulimit -n 1024`. Got: exit 2 and one line that says how many
    files it needs (before: an OSError traceback, or a worker that looked started)."""
    cfg = write_config(tmp_path / "c.yaml", [gearmand.address])
    r = subprocess.run([sys.executable, str(REPO / "worker_client" / "runworkers.py"), "--config", str(cfg),
                        "--name", "fds", "--threads", "600"], capture_output=True, text=True, timeout=30,
                       preexec_fn=_limit_files(1024))
    assert r.returncode == 2, r.stderr
    assert "open files" in r.stderr and "1024" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not [line for line in worker_connections(gearmand.address) if " fds:" in line]


@pytest.mark.parametrize("args, extra, message", [
    (["--threads", "100000"], "", "--threads must be at most 1000"),
    ([], "worker:\n  threads: 100000000000000000000000\n", "worker.threads: must be at most 1000"),
    ([], "worker:\n  threads: 1e23\n", "worker.threads"),
    ([], "worker:\n  keepalive: .inf\n", "worker.keepalive"),
])
def test_absurd_thread_counts_are_refused(gearmand, tmp_path, args, extra, message):
    cfg = write_config(tmp_path / "c.yaml", [gearmand.address], extra)
    r = run_script("worker_client/runworkers.py", "--config", str(cfg), "--name", "many", *args, timeout=30)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_descriptors_past_1024_work(gearmand_factory, start_worker, tmp_path):
    """300 threads and two servers: descriptor numbers go past 1024, where select() fails
    ("filedescriptor out of range", forever, while the worker looked started). Every thread
    attaches and serves."""
    a, b = gearmand_factory(queue="none"), gearmand_factory(queue="none")
    cfg = write_config(tmp_path / "many.yaml", [a.address, b.address], "worker:\n  poll_timeout: 5\n",
                       plugin_paths=[REPO / "plugins"])
    err = tmp_path / "many.err"  # a file, not an unread pipe: a full pipe would stall the worker's log
    proc = subprocess.Popen([sys.executable, str(REPO / "worker_client" / "runworkers.py"), "--config", str(cfg),
                             "--name", "many", "--threads", "300"], stdout=subprocess.DEVNULL,
                            stderr=err.open("w"), preexec_fn=_limit_files(4096))
    try:
        for srv in (a, b):
            wait_until(lambda: len([line for line in worker_connections(srv.address) if " many:" in line]) >= 301
                       or proc.poll() is not None, 60, message=f"300 threads attached to {srv.address}")
            assert proc.poll() is None
            outs = gc.run(srv.address, "eg.reverse", [f"x{i}" for i in range(300)], timeout=60)
            assert all(o.state == "complete" for o in outs)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert "out of range" not in err.read_text()


def test_a_thread_failing_again_and_again_ends_the_process_with_exit_1(gearmand, start_worker):
    """A worker thread whose every loop fails the same way (here a task corrupts it) does not
    loop forever looking alive: the process stops, exit 1, with the error in one line."""
    w = start_worker(gearmand, name="broken", threads=1, grace=2)
    gc.run_one(gearmand.address, "h.break", {}, timeout=10)
    assert w.wait(30) == 1
    assert "worker thread 1 failed 5 times in a row" in w.text()


def test_a_job_whose_answer_never_gets_out_is_failed_on_its_third_coming(gearmand, start_worker, tmp_path):
    """A task that breaks its own connection: the answer never reaches gearmand, which hands
    the job out again. The second time it goes unanswered, the worker fails it the next time
    it comes, without running it (before: it came back forever)."""
    w = start_worker(gearmand, name="cut", threads=1)
    rec = tmp_path / "runs.jsonl"
    o = gc.run_one(gearmand.address, "h.cut", {"file": str(rec)}, timeout=60)
    assert o.state == "failed" and "without running it again" in o.reason["error"]
    assert len(runs(rec)) == 2
    assert gc.run_one(gearmand.address, "eg.reverse", "ab", timeout=20).result == {"reversed": "ba"}
    assert w.proc.poll() is None


def test_a_task_raising_servererror_fails_its_job_instead_of_dropping_the_connection(gearmand, start_worker,
                                                                                     tmp_path):
    """A task that itself raises geartask's ServerError (say, it submits a sub-job and no server
    answers) fails like any task; the worker does not mistake it for its own connection's loss
    (before: it dropped the connection, gearmand handed the job out again, forever)."""
    w = start_worker(gearmand, name="srverr", threads=1)
    rec = tmp_path / "runs.jsonl"
    o = gc.run_one(gearmand.address, "h.server_error", {"file": str(rec), "retries": 0}, timeout=20)
    assert o.state == "failed" and "NoServerError" in o.reason["error"]
    assert len(runs(rec)) == 1
    assert not [e for e in w.log_lines() if e.get("event", "").startswith("server unreachable")]


def test_a_huge_rejected_payload_is_capped_in_the_dead_letter(gearmand, start_worker):
    """Tried: 2 MB of job data to a task that refuses it. Got: the dead letter keeps the size,
    a sha256 and the first 16 KiB, not 2 MB (before: whole payloads, 84 MB from a few jobs)."""
    w = start_worker(gearmand, name="huge", threads=1)
    payload = {"cmd": ["rm", "x" * 2_000_000]}
    o = gc.run_one(gearmand.address, "shell", payload, timeout=20)
    assert o.state == "failed" and len(json.dumps(o.reason)) < 20_000
    [d] = wait_until(lambda: dead_letters(w), 5, message="the dead letter")
    assert d["data_bytes"] > 2_000_000 and len(d["data_sha256"]) == 64 and "data" not in d
    assert len(d["data_head"]) == 16 * 1024


def _assign_once(task: str, data: bytes, on: str = "job"):
    """A fake gearmand script: on the first GRAB of a job (or control) connection, assign
    ``task``; NO_JOB to every other GRAB."""
    assigned = threading.Event()

    def script(conn, cmd, args):
        if cmd == gp.GRAB_JOB_UNIQ:
            if not assigned.is_set() and (conn.is_control == (on == "control")):
                assigned.set()
                conn.reply(gp.JOB_ASSIGN_UNIQ, "H:fake:1", task, "u-1", data)
            else:
                conn.reply(gp.NO_JOB)
    return script


def test_a_server_assigning_a_task_the_worker_does_not_serve_gets_a_failure(gearmand, start_worker):
    """A rogue server assigns a job of a function the worker never registered. Got: WORK_FAIL
    with the reason 'no such task'; the worker goes on (also with its real server)."""
    fake = FakeGearmand(_assign_once("not.ours", b"{}"))
    try:
        w = start_worker([fake.address, gearmand.address], name="rogue", threads=1, wait=False)
        w.wait_attached([gearmand.address])
        wait_until(lambda: fake.packets(gp.WORK_FAIL), 15, message="WORK_FAIL to the rogue server")
        [warning] = [a for a in fake.packets(gp.WORK_WARNING)]
        assert b"no such task" in warning["data"]
        assert gc.run_one(gearmand.address, "eg.reverse", "ab", timeout=10).result == {"reversed": "ba"}
        assert w.proc.poll() is None
    finally:
        fake.close()


def test_a_server_assigning_another_control_function_cannot_stop_the_worker(gearmand, start_worker):
    """A rogue server assigns a shutdown to the control connection under a control function
    that is not this process's. Got: WORK_FAIL; the worker keeps running."""
    fake = FakeGearmand(_assign_once("geartask.control:other:10.0.0.9:1", shutdown_request(), on="control"))
    try:
        w = start_worker([fake.address, gearmand.address], name="rogue2", threads=1, wait=False)
        w.wait_attached([gearmand.address])
        wait_until(lambda: fake.packets(gp.WORK_FAIL), 15, message="WORK_FAIL to the rogue server")
        assert not fake.packets(gp.WORK_COMPLETE)
        assert gc.run_one(gearmand.address, "eg.reverse", "ab", timeout=10).result == {"reversed": "ba"}
        assert w.proc.poll() is None
    finally:
        fake.close()


def test_a_server_talking_garbage_is_dropped_and_retried_with_backoff(gearmand, start_worker):
    """A 'server' that answers HTTP instead of Gearman: the worker drops it (logged once),
    retries with backoff rather than in a tight loop, and serves its real server meanwhile."""
    fake = FakeGearmand(lambda conn, cmd, args: None,
                        on_connect=lambda conn: conn.send_raw(b"HTTP/1.1 400 Bad Request\r\n\r\n"))
    try:
        w = start_worker([fake.address, gearmand.address], name="garbage", threads=2, wait=False)
        w.wait_attached([gearmand.address])
        assert gc.run_one(gearmand.address, "eg.reverse", "ab", timeout=10).result == {"reversed": "ba"}
        time.sleep(3)  # counting reconnections over a span of time is the point
        assert len(fake.connections) < 3 * 12, f"{len(fake.connections)} connections in ~3 s: a tight loop"
        outages = [e for e in w.log_lines() if e["event"].startswith("server unreachable")]
        assert len(outages) == 1 and "protocol error" in outages[0]["reason"]
    finally:
        fake.close()


def test_an_envelope_dated_far_ahead_and_a_job_over_max_packet_fail_once_unrun(gearmand, start_worker, tmp_path):
    """Tried: a job whose envelope says it was submitted a day from now (a wrong clock or a
    forger: its record would sort newest for ever), and a job bigger than the worker's
    gearman.max_packet. Got: each fails once with the reason, the task never runs, and the
    worker reads past the big one without buffering it (before: the first ran, the second
    failed with a KeyError after being read whole)."""
    w = start_worker(gearmand, name="future", threads=1, extra="gearman:\n  max_packet: 65536\n")
    rec = tmp_path / "runs.jsonl"
    ahead = b'\x1egeartask/1 {"at": %d}\n' % int(time.time() + 86400)
    o = gc.run_one(gearmand.address, "h.raise", ahead + json.dumps({"file": str(rec)}).encode(), timeout=15)
    assert o.state == "failed" and "ahead of this worker's clock" in o.reason["error"]
    big = json.dumps({"file": str(rec), "pad": "x" * 200_000}).encode()
    o = gc.run_one(gearmand.address, "h.raise", big, timeout=15)
    assert o.state == "failed" and "exceeds gearman.max_packet (65536 bytes)" in o.reason["error"]
    assert not rec.exists()  # neither ran
    assert gc.run_one(gearmand.address, "eg.reverse", "ok", timeout=10).result == {"reversed": "ko"}
    assert w.proc.poll() is None
