"""A job for a task no worker serves: said at once, a foreground send gives up after
sender.no_worker_timeout, a worker that appears meanwhile runs it, a background send warns
and exits 0. Real gearmand, real worker processes, the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from geartask import JobSender, load_config
from geartask.errors import NoWorkerError
from geartask.sender import no_worker
from helpers import REPO, run_script, wait_until, write_config
from test_worker import TEST_PLUGINS
from workers import WorkerProc

SEND = "send_job_client/send_job_client.py"


@pytest.fixture
def fleet(fresh_gearmand, tmp_path):
    """(server, config path with sender.no_worker_timeout, start_worker)."""
    srv = fresh_gearmand
    started: list[WorkerProc] = []

    def config(timeout: float = 2) -> tuple:
        path = write_config(tmp_path / f"config-{timeout:g}.yaml", [srv.address],
                            f"sender:\n  no_worker_timeout: {timeout}\nworker:\n  poll_timeout: 1\n",
                            plugin_paths=[REPO / "plugins", TEST_PLUGINS])
        return path

    def start_worker(path, name: str = "nw") -> WorkerProc:
        w = WorkerProc(path, name, 1)
        started.append(w)
        return w.wait_attached([srv.address])

    yield srv, config, start_worker
    for w in started:
        w.stop()


def test_unknown_task_foreground_fails_after_the_timeout_with_warning_and_hint(fleet):
    srv, config, start_worker = fleet
    cfg = config(2)
    start_worker(cfg)  # serves t.describe, t.record...: the typo is close to one of them
    t0 = time.monotonic()
    r = run_script(SEND, "--config", str(cfg), "job", "t.describ", "{}", timeout=60)
    took = time.monotonic() - t0
    assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
    # the warning at once: the task, the server, the hint, the setting
    assert "no worker serves task 't.describ' on any server" in r.stderr, r.stderr
    assert srv.address in r.stderr and "did you mean 't.describe'?" in r.stderr
    assert "sender.no_worker_timeout" in r.stderr
    # then one clear error line, no traceback
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "gave up after 2s" in errors[0] and "not run" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert 2 <= took < 20, took
    # the job does not stay runnable behind the sender: gearmand marks a gone client's queued
    # foreground job ignored ('show jobs' column 3), so no worker for it would run it later
    wait_until(lambda: _all_ignored(srv), 10, message="the abandoned job ignored by gearmand")


def test_a_worker_started_during_the_wait_runs_the_job(fleet, tmp_path):
    srv, config, start_worker = fleet
    cfg = config(60)
    err = tmp_path / "send.err"
    with open(err, "w") as e:
        proc = subprocess.Popen([sys.executable, str(REPO / SEND), "--config", str(cfg), "job", "t.describe",
                                 '{"x": 1}', "--json"], stdout=subprocess.PIPE, stderr=e, text=True, cwd=REPO)
    try:
        wait_until(lambda: "no worker serves task 't.describe'" in err.read_text(), 20,
                   message="the sender's warning")
        t0 = time.monotonic()
        start_worker(cfg)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, (out, err.read_text())
        line = json.loads(out.splitlines()[0])
        assert line["state"] == "complete" and line["result"]["data"] == {"x": 1}
        assert time.monotonic() - t0 < 30  # well before the 60 s no_worker_timeout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_background_send_for_an_unserved_task_warns_and_exits_0(fleet):
    srv, config, _ = fleet
    cfg = config(2)
    for args in (["job", "t.nobody", "{}", "--background"], ["shell", "--background", "--", "echo", "hi"]):
        r = run_script(SEND, "--config", str(cfg), *args, timeout=60)
        assert r.returncode == 0, r.stderr
        task = args[1] if args[0] == "job" else "shell"
        assert f"no worker serves task '{task}' on any server ({srv.address})" in r.stderr, r.stderr
        assert "stay queued" in r.stderr and f"geartask manage clear {task}" in r.stderr
        assert r.stdout.startswith("queued")
        assert _total(srv, task) == 1  # still queued: a worker for it would run it


def test_send_plugin_warns_once_per_task_and_the_api_flags_queued_jobs(fleet, monkeypatch):
    """A 2,000-job background batch of one unserved task: one warning, one `status` query per
    server (not per job); every JobResult says no_worker."""
    from test_sender import LogRecorder  # the sender's own logger: independent of how an earlier
    # test in this process configured logging (caplog sees nothing once a listener owns it)
    srv, config, _ = fleet
    cfg = load_config(config(2))
    asked = []
    real = no_worker.ask_status
    monkeypatch.setattr(no_worker, "ask_status", lambda *a: asked.append(a) or real(*a))
    log = LogRecorder()
    with JobSender(cfg, log=log, record_background=False) as sender:
        results = sender.submit_many(({"task": "t.absent", "data": i} for i in range(2000)), wait=False)
    assert len(results) == 2000 and all(r.state == "queued" and r.no_worker for r in results)
    assert len(asked) == 1, asked
    warnings = [line for line in log.lines if "no worker serves task 't.absent'" in line[1]]
    assert len(warnings) == 1 and warnings[0][0] == "warning", log.lines


def test_api_foreground_raises_no_worker_error_and_rechecks_cheaply(fleet, monkeypatch):
    srv, config, _ = fleet
    cfg = load_config(config(2))
    asked = []
    real = no_worker.ask_status
    monkeypatch.setattr(no_worker, "ask_status", lambda *a: asked.append(a) or real(*a))
    with JobSender(cfg) as sender:
        with pytest.raises(NoWorkerError) as e:
            sender.submit_many([{"task": "t.gone", "data": i} for i in range(200)])
    assert e.value.tasks == ["t.gone"] and e.value.servers == [srv.address]
    assert e.value.exit_status == 3
    # 200 waiting jobs over 2 s: the first ask and about one per second after it, not one per job
    assert 2 <= len(asked) <= 5, len(asked)


def test_a_mixed_batch_fails_only_the_unserved_tasks_jobs(fleet):
    srv, config, start_worker = fleet
    cfg = config(2)
    start_worker(cfg)
    with JobSender(load_config(cfg)) as sender:
        results = sender.submit_many([{"task": "t.describe", "data": 1}, {"task": "t.nope", "data": 2}])
    ok, bad = results
    assert ok.state == "complete" and not ok.no_worker
    assert bad.state == "failed" and bad.no_worker and "no worker serves task 't.nope'" in bad.error


def _total(srv, function: str) -> int:
    from geartask import gearman as gp
    for line in gp.admin_command(srv.host, srv.port, "status"):
        parts = line.split("\t")
        if parts[0] == function:
            return int(parts[1])
    return 0


def _all_ignored(srv) -> bool:
    from geartask import gearman as gp
    jobs = [line.split("\t") for line in gp.admin_command(srv.host, srv.port, "show jobs")]
    return bool(jobs) and all(parts[2] == "1" for parts in jobs)


def test_the_hint_is_the_closest_served_name_never_an_internal_one():
    snap = no_worker.Snapshot(0.0, {"eg.reverse": 2, "eg.revers2": 0, "geartask.outcomes": 1, "shell": 1},
                              ["127.0.0.1:4730"])
    assert snap.hint("eg.revers") == "eg.reverse"  # eg.revers2 is closer but nobody serves it
    assert snap.hint("geartask.outcome") == "geartask.outcomes"  # internal only for an internal-looking name
    assert snap.hint("outcomes") is None  # internal names are no hint for a user's task
    assert snap.hint("zzz") is None
    text = no_worker.unserved_text("sh\x1b[2Jell", snap)
    assert "\x1b" not in text and "127.0.0.1:4730" in text  # a peer's or user's name can't drive the terminal


def test_send_plugin_foreground_with_no_worker_at_all_exits_3_naming_each_task(fleet):
    srv, config, _ = fleet
    r = run_script(SEND, "--config", str(config(2)), "plugin", "eg", timeout=60)
    assert r.returncode == 3, (r.stdout, r.stderr)
    for task in ("eg.reverse", "eg.wordcount", "eg.flaky", "shell"):
        assert f"no worker serves task '{task}' on any server ({srv.address})" in r.stderr, r.stderr
    (error,) = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert "gave up after 2s" in error and "Traceback" not in r.stderr


class _Log:
    def __init__(self):
        self.lines = []

    def __getattr__(self, level):
        return lambda event, **kw: self.lines.append((level, event))


def test_the_unserved_policy_with_a_fake_clock():
    """Who is asked when, what is said once, when foreground jobs are given up on: no sockets."""
    answers = []  # what each round returns: a Snapshot, or None (no server answered)
    rounds = []

    def asker(servers, timeout, now):
        rounds.append((now, list(servers)))
        snap = answers.pop(0)
        return None if snap is None else no_worker.Snapshot(now, *snap)

    log = _Log()
    a, b = ("10.0.0.1", 1), ("10.0.0.2", 2)
    u = no_worker.Unserved([a, b], 5.0, 3.0, log, asker=asker)
    assert u.timeout == 1.0  # an ask holds the call up 1 s at most
    answers.append(({"t.real": 1}, ["10.0.0.1:1"], {"10.0.0.2:2": "cannot connect"}))
    assert u.seen("t.reel", False, 100.0) and u.seen("t.reel", False, 100.1)  # one round, one warning
    assert not u.seen("t.real", False, 100.2)  # the same round serves a second task
    assert len(rounds) == 1 and [e for _, e in log.lines].count(log.lines[0][1]) == 1
    assert "did you mean 't.real'?" in log.lines[0][1] and "10.0.0.1:1" in log.lines[0][1]
    assert not u.due(100.5) and u.due(101.0)
    # the silent server is left out of the next rounds, 2 s, then 4 s apart
    answers.append(({}, ["10.0.0.1:1"], {}))
    assert u.recheck({"t.reel"}, 101.0) == [] and rounds[-1][1] == [a]
    answers.append(None)  # nobody answers: nothing is given up on, even past the timeout
    assert u.recheck({"t.reel"}, 103.5) == [] and rounds[-1][1] == [a, b]
    n = len(rounds)
    assert u.recheck({"t.reel"}, 104.0) == [] and len(rounds) == n  # both back off: nobody is asked
    answers.append(({}, ["10.0.0.1:1"], {}))
    assert u.recheck({"t.reel"}, 105.5) == ["t.reel"] and "gave up after 3s" in u.given_up["t.reel"]
    assert rounds[-1][1] == [a]  # b backs off longer: 2 failures in a row, 4 s
    # a task met while nobody answered is decided on a later round, then warned about
    u2 = no_worker.Unserved([a], 5.0, 3.0, log, asker=asker)
    answers.append(None)
    assert not u2.seen("t.x", False, 0.0) and "t.x" in u2.undecided
    n = len(rounds)
    assert not u2.seen("t.y", False, 0.5) and len(rounds) == n  # no round before next_ask: no storm
    answers.append(({"t.x": 0}, ["10.0.0.1:1"], {}))
    assert u2.recheck({"t.x"}, 2.0) == [] and "t.x" in u2.since and "t.x" not in u2.undecided
    answers.append(({"t.x": 2}, ["10.0.0.1:1"], {}))  # a worker appears: its jobs run
    assert u2.recheck({"t.x"}, 3.0) == [] and u2.verdict["t.x"] and "t.x" not in u2.since


def test_a_served_task_whose_workers_went_away_is_given_up_on_with_a_fake_clock():
    """A task served when its jobs were sent, whose last worker goes away (killed mid-job:
    gearmand requeues the job for nobody): asked about again only after a quiet spell with no
    result, then given no_worker_timeout like a task nobody serves; a worker that comes back
    meanwhile keeps its jobs. No sockets."""
    answers, rounds = [], []

    def asker(servers, timeout, now):
        rounds.append(now)
        return no_worker.Snapshot(now, *answers.pop(0))

    log = _Log()
    u = no_worker.Unserved([("10.0.0.1", 1)], 5.0, 3.0, log, asker=asker)
    assert u.watch_every() == 3.0  # at most no_worker_timeout; WATCH_EVERY (5 s) when that is longer
    answers.append(({"t.a": 1, "t.b": 1}, ["10.0.0.1:1"], {}))
    assert not u.seen("t.a", False, 0.0) and not u.seen("t.b", False, 0.0) and len(rounds) == 1
    assert not u.watch_due(2.0, quiet_since=0.0) and not u.watch_due(4.0, quiet_since=2.0)  # results came
    assert u.watch_due(5.0, quiet_since=2.0)
    answers.append(({"t.a": 0, "t.b": 1}, ["10.0.0.1:1"], {}))  # t.a's worker was killed
    u.watch({"t.a", "t.b"}, 5.0)
    assert len(rounds) == 2 and u.since == {"t.a": 5.0} and u.verdict == {"t.a": False, "t.b": True}
    assert not u.watch_due(6.0, quiet_since=2.0) and u.due(6.0)  # the usual rechecks take over
    assert [ev for lv, ev in log.lines] == [
        "no worker serves task 't.a' any more on any server (10.0.0.1:1) (its workers went away): "
        "its jobs wait up to 3s (sender.no_worker_timeout) for a worker"]
    answers.append(({"t.a": 0}, ["10.0.0.1:1"], {}))
    assert u.recheck({"t.a"}, 6.0) == []
    answers.append(({"t.a": 0}, ["10.0.0.1:1"], {}))
    assert u.recheck({"t.a"}, 8.0) == ["t.a"]
    assert u.given_up["t.a"].endswith("gave up after 3s (sender.no_worker_timeout): no answer")
    # nothing to watch (no foreground job waits, or its task has no verdict): no round at all
    n = len(rounds)
    u.watch(set(), 20.0)
    u.watch({"t.unknown"}, 30.0)
    assert len(rounds) == n
    # the worker comes back during the wait: its jobs run, the task is not 'lost' any more
    u3 = no_worker.Unserved([("10.0.0.1", 1)], 5.0, 3.0, log, asker=asker)
    answers.append(({"t.c": 1}, ["10.0.0.1:1"], {}))
    u3.seen("t.c", False, 0.0)
    answers.append(({"t.c": 0}, ["10.0.0.1:1"], {}))
    u3.watch({"t.c"}, 4.0)
    answers.append(({"t.c": 1}, ["10.0.0.1:1"], {}))
    assert u3.recheck({"t.c"}, 5.0) == [] and u3.verdict["t.c"] and not u3.since and not u3.lost
