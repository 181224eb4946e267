"""The worker runner with real gearmand servers, real worker processes and real clients."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

import gearclient as gc
from geartask import gearman as gp
from geartask.control import shutdown_request
from helpers import REPO, PYTHON, run_script, wait_until, write_config
from workers import WorkerProc, in_process_worker, worker_connections

TEST_PLUGINS = Path(__file__).parent / "testplugins"
# outcomes.report off: these tests follow failures through the local dead-letter file
# (tests/test_worker_outcomes.py has the outcomes).
SHELL = """outcomes:
  report: false
worker:
  grace: {grace}
  poll_timeout: 1
  retry_backoff: 0.05
  shell:
    allow: {allow}
    heartbeat: 0.2
"""


@pytest.fixture
def start_worker(tmp_path):
    started: list[WorkerProc] = []

    def start(servers, name="w1", threads=2, grace=30, extra="", args=(), wait=True, config_name=None,
              allow='[echo, sleep, "false"]'):
        servers = servers if isinstance(servers, list) else [servers]
        addrs = [s.address if hasattr(s, "address") else s for s in servers]
        cfg = write_config(tmp_path / (config_name or f"{name}.yaml"), addrs, SHELL.format(grace=grace, allow=allow) + extra,
                           plugin_paths=[REPO / "plugins", TEST_PLUGINS])
        w = WorkerProc(cfg, name, threads, *args)
        started.append(w)
        if wait:
            w.wait_attached([a for a in addrs])
        return w

    yield start
    for w in started:
        w.stop()


def wait_running(server, function: str, timeout: float = 10) -> None:
    """Until gearmand's status shows one job of ``function``, and it running."""
    wait_until(lambda: any(l.startswith(f"{function}\t1\t1\t")
                           for l in gp.admin_command("127.0.0.1", server.port, "status")),
               timeout, message=f"a {function} job running")


