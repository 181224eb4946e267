"""The sender (issue 4): real gearmand, real runworkers.py workers, the CLI and JobSender.

What each test proves is in its name and docstring; every wait has a deadline.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from geartask import gearman as gp
from geartask.cli import run
from geartask.config import load_config
from geartask.errors import JobDefinitionError, NoServerError, UsageError
from geartask.server import LocalServer, free_port
from geartask.sender import batch, sender as clients
from geartask.sender.sender import JobSender
from geartask.sender.progress import render
from geartask.sender.cli import main

from helpers import PYTHON, REPO, run_on_a_terminal, run_script, wait_until, write_config
from test_outcomes_collector import collectors  # noqa: F401 (a fixture)
from workers import WorkerProc

SCRIPT = "send_job_client/send_job_client.py"

# Tasks for these tests: each run appends a line to data["file"] *before* it sleeps, so a
# test can count runs and see order; it reports WORK_STATUS so a test can see it running.
SENDER_PLUGIN = '''
import json, os, time
from geartask import hookimpl

def count(job):
    d = job.data
    fd = os.open(d["file"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, (json.dumps({"id": d.get("id"), "unique": job.unique, "handle": job.handle}) + "\\n").encode())
    os.close(fd)
    job.status(1, 2)
    time.sleep(float(d.get("sleep", 0)))
    return {"id": d.get("id")}

@hookimpl
def geartask_tasks():
    return {"st.count": count}
'''

EXTRA = """worker:
  shell:
    allow: [echo, uname, ls]
sender:
  connect_timeout: 10
  submit_timeout: 2
"""


@pytest.fixture
def setup(tmp_path):
    """setup(servers, extra='') -> config path: eg plugins plus this file's st.count plugin."""
    plugdir = tmp_path / "splugins"
    plugdir.mkdir()
    (plugdir / "sendertest.py").write_text(SENDER_PLUGIN)

    def make(servers, extra: str = EXTRA, name: str = "config.yaml") -> Path:
        addrs = [s.address if isinstance(s, LocalServer) else s for s in servers]
        path = write_config(tmp_path / name, addrs, extra)
        text = path.read_text().replace(f"paths: [{REPO / 'plugins'}]", f"paths: [{REPO / 'plugins'}, {plugdir}]")
        path.write_text(text)
        return path
    return make


@pytest.fixture
def workers():
    """workers(config, name, threads, servers) -> a started, attached runworkers.py process."""
    started: list[WorkerProc] = []

    def start(config: Path, servers, name: str = "w1", threads: int = 2) -> WorkerProc:
        w = WorkerProc(config, name, threads)
        started.append(w)
        return w.wait_attached([s.address if isinstance(s, LocalServer) else s for s in servers])
    yield start
    for w in started:
        w.stop()


