"""Job outcomes end to end: real workers report them, the real collector stores them, the sender
and the manager read them from a config that shares nothing but the servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

import gearclient as gc
from geartask import JobSender, load_config
from geartask.outcomes.client import OutcomeClient
from helpers import REPO, run_script, wait_until, write_config
from test_outcomes_collector import collector_config, collectors, reader_config, total  # noqa: F401
from test_worker import TEST_PLUGINS
from workers import WorkerProc

SEND = "send_job_client/send_job_client.py"
MANAGE = "manage_client/manage_client.py"
WORKER_YAML = """worker:
  poll_timeout: 1
  retry_backoff: 0.05
  shell:
    allow: [echo, uname, "false", sleep]
"""


@pytest.fixture
def fleet(fresh_gearmand, tmp_path, collectors):
    """A gearmand (sqlite queue), a collector and a way to start reporting workers; yields
    (server, reader config, start_worker)."""
    srv = fresh_gearmand
    collector = collectors(collector_config(tmp_path, [srv.address]), [srv.address])
    started: list[WorkerProc] = []

    def start_worker(name: str = "ow", threads: int = 2, extra: str = "") -> WorkerProc:
        cfg = write_config(tmp_path / name / "config.yaml", [srv.address], WORKER_YAML + extra,
                           plugin_paths=[REPO / "plugins", TEST_PLUGINS])
        w = WorkerProc(cfg, name, threads)
        started.append(w)
        return w.wait_attached([srv.address])

    yield srv, reader_config(tmp_path, [srv.address]), start_worker, collector
    for w in started:
        w.stop()


def send(cfg, *args, timeout=60):
    return run_script(SEND, "--config", str(cfg), *args, timeout=timeout)


def test_background_results_are_read_back_from_another_config(fleet):
    """A background shell job's output and a background plugin job's JSON result, read by
    unique key with `send_job_client.py result` from a config naming only the servers."""
    srv, reader, start_worker, _ = fleet
    start_worker()
    with JobSender(load_config(reader)) as sender:
        a, b = sender.submit_many([{"task": "shell", "data": {"cmd": ["echo", "hello outcomes"]}, "unique": "bg-shell"},
                                   {"task": "eg.reverse", "data": "stressed", "unique": "bg-plugin"}],
                                  wait=False)
    assert a.state == b.state == "queued"
    r = send(reader, "result", "bg-shell", "--wait", "20", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["state"] == "complete" and out["result"]["output"] == "hello outcomes\n" and out["attempts"] == 1
    r = send(reader, "result", "bg-plugin", "--wait", "20")
    assert r.returncode == 0 and "complete" in r.stdout and '"reversed": "desserts"' in r.stdout, r.stdout
    by_handle = send(reader, "result", f"{b.handle}@{b.server}", "--json")
    assert json.loads(by_handle.stdout)["unique"] == "bg-plugin"


def test_foreground_successes_report_nothing(fleet):
    """A client already has a foreground result: no outcome job for it (W1's path)."""
    srv, reader, start_worker, _ = fleet
    start_worker()
    with JobSender(load_config(reader)) as sender:
        assert all(r.state == "complete" for r in sender.submit_many([{"task": "eg.reverse", "data": "x"}] * 50))
    time.sleep(0.5)  # nothing to wait for: there must be nothing to see either
    assert OutcomeClient(load_config(reader)).size() == 0


def test_a_failed_background_job_is_failed_everywhere_and_a_requeue_runs_it_again(fleet, tmp_path):
    """`false` fails three times: status says failed (not done), with the reason and attempts;
    `failed list` shows it; `failed requeue` sends it again and the record says so."""
    srv, reader, start_worker, _ = fleet
    w = start_worker()
    r = send(w.config, "shell", "--background", "--retries", "2", "--", "false")
    assert r.returncode == 0, r.stderr
    handle = r.stdout.split()[3].split("@")[0]
    r = send(w.config, "result", handle, "--wait", "20", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["state"] == "failed", r.stdout
    out = json.loads(r.stdout)
    assert out["attempts"] == 3 and "exit status 1" in out["reason"]["error"]
    status = send(w.config, "status", "--json")
    (line,) = [json.loads(x) for x in status.stdout.splitlines()]
    assert line["state"] == "failed" and line["attempts"] == 3 and status.returncode == 1
    listed = run_script(MANAGE, "--config", str(reader), "failed", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert any(rec["handle"] == handle for rec in json.loads(listed.stdout)["failed"]), listed.stdout

    # Requeue a job that succeeds the second time: a flaky plugin task, failed for good first.
    with JobSender(load_config(reader)) as sender:
        (first,) = sender.submit_many([{"task": "t.fail", "data": {}, "retries": 0, "unique": "requeue-me"}],
                                      wait=False)
    wait_until(lambda: (OutcomeClient(load_config(reader)).latest(unique="requeue-me") or {}).get("state") == "failed",
               20, message="the first run's failure stored")
    r = run_script(MANAGE, "--config", str(reader), "failed", "requeue", "requeue-me", "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    history = wait_until(lambda: len((h := OutcomeClient(load_config(reader)).history("requeue-me"))["records"]) >= 2
                         and h, 20, message="the requeued run's outcome")
    failed = [x for x in history["records"] if x.get("requeues")]
    assert failed, history  # the old record says it was requeued, and by whom


def test_plain_gearman_clients_still_work_and_their_outcomes_are_stored(fleet):
    """The C `gearman -b` tool sends no envelope: the job runs with the worker's defaults and,
    since the worker can't tell it from a foreground job, its outcome is stored."""
    srv, reader, start_worker, _ = fleet
    start_worker()
    r = subprocess.run(["gearman", "-h", srv.host, "-p", str(srv.port), "-b", "-u", "from-c-tool", "-f",
                        "eg.reverse", "olleh"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    rec = wait_until(lambda: OutcomeClient(load_config(reader)).latest(unique="from-c-tool"), 20,
                     message="the C tool's job's outcome")
    assert rec["state"] == "complete" and "background" not in rec
    r = send(reader, "result", "from-c-tool")
    assert r.returncode == 0 and '"reversed": "hello"' in r.stdout


def test_a_worker_killed_right_after_background_jobs_loses_no_outcome(fleet, collectors):
    """Outcomes go out before the answers they belong to: whatever gearmand shows finished when
    the worker is killed -9 has its outcome; what was not finished runs again elsewhere."""
    srv, reader, start_worker, collector = fleet
    collector.stop()  # outcomes wait in gearmand meanwhile
    w = start_worker("killed", threads=4)
    n = 400
    with JobSender(load_config(reader)) as sender:
        results = sender.submit_many([{"task": "eg.reverse", "data": f"j{i}", "unique": f"kill-{i}"}
                                      for i in range(n)], wait=False)
    assert all(r.state == "queued" for r in results)
    wait_until(lambda: gc.queued(srv.address, "eg.reverse") < n - 100, 30, message="the worker well into the jobs")
    os.kill(w.pid, signal.SIGKILL)
    w.proc.wait(10)
    left = gc.queued(srv.address, "eg.reverse")  # held or unanswered jobs are back in the queue
    finished = n - left
    assert 0 < finished <= n
    collectors(collector.config, [srv.address])
    client = OutcomeClient(load_config(reader))
    wait_until(lambda: total(srv.address, "geartask.outcomes") == 0, 30, message="every outcome job stored")
    stored = sum(1 for i in range(n) if client.latest(unique=f"kill-{i}") is not None)
    assert stored >= finished, (stored, finished)


def test_outcomes_gearmand_refuses_are_kept_in_the_dead_letter_file(fleet, collectors):
    """gearmand's queue for outcomes is full (maxqueue): it answers the outcome job with ERROR;
    the worker keeps the records in its dead-letter file, which `failed import` can bring to
    the collector later."""
    srv, reader, start_worker, collector = fleet
    collector.stop()
    r = run_script(MANAGE, "--config", str(reader), "maxqueue", "geartask.outcomes", "1")
    assert r.returncode == 0, r.stderr
    conn = gc.connect(srv.address)
    gc.submit(conn, "geartask.outcomes", [b"[]"], background=True)  # the one place in the queue
    conn.close()
    w = start_worker("refused", threads=1)
    with JobSender(load_config(reader)) as sender:
        sender.submit_many([{"task": "t.fail", "data": {}, "retries": 0, "unique": f"ref-{i}"} for i in range(5)],
                           wait=False)
    dead = w.config.parent / "logs" / "dead-letter.jsonl"
    lines = wait_until(lambda: dead.exists() and [json.loads(x) for x in dead.read_text().splitlines()], 20,
                       message="refused outcomes in the dead-letter file")
    assert all(rec["state"] == "failed" and rec["unique"].startswith("ref-") for rec in lines)
    r = run_script(MANAGE, "--config", str(reader), "maxqueue", "geartask.outcomes", "0")
    assert r.returncode == 0
    collectors(collector.config, [srv.address])
    r = run_script(MANAGE, "--config", str(reader), "failed", "import", str(dead))
    assert r.returncode == 0, r.stdout + r.stderr
    assert OutcomeClient(load_config(reader)).latest(unique="ref-0")["state"] == "failed"


def test_sink_hooks_see_every_end_and_a_raising_hook_fails_nothing(fresh_gearmand, tmp_path):
    """geartask_job_done/geartask_job_failed are called for each job's end; a hook that raises
    (even SystemExit) is logged, and the job's answer is what it would have been."""
    srv = fresh_gearmand
    cfg = write_config(tmp_path / "sink" / "config.yaml", [srv.address], WORKER_YAML + "outcomes:\n  report: false\n",
                       plugin_paths=[REPO / "plugins", TEST_PLUGINS, REPO / "tests" / "sink_plugins"])
    w = WorkerProc(cfg, "sinky", 1).wait_attached([srv.address])
    try:
        assert gc.run_one(srv.address, "eg.reverse", "ab").result == {"reversed": "ba"}
        assert gc.run_one(srv.address, "t.describe", {"sink_raises": True}).state == "complete"
        o = gc.run_one(srv.address, "t.fail", {"retries": 1})
        assert o.state == "failed" and o.reason["attempts"] == 2
        sink = cfg.parent / "logs" / "sink.jsonl"
        lines = [json.loads(x) for x in sink.read_text().splitlines()]
        assert [(x["task"], "done" in x) for x in lines] == [("eg.reverse", True), ("t.fail", False)]
        assert lines[1]["attempts"] == 2
        assert gc.run_one(srv.address, "eg.reverse", "cd").result == {"reversed": "dc"}  # the thread lives on
    finally:
        w.stop()