def records(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def test_plugin_task_and_shell_results(gearmand, start_worker):
    start_worker(gearmand)
    o = gc.run_one(gearmand.address, "eg.reverse", "geartask")
    assert o.state == "complete" and o.result == {"reversed": "ksatraeg"}
    o = gc.run_one(gearmand.address, "shell", {"cmd": ["echo", "hello", "world"]})
    assert o.state == "complete"
    assert o.result["returncode"] == 0 and o.result["output"] == "hello world\n"
    assert o.result["attempts"] == 1 and o.result["timed_out"] is False and o.result["cut"] is False
    assert o.result["worker"].startswith("w1:")


def test_client_ids_name_ip_pid_thread(gearmand, start_worker):
    w = start_worker(gearmand, name="idtest", threads=3)
    lines = [l for l in worker_connections(gearmand.address) if " idtest:" in l]
    ids = sorted(l.split()[2] for l in lines)
    ip = ids[0].split(":")[1]
    assert ids == [f"idtest:{ip}:{w.pid}:{i}" for i in range(4)]
    control = [l for l in lines if l.split()[2].endswith(":0")][0]
    assert control.split(":", 4)[-1].split() == [f"geartask.control:idtest:{ip}:{w.pid}"]
    start = wait_until(lambda: [e for e in w.log_lines() if e["event"] == "worker started"], 5,
                       message="the start line in the log")[0]
    assert start["threads"] == 3 and start["pid"] == w.pid and "shell" in start["tasks"]


@pytest.mark.parametrize("data, reason", [
    ({"cmd": ["rm", "-rf", "/tmp/x"]}, "not on this worker's allowlist"),
    ({"cmd": "echo hi"}, "not a string"),
    ({"cmd": ["/bin/echo", "hi"]}, "not on this worker's allowlist"),
    ("not json at all", "must be a JSON object"),
    ({"cmd": ["echo"], "timeout": -1}, "'timeout' must be"),
])
def test_shell_refusals_fail_the_job_with_the_reason_and_not_the_worker(gearmand, start_worker, data, reason):
    w = start_worker(gearmand, threads=1)
    o = gc.run_one(gearmand.address, "shell", data)
    assert o.state == "failed"
    assert reason in o.reason["error"] and o.reason["attempts"] == 1
    # the same (only) thread goes on serving
    assert gc.run_one(gearmand.address, "shell", {"cmd": ["echo", "ok"]}).result["output"] == "ok\n"
    assert w.proc.poll() is None


def test_empty_allowlist_refuses_everything(gearmand, start_worker):
    start_worker(gearmand, name="noshell", allow="[]")
    o = gc.run_one(gearmand.address, "shell", {"cmd": ["echo", "hi"]})
    assert o.state == "failed" and "allowed: nothing" in o.reason["error"]


def test_allowed_names_are_found_once_at_start_and_a_missing_one_is_refused(gearmand, start_worker):
    w = start_worker(gearmand, allow="[echo, no-such-program-geartask, /no/such/program]")
    lines = wait_until(lambda: (lambda ls: ls if any(e["event"] == "worker started" for e in ls) else None)(
        w.log_lines()), 5, message="the start lines in the log")
    missing = [e["program"] for e in lines if e["event"].startswith("allowed program not found at start")]
    assert missing == ["no-such-program-geartask", "/no/such/program"]
    [found] = [e["programs"] for e in lines if e["event"] == "shell programs"]
    assert os.path.isabs(found["echo"]) and os.path.samefile(found["echo"], shutil.which("echo"))
    for program in missing:
        o = gc.run_one(gearmand.address, "shell", {"cmd": [program]})
        assert o.state == "failed" and o.reason["attempts"] == 1 and "did not find it at start" in o.reason["error"]
    assert gc.run_one(gearmand.address, "shell", {"cmd": ["echo", "ok"]}).result["output"] == "ok\n"


def test_retries_are_counted_and_the_client_sees_failure_with_reason(gearmand, start_worker, tmp_path):
    w = start_worker(gearmand, extra="")
    o = gc.run_one(gearmand.address, "shell", {"cmd": ["false"], "retries": 2})
    assert o.state == "failed"
    assert o.reason["attempts"] == 3 and o.reason["returncode"] == 1 and o.reason["error"] == "exit status 1"
    o = gc.run_one(gearmand.address, "eg.flaky", {})
    assert o.state == "complete" and o.result == {"ok": True, "attempt": 2}
    o = gc.run_one(gearmand.address, "t.fail", {"retries": 1})
    assert o.state == "failed" and o.reason["attempts"] == 2 and "ValueError: always fails" in o.reason["error"]
    def shell_attempts():
        outcomes = [e["outcome"] for e in w.log_lines() if e.get("event") == "job" and e.get("task") == "shell"]
        return outcomes if "failed" in outcomes else None
    attempts = wait_until(shell_attempts, 5, message="the job lines in the log (written every 50 ms)")
    assert attempts == ["retrying", "retrying", "failed"]
    # every final failure is kept in the dead-letter file
    dead = [json.loads(l) for l in (w.config.parent / "logs" / "dead-letter.jsonl").read_text().splitlines()]
    assert {d["task"] for d in dead} == {"shell", "t.fail"}
    assert all(d["unique"] and d["reason"] and d["attempts"] >= 2 and d["worker"] for d in dead)


def test_the_c_gearman_client_sees_a_failure_and_its_reason(gearmand, start_worker):
    start_worker(gearmand)
    r = subprocess.run(["gearman", "-p", str(gearmand.port), "-h", "127.0.0.1", "-f", "shell",
                        json.dumps({"cmd": ["false"], "retries": 0})],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "exit status 1" in r.stderr


def test_a_hanging_command_is_killed_at_its_timeout_and_the_thread_goes_on(gearmand, start_worker):
    start_worker(gearmand, threads=1)
    t0 = time.monotonic()
    o = gc.run_one(gearmand.address, "shell", {"cmd": ["sleep", "987.25"], "timeout": 1, "retries": 0})
    assert o.state == "failed" and o.reason["timed_out"] is True
    assert time.monotonic() - t0 < 15
    assert gc.run_one(gearmand.address, "shell", {"cmd": ["echo", "next"]}).result["output"] == "next\n"
    assert "987.25" not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout


def test_progress_partial_data_and_heartbeats_reach_the_client(gearmand, start_worker):
    start_worker(gearmand)
    o = gc.run_one(gearmand.address, "t.progress", {})
    assert o.result == "done" and o.statuses == [(1, 3), (2, 3), (3, 3)]
    assert o.data == [{"part": 1}, {"part": 2}, {"part": 3}]
    o = gc.run_one(gearmand.address, "shell", {"cmd": ["sleep", "1"], "timeout": 5})
    assert o.state == "complete" and len(o.statuses) >= 2 and all(d == 5 for _, d in o.statuses)


def test_shutdown_control_job_with_ten_thousand_jobs_queued(gearmand_factory, start_worker, tmp_path):
    server = gearmand_factory(queue="none")  # queueing 10,000 jobs in sqlite alone takes seconds
    addr = server.address
    w = start_worker(server, threads=2)
    conn = gc.connect(addr)
    rec = tmp_path / "rec.jsonl"
    gc.submit(conn, "t.record", [{"file": str(rec), "sleep": 0.05, "id": i} for i in range(10_000)],
              background=True)
    wait_until(lambda: len(records(rec)) >= 4, 10, message="jobs running")
    control = [l.split()[-1] for l in worker_connections(addr) if f":{w.pid}:0 " in l][0]
    t0 = time.monotonic()
    conn.send(gp.submit_command("high", True), task=control, unique="stop-1", data=shutdown_request())
    conn.expect(gp.JOB_CREATED, 5)
    assert w.wait(30) == 0
    elapsed = time.monotonic() - t0
    assert elapsed < 5, f"shutdown took {elapsed:.1f}s with 10,000 jobs queued"
    done = len(records(rec))
    assert gc.queued(addr, "t.record") == 10_000 - done  # nothing lost: the rest is still queued
    conn.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_lets_the_job_in_flight_finish(gearmand, start_worker, tmp_path, sig):
    """SIGHUP (the worker's terminal closed) is a graceful shutdown too."""
    w = start_worker(gearmand, threads=1)
    rec = tmp_path / "rec.jsonl"
    conn = gc.connect(gearmand.address)
    started = tmp_path / "started"
    [h] = gc.submit(conn, "t.record", [{"file": str(rec), "sleep": 2.0, "id": "inflight", "started": str(started)}])
    # not gearmand's "running" (it says so at JOB_ASSIGN): a job the worker has not begun when the
    # signal comes is not in flight, and goes back to the queue
    wait_until(started.exists, 10, message="the worker to begin the job")
    w.signal(sig)
    out = gc.wait(conn, [h], 15)
    assert out[h].state == "complete"
    assert w.wait(15) == 0
    assert [e["reason"] for e in w.log_lines() if e["event"] == "shutdown requested"] == [sig.name]
    conn.close()


def test_a_job_still_running_after_the_grace_is_requeued_and_completed_elsewhere(fresh_gearmand, start_worker):
    w1 = start_worker(fresh_gearmand, name="short", threads=1, grace=0.5)
    conn = gc.connect(fresh_gearmand.address)
    [h] = gc.submit(conn, "shell", [{"cmd": ["sleep", "2"], "timeout": 30}])
    wait_running(fresh_gearmand, "shell")
    w1.signal(signal.SIGTERM)
    assert w1.wait(15) == 0
    start_worker(fresh_gearmand, name="second", threads=1)
    out = gc.wait(conn, [h], 30)
    assert out[h].state == "complete" and out[h].result["worker"].startswith("second:")
    conn.close()


def test_kill_9_mid_job_the_job_is_completed_by_another_worker(fresh_gearmand, start_worker, tmp_path):
    rec = tmp_path / "rec.jsonl"
    w1 = start_worker(fresh_gearmand, name="victim", threads=1)
    conn = gc.connect(fresh_gearmand.address)
    [h] = gc.submit(conn, "t.record", [{"file": str(rec), "sleep": 3, "id": "x"}])
    wait_running(fresh_gearmand, "t.record")
    w1.signal(signal.SIGKILL)
    w1.wait(10)
    w2 = start_worker(fresh_gearmand, name="rescuer", threads=1)
    out = gc.wait(conn, [h], 30)
    assert out[h].state == "complete" and out[h].result["pid"] == w2.pid
    conn.close()


def test_two_servers_one_killed_mid_run_every_job_completes(gearmand_factory, start_worker, tmp_path):
    a, b = gearmand_factory(), gearmand_factory()
    start_worker([a, b], threads=4)
    rec = tmp_path / "rec.jsonl"
    for srv, tag in ((a, "a"), (b, "b")):
        conn = gc.connect(srv.address)
        gc.submit(conn, "t.record", [{"file": str(rec), "sleep": 0.01, "id": f"{tag}{i}"} for i in range(300)],
                  background=True)
        conn.close()
    wait_until(lambda: len(records(rec)) >= 60, 20, message="jobs running")
    a.kill()
    wait_until(lambda: {r["id"] for r in records(rec)} >= {f"b{i}" for i in range(300)}, 30,
               message="server b's jobs all done while a is down")
    a.start()  # same sqlite queue: a's unfinished background jobs come back and are served
    wait_until(lambda: {r["id"] for r in records(rec)} >= {f"{t}{i}" for t in "ab" for i in range(300)}, 60,
               message="every job of both servers done")


def test_no_starvation_with_two_servers(gearmand_factory, start_worker, tmp_path):
    a, b = gearmand_factory(queue="none"), gearmand_factory(queue="none")
    start_worker([a, b], name="s1", threads=4)
    start_worker([a, b], name="s2", threads=4)
    rec = tmp_path / "rec.jsonl"
    clients = [subprocess.Popen([PYTHON, str(Path(__file__).parent / "gearclient.py"), srv.address, "t.record",
                                 "500", json.dumps({"file": str(rec), "sleep": 0.01, "id": tag})],
                                stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
               for srv, tag in ((a, "a"), (b, "b"))]
    for c in clients:
        out, _ = c.communicate(timeout=120)
        assert json.loads(out) == {"complete": 500, "total": 500}
    rows = records(rec)
    assert len({r["id"] for r in rows}) == 1000
    second_half = rows[len(rows) // 2:]
    threads = {(r["pid"], r["thread"]) for r in second_half}
    assert len(threads) == 8, f"only {len(threads)} of 8 worker threads got jobs in the second half"


def test_a_server_down_at_start_is_attached_when_it_comes_up(gearmand_factory, start_worker, tmp_path):
    up = gearmand_factory()
    down = gearmand_factory()
    down.stop()
    w = start_worker([up.address, down.address], threads=2, wait=False)
    w.wait_attached([up.address])
    assert gc.run_one(up.address, "eg.reverse", "ab").result == {"reversed": "ba"}
    down.start()
    w.wait_attached([down.address], timeout=30)
    assert gc.run_one(down.address, "eg.reverse", "cd").result == {"reversed": "dc"}
    outages = [e for e in w.log_lines() if e["event"].startswith("server unreachable")]
    assert len(outages) == 1 and outages[0]["server"] == down.address


def test_idle_threads_do_not_spin(gearmand, start_worker):
    w = start_worker(gearmand, threads=10)

    def cpu() -> float:
        fields = Path(f"/proc/{w.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    c0, t0 = cpu(), time.monotonic()
    time.sleep(3)  # measuring idleness is the point: nothing to wait for
    used = cpu() - c0
    assert used / (time.monotonic() - t0) < 0.05, f"idle worker used {used:.2f} CPU s in 3 s"


@pytest.mark.parametrize("args, message", [
    (["--threads", "0"], "--threads must be at least 1"),
    (["--name", "has space"], "without spaces"),
    (["--plugins", "nosuch"], "unknown plugin 'nosuch'; available:"),
    (["--servers", "localhost:notaport"], "bad port"),
])
def test_bad_input_exits_2_with_a_message_and_starts_nothing(gearmand, tmp_path, args, message):
    cfg = write_config(tmp_path / "c.yaml", [gearmand.address])
    r = run_script("worker_client/runworkers.py", "--config", str(cfg), "--name", "bad", "--threads", "1", *args,
                   timeout=30)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not [l for l in worker_connections(gearmand.address) if " bad:" in l]


def test_a_plugin_that_registers_shell_is_refused(gearmand, tmp_path):
    plugdir = tmp_path / "plugs"
    plugdir.mkdir()
    (plugdir / "evil.py").write_text("from geartask import hookimpl\n\n@hookimpl\n"
                                     "def geartask_tasks():\n    return {'shell': lambda job: 'pwned'}\n")
    cfg = write_config(tmp_path / "c.yaml", [gearmand.address], plugin_paths=[plugdir])
    r = run_script("worker_client/runworkers.py", "--config", str(cfg), "--name", "x", "--threads", "1", timeout=30)
    assert r.returncode == 2 and "evil" in r.stderr and "built-in shell task" in r.stderr


def test_runs_from_inside_worker_client_folder(gearmand, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", [gearmand.address])
    r = subprocess.run([PYTHON, "runworkers.py", "--config", str(cfg), "--threads", "0"],
                       cwd=REPO / "worker_client", capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--threads must be at least 1" in r.stderr


def test_a_server_that_accepts_but_never_answers_does_not_hold_up_the_others(gearmand, start_worker):
    import socket
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # the kernel completes every handshake; nobody ever reads or answers
    try:
        w = start_worker([f"127.0.0.1:{silent.getsockname()[1]}", gearmand.address], threads=2, wait=False)
        w.wait_attached([gearmand.address])
        t0 = time.monotonic()
        outs = gc.run(gearmand.address, "eg.reverse", ["x", "y", "z"], timeout=20)
        assert [o.result for o in outs] == [{"reversed": c} for c in "xyz"]
        assert time.monotonic() - t0 < 3, "jobs on the live server waited for the silent one"
    finally:
        silent.close()


def test_a_second_signal_exits_at_once_and_the_job_is_requeued(fresh_gearmand, start_worker):
    w = start_worker(fresh_gearmand, name="impatient", threads=1, grace=60)
    conn = gc.connect(fresh_gearmand.address)
    [h] = gc.submit(conn, "shell", [{"cmd": ["sleep", "31.5"], "timeout": 60}])
    wait_running(fresh_gearmand, "shell")
    # gearmand counts it running at JOB_ASSIGN; the signal must find the command started
    wait_until(lambda: "sleep 31.5" in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout,
               10, message="the command running")
    w.signal(signal.SIGTERM)
    wait_until(lambda: any(e["event"] == "shutdown requested" for e in w.log_lines()), 5, message="first signal seen")
    t0 = time.monotonic()
    w.signal(signal.SIGTERM)
    assert w.wait(10) == 1
    assert time.monotonic() - t0 < 5
    wait_until(lambda: "sleep 31.5" not in subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                                          text=True).stdout, 10, message="the command killed too")
    # the job was not lost: gearmand holds it for the next worker
    wait_until(lambda: any(l.startswith("shell\t1\t0\t") for l in
                           gp.admin_command("127.0.0.1", fresh_gearmand.port, "status")), 10, message="requeued")
    conn.close()


def test_idle_threads_are_not_all_woken_for_every_job(gearmand, make_config):
    """One thread per server sleeps; the rest park, so a job does not wake eight threads."""
    _, config = make_config(gearmand, "worker:\n  poll_timeout: 30\n")
    with in_process_worker(config, gearmand.address, "herd", 8) as process:
        wait_until(lambda: sum(t.no_jobs for t in process.job_threads) >= 8, 10, message="all threads idle")
        before = sum(t.no_jobs for t in process.job_threads)
        for i in range(40):
            assert gc.run_one(gearmand.address, "eg.reverse", f"j{i}").state == "complete"
        per_job = (sum(t.no_jobs for t in process.job_threads) - before) / 40
        assert per_job < 4, f"{per_job:.1f} empty grabs per job: idle threads are woken for every job"
        # and a burst still spreads over the threads
        outs = gc.run(gearmand.address, "eg.slow", [{"seconds": 0.3}] * 8, timeout=30)
        assert all(o.state == "complete" for o in outs)
        assert sum(t.jobs_done > 0 for t in process.job_threads) == 8


def test_a_plugin_task_past_job_timeout_fails_and_its_thread_is_replaced(gearmand, start_worker):
    w = start_worker(gearmand, name="stuck", threads=1, extra="  job_timeout: 1\n")
    t0 = time.monotonic()
    o = gc.run_one(gearmand.address, "t.hang", {"seconds": 60, "retries": 0})
    assert o.state == "failed" and o.reason["timed_out"] is True and "job_timeout" in o.reason["error"]
    assert time.monotonic() - t0 < 10
    # the one thread is stuck in time.sleep; its replacement serves the next job
    assert gc.run_one(gearmand.address, "eg.reverse", "ok", timeout=10).result == {"reversed": "ko"}
    ids = [l.split()[2] for l in worker_connections(gearmand.address) if " stuck:" in l]
    assert sorted(i.rsplit(":", 1)[1] for i in ids) == ["0", "1"]  # no stale connection left
    dead = (w.config.parent / "logs" / "dead-letter.jsonl").read_text()
    assert "t.hang" in dead and "timed out" in dead
    w.signal(signal.SIGTERM)
    assert w.wait(15) == 0  # the stuck thread does not hold up the exit


# -- the dead-letter file ---------------------------------------------------------------------
def _record(i: int, size: int = 1000) -> dict:
    from geartask.worker.dead_letters import payload_fields
    return {"task": "t", "unique": f"u{i}", **payload_fields(b"x" * size)}


def test_dead_letters_rotate_by_size_and_keep_a_few_backups(tmp_path):
    from geartask.worker.dead_letters import DeadLetters
    path = tmp_path / "dead-letter.jsonl"
    dl = DeadLetters(path, max_bytes=20_000, backups=2)
    for i in range(100):
        dl.append(_record(i))
    files = sorted(tmp_path.glob("dead-letter.jsonl*"))
    assert [f.name for f in files if not f.name.endswith(".lock")] == \
        ["dead-letter.jsonl", "dead-letter.jsonl.1", "dead-letter.jsonl.2"]
    for f in (path, Path(f"{path}.1"), Path(f"{path}.2")):
        assert f.stat().st_size <= 20_000
        assert all(json.loads(line)["task"] == "t" for line in f.read_text().splitlines())
    assert json.loads(path.read_text().splitlines()[-1])["unique"] == "u99"


def test_dead_letters_from_many_processes_are_whole_lines_across_rotations(tmp_path):
    path = tmp_path / "dead-letter.jsonl"
    code = ("import sys; from geartask.worker.dead_letters import DeadLetters, payload_fields; "
            f"dl = DeadLetters({str(path)!r}, max_bytes=50_000, backups=100); "
            "[dl.append({'p': sys.argv[1], 'i': i, **payload_fields(b'y' * 500)}) for i in range(200)]")
    procs = [subprocess.Popen([PYTHON, "-c", code, str(p)], cwd=REPO) for p in range(4)]
    assert [p.wait(60) for p in procs] == [0, 0, 0, 0]
    lines = [line for f in tmp_path.glob("dead-letter.jsonl*") if not f.name.endswith(".lock")
             for line in f.read_text().splitlines()]
    got = sorted((r["p"], r["i"]) for r in map(json.loads, lines))
    assert got == sorted((str(p), i) for p in range(4) for i in range(200))


def test_a_dead_letter_that_does_not_fit_on_disk_leaves_no_half_line(tmp_path):
    """A full disk (here: the file-size limit) cuts a write short: the part written is taken
    back, so the next record is not glued to half a line. A half line left by a crash is
    ended before the next record is appended."""
    path = tmp_path / "dead-letter.jsonl"
    path.write_text(json.dumps({"before": 1}) + "\n")
    code = ("import resource, signal, sys; from geartask.worker.dead_letters import DeadLetters; "
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.RLIM_INFINITY)); "
            f"dl = DeadLetters({str(path)!r})\n"
            "try:\n    dl.append({'big': 'z' * 5000})\nexcept OSError as e:\n    print('refused:', e)\n")
    r = subprocess.run([PYTHON, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "refused:" in r.stdout, r.stderr
    assert path.read_text() == json.dumps({"before": 1}) + "\n"
    with path.open("a") as f:
        f.write('{"torn": ')  # a writer that died mid-line
    from geartask.worker.dead_letters import DeadLetters
    DeadLetters(path).append({"after": 2})
    lines = path.read_text().splitlines()
    assert lines == ['{"before": 1}', '{"torn": ', '{"after": 2}']