def runs(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def queued(server: LocalServer, fn: str) -> int:
    for line in gp.admin_command(server.host, server.port, "status"):
        parts = line.split("\t")
        if parts[0] == fn:
            return int(parts[1])
    return 0


def cli(argv, capsys):
    """Run the CLI in-process (fast); returns (exit status, stdout, stderr)."""
    rc = run(main, argv)
    out, err = capsys.readouterr()
    return rc, out, err


# -- the eg plugin end to end, foreground / background / --no-wait ------------------------------

def test_eg_plugin_end_to_end_json(fresh_gearmand, setup, workers):
    """`plugin eg --json`: every eg job completes on real workers; stdout is only JSON lines."""
    cfg = setup([fresh_gearmand])
    workers(cfg, [fresh_gearmand], threads=3)
    r = run_script(SCRIPT, "--config", str(cfg), "plugin", "eg", "--json", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [json.loads(l) for l in r.stdout.splitlines()]
    assert len(lines) == 6  # one per job, in the order they finished
    assert sorted(l["task"] for l in lines) == ["eg.flaky", "eg.reverse", "eg.wordcount", "shell", "shell", "shell"]
    for l in lines:
        assert set(l) == {"task", "unique", "handle", "server", "state", "result", "attempts", "submissions",
                          "seconds"}
        assert l["state"] == "complete" and l["server"] == fresh_gearmand.address and l["submissions"] == 1
    by_task = {l["task"]: l for l in lines}
    assert by_task["eg.reverse"]["result"] == {"reversed": "ksatraeg"}
    assert by_task["eg.reverse"]["unique"] == "eg-reverse-1"
    assert by_task["eg.flaky"]["result"]["attempt"] == 2  # eg.flaky failed once and the worker retried it
    assert "hello from a geartask worker\n" in [l["result"].get("output") for l in lines if l["task"] == "shell"]


def test_job_and_shell_text_output(fresh_gearmand, setup, workers, capsys):
    """`job TASK DATA` and `shell -- CMD`: one line per job plus a summary, exit 0."""
    cfg = setup([fresh_gearmand])
    workers(cfg, [fresh_gearmand])
    rc, out, err = cli(["--config", str(cfg), "job", "eg.reverse", "abc"], capsys)
    assert rc == 0, err
    assert re.search(r"^complete +eg\.reverse .* attempts=1 submissions=1 .*\{\"reversed\": \"cba\"\}", out, re.M)
    assert "1 job(s): 1 complete" in out
    rc, out, err = cli(["--config", str(cfg), "shell", "--timeout", "5", "--", "echo", "-n", "hi"], capsys)
    assert rc == 0, err
    assert '"output": "hi"' in out
    # A command the workers refuse is a failed job: exit 1 and the worker's reason.
    rc, out, err = cli(["--config", str(cfg), "shell", "--json", "--", "rm", "-rf", "/nonexistent"], capsys)
    assert rc == 1
    (line,) = [json.loads(l) for l in out.splitlines()]
    assert line["state"] == "failed" and "allow" in json.dumps(line["error"])


def test_attempts_are_the_workers_and_submissions_the_senders(fresh_gearmand, setup, workers, capsys):
    """A command that fails and is retried twice by the worker: attempts=3 (from the worker's
    reason) but submissions=1, in the text line and in --json."""
    cfg = setup([fresh_gearmand])
    workers(cfg, [fresh_gearmand])
    argv = ["--config", str(cfg), "shell", "--retries", "2"]
    cmd = ["--", "ls", "/nonexistent-geartask"]
    rc, out, err = cli([*argv, *cmd], capsys)
    assert rc == 1, err
    assert re.search(r"^failed +shell .* attempts=3 submissions=1 .*error: ", out, re.M), out
    rc, out, err = cli([*argv, "--json", *cmd], capsys)
    (line,) = [json.loads(l) for l in out.splitlines()]
    assert (line["state"], line["attempts"], line["submissions"]) == ("failed", 3, 1)


def test_a_job_that_succeeded_on_a_retry_shows_the_workers_attempts(fresh_gearmand, setup, workers):
    """eg.flaky fails once and succeeds on the worker's retry: 2 attempts, 1 submission
    (it showed attempts=1 next to a result saying attempt 2)."""
    cfg = setup([fresh_gearmand])
    workers(cfg, [fresh_gearmand])
    with JobSender(load_config(cfg)) as sender:
        r = sender.submit("eg.flaky", {}, timeout=30)
    assert r.state == "complete" and r.result["attempt"] == 2 and r.submissions == 1
    assert r.attempts == 2 and r.warnings == []


def test_a_failed_job_is_reported_once(fresh_gearmand, setup, workers):
    """stderr not a terminal: the failure is the stdout line; the console log does not repeat
    it (it is in the log file, at info)."""
    cfg = setup([fresh_gearmand])
    workers(cfg, [fresh_gearmand])
    r = run_script(SCRIPT, "--config", str(cfg), "shell", "--retries", "0", "--", "ls", "/nonexistent-geartask",
                   timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert len([l for l in r.stdout.splitlines() if l.startswith("failed")]) == 1
    assert "job failed" not in r.stderr and "nonexistent-geartask" not in r.stderr, r.stderr
    logged = [json.loads(l) for l in (cfg.parent / "logs" / "sender.log").read_text().splitlines()]
    (failed,) = [e for e in logged if e["event"] == "job failed"]
    assert failed["level"] == "info" and failed["attempts"] == 1 and failed["submissions"] == 1


def test_background_then_status(fresh_gearmand, setup, workers, capsys, collectors):
    """`plugin eg --background` returns at once with handles; `status` reports queued, then
    complete (the outcomes collector says so)."""
    cfg = setup([fresh_gearmand])
    rc, out, err = cli(["--config", str(cfg), "plugin", "eg", "--background", "--json"], capsys)
    assert rc == 0, err
    lines = [json.loads(l) for l in out.splitlines()]
    assert len(lines) == 6 and all(l["state"] == "queued" and l["handle"] for l in lines)
    assert all(l["attempts"] is None and l["submissions"] == 1 for l in lines)  # no worker has run them yet
    record = cfg.parent / "logs" / "sender-background.jsonl"
    recs = [json.loads(l) for l in record.read_text().splitlines()]
    assert [r["handle"] for r in recs] == [l["handle"] for l in lines]
    assert all(r["server"] == fresh_gearmand.address for r in recs)

    rc, out, err = cli(["--config", str(cfg), "status", "--json"], capsys)
    assert rc == 0, err
    states = [json.loads(l) for l in out.splitlines()]
    assert [s["state"] for s in states] == ["queued"] * 6 and all(s["known"] for s in states)

    collectors(cfg, [fresh_gearmand.address])
    workers(cfg, [fresh_gearmand], threads=3)

    def all_done():
        rc, out, _ = cli(["--config", str(cfg), "status", "--json"], capsys)
        return rc == 0 and all(json.loads(l)["state"] == "complete" for l in out.splitlines())
    wait_until(all_done, 20, 0.2, "every background job complete")
    # Handles as a user pastes them (bare, or HANDLE@SERVER as printed); text output.
    rc, out, err = cli(["--config", str(cfg), "status", lines[0]["handle"],
                        f"{lines[1]['handle']}@{fresh_gearmand.address}"], capsys)
    assert rc == 0, err
    assert out.splitlines()[0].startswith("complete") and "eg.reverse [eg-reverse-1]" in out
    assert '-> {"reversed": "ksatraeg"}' in out
    assert "2 job(s): 2 complete" in out


def test_no_wait_jobs_survive_the_sender(fresh_gearmand, setup, workers, capsys):
    """--no-wait returns once accepted; the jobs still run after the sender has exited
    (a plain foreground job would be dropped by gearmand when its client goes)."""
    cfg = setup([fresh_gearmand])
    out_file = cfg.parent / "runs.jsonl"
    rc, out, err = cli(["--config", str(cfg), "job", "st.count", json.dumps({"file": str(out_file)}),
                        "--no-wait", "--json"], capsys)
    assert rc == 0, err
    (line,) = [json.loads(l) for l in out.splitlines()]
    assert line["state"] == "queued" and line["handle"]
    assert queued(fresh_gearmand, "st.count") == 1
    workers(cfg, [fresh_gearmand])
    wait_until(lambda: len(runs(out_file)) == 1, 15, message="the --no-wait job ran")


# -- priority ----------------------------------------------------------------------------

def test_high_priority_job_is_served_next(fresh_gearmand, setup, workers):
    """One worker thread, a queue of low jobs, then one high job: the high one runs first."""
    cfg = setup([fresh_gearmand])
    out_file = cfg.parent / "runs.jsonl"
    jobs = [{"task": "st.count", "data": {"file": str(out_file), "id": f"low{i}"}, "priority": "low"}
            for i in range(5)]
    jobs.append({"task": "st.count", "data": {"file": str(out_file), "id": "high"}, "priority": "high"})
    results = []
    sender = JobSender(load_config(cfg))
    t = threading.Thread(target=lambda: results.extend(sender.submit_many(jobs, timeout=30)))
    t.start()
    try:
        wait_until(lambda: queued(fresh_gearmand, "st.count") == 6, 10, message="6 jobs queued")
        workers(cfg, [fresh_gearmand], threads=1)
        t.join(30)
    finally:
        t.join(30)
        sender.close()
    assert [r.state for r in results] == ["complete"] * 6
    order = [r["id"] for r in runs(out_file)]
    assert order[0] == "high", order
    assert order[1:] == [f"low{i}" for i in range(5)]


# -- never lose a job --------------------------------------------------------------------

def test_server_starting_3s_after_the_sender(tmp_path, setup, workers):
    """The sender keeps trying until a server comes up (3 s later); the job then runs once."""
    port = free_port()
    server = LocalServer("127.0.0.1", port, tmp_path / "late", queue_type="none")
    cfg = setup([server.address])
    out_file = tmp_path / "runs.jsonl"
    errors = []

    def later():
        try:
            time.sleep(3)  # the scenario itself: the server appears 3 s after the sender starts
            server.start()
            workers(cfg, [server])
        except Exception as e:  # reported by the main thread's assertion
            errors.append(e)
    t = threading.Thread(target=later)
    t0 = time.monotonic()
    t.start()
    try:
        with JobSender(load_config(cfg)) as sender:
            r = sender.submit("st.count", {"file": str(out_file)}, timeout=30)
    finally:
        t.join(20)
        server.stop(timeout=5)
    assert not errors, errors
    assert r.state == "complete", r
    assert time.monotonic() - t0 >= 3
    assert len(runs(out_file)) == 1 and runs(out_file)[0]["unique"] == r.unique


def test_server_killed_mid_batch_every_job_completes(gearmand_factory, setup, workers):
    """Two servers; kill -9 one while a batch runs: its unfinished jobs go to the other (the
    next in their rendezvous order) as soon as it refuses connections, and all complete."""
    a, b = gearmand_factory(), gearmand_factory()
    cfg = setup([a, b])
    out_file = cfg.parent / "runs.jsonl"
    workers(cfg, [a, b], threads=4)
    jobs = [{"task": "st.count", "data": {"file": str(out_file), "id": i, "sleep": 0.3}} for i in range(24)]
    killed = []

    def on_progress(p):
        if not killed and p.done >= 4:
            a.kill()
            killed.append(p.done)
    with JobSender(load_config(cfg)) as sender:
        results = sender.submit_many(jobs, timeout=60, on_progress=on_progress)
    assert killed and killed[0] < 24
    assert [r.state for r in results] == ["complete"] * 24, [r.to_json() for r in results if r.state != "complete"]
    assert [r.result["id"] for r in results] == list(range(24))
    servers = [a.address, b.address]
    home = {r.unique: clients.rendezvous(r.unique, servers)[0] for r in results}
    assert set(home.values()) == set(servers)  # jobs were spread over both
    # b's own jobs never moved; a's that were unfinished went to b at once (a refuses connections).
    assert all(r.server == b.address and r.submissions == 1 for r in results if home[r.unique] == b.address)
    moved = [r for r in results if r.server != home[r.unique]]
    assert moved and all(home[r.unique] == a.address and r.server == b.address for r in moved)


def test_resubmission_with_same_unique_runs_once(fresh_gearmand, setup, workers):
    """The connection drops while a foreground job runs; the sender resubmits the same unique
    key, gearmand attaches it to the running job, and the task runs exactly once."""
    cfg = setup([fresh_gearmand])
    out_file = cfg.parent / "runs.jsonl"
    workers(cfg, [fresh_gearmand], threads=1)
    dropped = []
    sender = JobSender(load_config(cfg))

    def on_progress(p):
        if not dropped and p.running:  # WORK_STATUS arrived: the task is running on the worker
            sock = sender.servers[0].conn.sock
            sock.shutdown(socket.SHUT_RDWR)  # what a network failure does to our connection
            dropped.append(True)
    try:
        (r,) = sender.submit_many([{"task": "st.count", "data": {"file": str(out_file), "sleep": 1.5}}],
                                  timeout=30, on_progress=on_progress)
    finally:
        sender.close()
    assert dropped
    assert r.state == "complete" and r.submissions == 2 and r.attempts == 1, r
    assert len(runs(out_file)) == 1


def test_same_unique_in_one_batch_and_across_senders_runs_once(fresh_gearmand, setup, workers):
    """Submissions of one function+unique (twice in a batch, then from another sender while it
    runs) all attach to one job: one run, one handle, three complete results."""
    cfg = setup([fresh_gearmand])
    out_file = cfg.parent / "runs.jsonl"
    workers(cfg, [fresh_gearmand], threads=2)
    job = {"task": "st.count", "data": {"file": str(out_file), "sleep": 1.5}, "unique": "st-once"}
    first_results = []
    with JobSender(load_config(cfg)) as first, JobSender(load_config(cfg)) as second:
        t = threading.Thread(target=lambda: first_results.extend(first.submit_many([job, job], timeout=30)))
        t.start()
        try:
            wait_until(lambda: runs(out_file), 10, message="the job running")
            (late,) = second.submit_many([job], timeout=30)
        finally:
            t.join(30)
    results = first_results + [late]
    assert [r.state for r in results] == ["complete"] * 3
    assert len({r.handle for r in results}) == 1
    assert len(runs(out_file)) == 1


# -- streaming ---------------------------------------------------------------------------

def test_stream_yields_each_result_as_it_finishes(fresh_gearmand, setup, workers):
    """stream(): a quick job is reported while a slow one still runs; index gives the input
    position, and submit_many puts results back in input order."""
    cfg = setup([fresh_gearmand])
    out_file = cfg.parent / "runs.jsonl"
    workers(cfg, [fresh_gearmand], threads=2)
    jobs = [{"task": "st.count", "data": {"file": str(out_file), "id": "slow", "sleep": 1.5}},
            {"task": "st.count", "data": {"file": str(out_file), "id": "quick"}}]
    seen = []
    with JobSender(load_config(cfg)) as sender:
        for r in sender.stream(iter(jobs), timeout=30):
            seen.append((r.result["id"], r.index, sender._batch.lanes[0].waiting != {}))
        assert [r.result["id"] for r in sender.submit_many(jobs, timeout=30)] == ["slow", "quick"]
    assert seen == [("quick", 1, True), ("slow", 0, False)]  # the slow one was still waiting


def test_a_sender_is_reused_across_calls_without_mixing_them(fresh_gearmand, setup, workers):
    """A call that times out while its job still runs leaves nothing behind: the next call on
    the same sender and the same connection gets only its own result, though the old job's
    WORK_STATUS and WORK_COMPLETE arrive during it."""
    cfg = setup([fresh_gearmand])
    out_file = cfg.parent / "runs.jsonl"
    workers(cfg, [fresh_gearmand], threads=2)
    job = {"task": "st.count", "data": {"file": str(out_file), "sleep": 1.5}}
    with JobSender(load_config(cfg)) as sender:
        (old,) = sender.submit_many([{**job, "data": {**job["data"], "id": "old"}}], timeout=0.5)
        assert old.state == "timeout" and sender._batch is None
        conn = sender.servers[0].conn
        (new,) = sender.submit_many([{**job, "data": {**job["data"], "id": "new"}}], timeout=30)
        assert sender.servers[0].conn is conn  # the old job's answers came this way
    assert new.state == "complete" and new.result == {"id": "new"} and new.handle != old.handle
    assert [r["id"] for r in runs(out_file)] == ["old", "new"]


def test_a_bad_definition_after_the_first_window_stops_the_batch_cleanly(fresh_gearmand, setup, monkeypatch):
    """Within the first window a bad job stops everything before anything is sent; after it,
    the jobs already taken are sent and reported, then the error is raised (CLI: exit 2)."""
    monkeypatch.setattr(batch, "OPEN_JOBS", 4)
    cfg = setup([fresh_gearmand])

    def jobs(bad_at):
        for i in range(10):
            yield {"task": "st.bg", "data": i, "background": True} if i != bad_at else {"data": "no task"}
    with JobSender(load_config(cfg)) as sender:
        with pytest.raises(JobDefinitionError, match="job #3"):
            list(sender.stream(jobs(2)))
        assert queued(fresh_gearmand, "st.bg") == 0
        got = []
        with pytest.raises(JobDefinitionError, match="job #7"):
            for r in sender.stream(jobs(6)):
                got.append(r)
    assert sorted(r.index for r in got) == [0, 1, 2, 3, 4, 5] and {r.state for r in got} == {"queued"}
    assert queued(fresh_gearmand, "st.bg") == 6


def test_timeout_reports_jobs_not_yet_sent_too(fresh_gearmand, setup, monkeypatch):
    """--timeout with more jobs than the window: every job gets a line, the unsent ones say so."""
    monkeypatch.setattr(batch, "OPEN_JOBS", 2)
    cfg = setup([fresh_gearmand])
    with JobSender(load_config(cfg)) as sender:
        results = sender.submit_many(({"task": "st.nobody", "data": i} for i in range(5)), timeout=1)
        assert [r.state for r in results] == ["timeout"] * 5
        assert [r.submissions for r in results] == [1, 1, 0, 0, 0]
        assert [r.attempts for r in results] == [None] * 5  # no worker ran them
        assert all("(not sent)" in r.error for r in results[2:])
        (r,) = sender.submit_many([{"task": "eg.reverse", "data": "x", "background": True}])
        assert r.state == "queued"  # the sender is usable after a timed-out batch


def test_one_batch_at_a_time(fresh_gearmand, setup):
    cfg = setup([fresh_gearmand])
    with JobSender(load_config(cfg)) as sender:
        it = sender.stream([{"task": "st.bg", "data": 1, "background": True}])
        next(it)
        with pytest.raises(UsageError, match="one at a time"):
            sender.submit("st.bg", 2, background=True)
        assert list(it) == []
        assert sender.submit("st.bg", 3, background=True).state == "queued"


def test_max_retries_bounds_resubmission(fresh_gearmand, setup):
    """With sender.max_retries 0 a job whose connection drops after acceptance fails, naming why."""
    cfg = setup([fresh_gearmand], EXTRA.replace("submit_timeout: 2", "submit_timeout: 2\n  max_retries: 0"))
    sender = JobSender(load_config(cfg))
    dropped = []

    def on_progress(p):
        if p.accepted and not dropped:
            sender.servers[0].conn.sock.shutdown(socket.SHUT_RDWR)
            dropped.append(True)
    try:
        (r,) = sender.submit_many([{"task": "st.nobody", "data": 1}], timeout=10, on_progress=on_progress)
    finally:
        sender.close()
    assert r.state == "failed" and r.submissions == 1 and r.attempts is None
    assert "gave up after 1 submission(s)" in r.error and "connection" in r.error


class LogRecorder:
    """A logger for JobSender(log=...) that keeps (level, event, fields)."""

    def __init__(self):
        self.lines: list[tuple[str, str, dict]] = []

    def bind(self, **kw):
        return self

    def log(self, level, event, **kw):
        self.lines.append((str(level), event, kw))

    def __getattr__(self, level):
        return lambda event, **kw: self.lines.append((level, event, kw))


def test_silent_server_is_failed_over_after_failover_after(fresh_gearmand, setup, workers):
    """A server that accepts TCP but never answers: after submit_timeout the sender only warns
    ("server slow"); after sender.failover_after its jobs go to the next server in their
    rendezvous order and complete there. Jobs routed to the live server never wait."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # the kernel completes handshakes; nobody ever reads or answers
    try:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        cfg = setup([address, fresh_gearmand],
                    EXTRA.replace("submit_timeout: 2", "submit_timeout: 0.5\n  failover_after: 4"))
        workers(setup([fresh_gearmand], name="workers.yaml"), [fresh_gearmand])
        servers = [address, fresh_gearmand.address]
        to_silent = [u for u in (f"u{i}" for i in range(100)) if clients.rendezvous(u, servers)[0] == address][:3]
        to_live = [u for u in (f"u{i}" for i in range(100)) if clients.rendezvous(u, servers)[0] != address][:3]
        t0 = time.monotonic()
        log = LogRecorder()
        with JobSender(load_config(cfg), log=log) as sender:
            results = sender.submit_many([{"task": "eg.reverse", "data": u, "unique": u}
                                          for u in to_silent + to_live], timeout=20)
        assert [r.state for r in results] == ["complete"] * 6
        assert {r.server for r in results} == {fresh_gearmand.address}
        assert [r.submissions for r in results] == [2, 2, 2, 1, 1, 1]
        assert all(r.seconds >= 4 for r in results[:3]) and all(r.seconds < 4 for r in results[3:])
        assert time.monotonic() - t0 < 12
        events = [(level, event) for level, event, _ in log.lines]
        assert events.index(("warning", "server slow: waiting for its answer")) < \
            events.index(("warning", "failing over: its jobs go to the next server"))
    finally:
        silent.close()


# -- progress bar ------------------------------------------------------------------------

def test_progress_bar_on_a_terminal(fresh_gearmand, setup, workers):
    """On a pty the sender draws a bar with counts and the worker's WORK_STATUS n/d."""
    cfg = setup([fresh_gearmand])
    workers(cfg, [fresh_gearmand])
    status, text = run_on_a_terminal([PYTHON, str(REPO / SCRIPT), "--config", str(cfg), "job", "eg.slow",
                                      '{"seconds": 1.5}'])
    assert status == 0, text
    assert re.search(r"\[[#-]+\] 0 done, 0 failed, 0/1 .*/s .*left", text), text
    assert re.search(r"eg\.slow \d+/10", text), text  # the worker's WORK_STATUS
    assert "complete eg.slow" in text and "1 job(s): 1 complete" in text


def test_progress_render_counts():
    p = clients.Progress(total=10, done=3, failed=1, accepted=10, elapsed=2.0, running=[("t", 2, 5), ("u", 1, 2)])
    line = render(p, 120)
    assert "3 done, 1 failed, 4/10" in line and "2.0/s" in line and "left 00:03" in line and "t 2/5 +1" in line
    assert len(render(p, 40)) < 40
    # Jobs still coming from a plugin: the total is not known yet.
    p = clients.Progress(total=None, done=3, failed=0, accepted=6, elapsed=1.0, running=[])
    assert "3 done, 0 failed, 3/?" in render(p, 120) and "left --:--" in render(p, 120)


# -- bad input ---------------------------------------------------------------------------

BAD_PLUGINS = {
    "raiser": "from geartask import hookimpl\n@hookimpl\ndef geartask_jobs():\n    raise RuntimeError('db down')\n",
    "notask": "from geartask import hookimpl\n@hookimpl\ndef geartask_jobs():\n    yield {'data': 1}\n",
    "badset": "from geartask import hookimpl\n@hookimpl\ndef geartask_jobs():\n"
              "    yield {'task': 'x', 'data': {1, 2}}\n",
    "badprio": "from geartask import hookimpl\n@hookimpl\ndef geartask_jobs():\n"
               "    yield {'task': 'x', 'priority': 'urgent'}\n",
    "empty": "from geartask import hookimpl\n@hookimpl\ndef geartask_jobs():\n    return []\n",
    "huge": "from geartask import hookimpl\n@hookimpl\ndef geartask_jobs():\n"
            "    yield {'task': 'x', 'data': 'x' * (64 * 1024 * 1024 + 1)}\n",
    "longuniq": "from geartask import hookimpl\n@hookimpl\ndef geartask_jobs():\n"
                "    yield {'task': 'x', 'unique': 'u' * 65}\n",
}


@pytest.fixture
def bad_config(tmp_path, gearmand):
    folder = tmp_path / "bad"
    folder.mkdir()
    for name, text in BAD_PLUGINS.items():
        (folder / f"{name}.py").write_text(text)
    path = write_config(tmp_path / "bad.yaml", [gearmand.address])
    path.write_text(path.read_text().replace(f"paths: [{REPO / 'plugins'}]", f"paths: [{REPO / 'plugins'}, {folder}]"))
    return path


@pytest.mark.parametrize("plugin, rc, words", [
    ("nope", 2, ["unknown plugin 'nope'", "available:", "eg", "raiser"]),
    ("raiser", 2, ["plugin 'raiser'", "raiser.py", "RuntimeError: db down"]),
    ("notask", 2, ["'task' must be a non-empty name", "notask"]),
    ("badset", 2, ["cannot be serialised as JSON", "badset"]),
    ("badprio", 2, ["unknown priority 'urgent'", "badprio"]),
    ("empty", 2, ["plugin 'empty'", "yielded no jobs"]),
    ("huge", 2, ["plugin 'huge'", "67108867 bytes", "over the 67108864-byte limit"]),
    ("longuniq", 2, ["plugin 'longuniq'", "65 bytes", "at most 64"]),
])
def test_bad_plugin_input(bad_config, capsys, plugin, rc, words):
    """Each bad plugin input: one clear line naming what is wrong, exit 2, nothing sent."""
    status, out, err = cli(["--config", str(bad_config), "plugin", plugin], capsys)
    assert status == rc, err
    assert out == ""
    assert "Traceback" not in err
    for w in words:
        assert w in err, err


def test_bad_command_lines(bad_config, capsys):
    for argv, words in [
        (["plugin", "eg", "--priority", "urgent"], ["invalid choice: 'urgent'"]),
        (["shell"], ["no command given"]),
        (["shell", "--bogus", "x"], ["unrecognized arguments: --bogus"]),
        (["plugin", "eg", "--timeout", "0"], ["must be greater than 0"]),
        (["job", "t"], ["required: DATA"]),
    ]:
        status, out, err = cli(["--config", str(bad_config), *argv], capsys)
        assert status == 2, (argv, err)
        assert "Traceback" not in err
        for w in words:
            assert w in err, (argv, err)


def test_bad_input_through_the_api(make_config, gearmand):
    _, config = make_config([gearmand])
    with JobSender(config) as sender:
        with pytest.raises(JobDefinitionError, match="task"):
            sender.submit_many([{"data": 1}])
        with pytest.raises(JobDefinitionError, match="cannot be serialised"):
            sender.submit("x", object())
        with pytest.raises(JobDefinitionError, match="unknown priority 'urgent'"):
            sender.submit("x", 1, priority="urgent")
        with pytest.raises(JobDefinitionError, match="limit"):
            sender.submit("x", "y" * (clients.MAX_PAYLOAD + 1))
    # None of those reached the server.
    assert not [l for l in gp.admin_command(gearmand.host, gearmand.port, "status") if l.startswith("x\t")]


def test_no_server_reachable(tmp_path, capsys):
    """Nothing listens: after connect_timeout, one line listing every server tried, exit 1."""
    ports = [free_port(), free_port()]
    cfg = write_config(tmp_path / "c.yaml", [f"127.0.0.1:{p}" for p in ports], "sender:\n  connect_timeout: 1\n")
    t0 = time.monotonic()
    status, out, err = cli(["--config", str(cfg), "job", "eg.reverse", "abc"], capsys)
    assert 1 <= time.monotonic() - t0 < 5
    assert status == 1 and out == ""
    assert "no job server reachable" in err and "Traceback" not in err
    for p in ports:
        assert f"127.0.0.1:{p} (cannot connect" in err
    with pytest.raises(NoServerError) as e:
        JobSender(load_config(cfg)).submit("eg.reverse", "abc")
    assert e.value.servers == [f"127.0.0.1:{p}" for p in ports]


def test_list_shows_plugins_and_their_jobs(bad_config, capsys):
    """`list`: every plugin found with the jobs it would send; a broken one is named, exit 2."""
    status, out, err = cli(["--config", str(bad_config), "list"], capsys)
    assert status == 2
    assert re.search(r"^eg \(.*eg\.py\):\n(  .*\n){6}  6 job\(s\)$", out, re.M), out
    assert "  eg.reverse unique=eg-reverse-1 data=geartask" in out
    assert re.search(r"^raiser \(.*raiser\.py\): error: .*RuntimeError: db down", out, re.M)
    assert re.search(r"^empty \(.*\): 0 job\(s\)$", out, re.M)
    good = bad_config.parent / "good.yaml"
    good.write_text(bad_config.read_text().replace(f", {bad_config.parent / 'bad'}", ""))
    status, out, err = cli(["--config", str(good), "list", "--json"], capsys)
    assert status == 0, err
    (item,) = [json.loads(l) for l in out.splitlines()]
    assert item["plugin"] == "eg" and len(item["jobs"]) == 6


def test_script_runs_from_inside_its_folder(tmp_path):
    """`python send_job_client.py` works from inside send_job_client/ too (usage error: exit 2)."""
    r = subprocess.run([PYTHON, "send_job_client.py", "plugin"], cwd=REPO / "send_job_client",
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "NAME" in r.stderr and "Traceback" not in r.stderr


def test_list_shows_where_a_job_definition_sends_itself(tmp_path, gearmand, capsys):
    """A plugin job with its own host/label/all (fleet commands) says so in `list` and `--json`."""
    folder = tmp_path / "fleetplug"
    folder.mkdir()
    (folder / "where.py").write_text(
        "from geartask import hookimpl\n\n\n@hookimpl\ndef geartask_jobs(config):\n"
        "    yield {'task': 'shell', 'data': {'cmd': ['true']}, 'label': 'db', 'unique': 'pdb'}\n"
        "    yield {'task': 'shell', 'data': {'cmd': ['true']}, 'all': True}\n"
        "    yield {'task': 'shell', 'data': {'cmd': ['true']}}\n")
    path = write_config(tmp_path / "c.yaml", [gearmand.address])
    path.write_text(path.read_text().replace(f"paths: [{REPO / 'plugins'}]", f"paths: [{folder}]"))
    status, out, err = cli(["--config", str(path), "list"], capsys)
    assert status == 0, err
    lines = [line for line in out.splitlines() if line.startswith("  shell")]
    assert "label=db" in lines[0] and "unique=pdb" in lines[0] and "all=True" in lines[1]
    assert "label=" not in lines[2] and "all=" not in lines[2]
    status, out, err = cli(["--config", str(path), "list", "--json"], capsys)
    (item,) = [json.loads(line) for line in out.splitlines()]
    assert [(j.get("label"), j.get("all")) for j in item["jobs"]] == [("db", None), (None, True), (None, None)]
