"""The running-job object (geartask.worker.running.RunningJob) with the runner that acts on
it: no gearmand, no sockets (the job's connection is a plain object with an address)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from geartask.config import load_config
from geartask.worker.job import STOPPED_BY_OPERATOR, Abandoned, Job
from geartask.worker.runner import JobRunner, UnansweredJobs
from geartask.worker.running import RunningJob
from geartask.worker.stats import TaskCounters, summarize

from helpers import write_config, wait_until


class Conn:
    """What a Job needs of its connection here: an address, and that it is connected."""

    address = "127.0.0.1:4730"
    connected = True


@pytest.fixture
def config(tmp_path: Path):
    path = write_config(tmp_path / "config.yaml", ["127.0.0.1:4730"],
                        extra="worker:\n  retries: 2\n  retry_backoff: 0.01\noutcomes:\n  report: false\n")
    cfg = load_config(path)
    cfg.log.dir = str(tmp_path / "logs")
    return cfg


def make(config, tasks: dict, cancel_all: threading.Event | None = None):
    counters = TaskCounters(list(tasks))
    running = RunningJob(counters, cancel_all)
    runner = JobRunner(config, tasks, "w:127.0.0.1:1", UnansweredJobs())
    return running, runner


def job_for(config, running: RunningJob, task: str = "t", raw: bytes = b'{"x": 1}', handle: str = "H:1") -> Job:
    job = Job(Conn(), handle, task, "u1", raw, config, running.cancel)
    running.begin(job, 100.0)
    return job


def failure_reason(packets: bytes) -> dict:
    start = packets.index(b"{")
    end = packets.rindex(b"}") + 1
    return json.loads(packets[start:end])


def test_begin_publishes_the_job_with_its_start_and_finish_clears_it(config):
    running, _ = make(config, {"t": lambda job: 1})
    job = job_for(config, running)
    assert running.job is job and job.started == running.started == running.attempt_started == 100.0
    assert running.overdue(150.0, 60.0) is None and running.overdue(161.0, 60.0) is job
    running.attempt(150.0)  # a new attempt: job_timeout counts from here
    assert running.overdue(161.0, 60.0) is None
    assert running.finish() is False and running.job is None
    assert running.overdue(1000.0, 60.0) is None


def test_outcome_and_counters_of_a_success_after_retries(config):
    calls = []

    def flaky(job):
        calls.append(job.attempt)
        if len(calls) < 3:
            raise ValueError("not yet")
        return {"ok": True}

    running, runner = make(config, {"t": flaky})
    job = job_for(config, running)
    reply = runner.run(running, job)
    assert calls == [1, 2, 3] and b'"attempts":3' in reply
    assert running.attempt_started > 100.0  # the runner started each attempt's clock
    assert running.finish() is False
    stats = summarize([running.counters])["t"]
    assert (stats["complete"], stats["failed"], stats["retried"]) == (1, 0, 2)


def test_outcome_of_a_reported_job_is_left_for_the_thread(config):
    config.outcomes.report = True
    running, runner = make(config, {"t": lambda job: {"n": 2}})
    job = job_for(config, running)
    runner.run(running, job)
    assert job.outcome["state"] == "complete" and job.outcome["handle"] == "H:1"
    assert job.outcome["server"] == "127.0.0.1:4730" and job.outcome["attempts"] == 1
    failing, runner2 = make(config, {"t": lambda job: 1 / 0})
    config.worker.retries = 0
    runner2 = JobRunner(config, {"t": lambda job: 1 / 0}, "w", UnansweredJobs())
    job2 = job_for(config, failing, handle="H:2")
    runner2.run(failing, job2)
    assert job2.outcome["state"] == "failed" and "ZeroDivisionError" in job2.outcome["reason"]["error"]


def test_cancel_at_shutdown_abandons_the_job(config):
    running, runner = make(config, {"t": lambda job: job.cancel.wait(5) and "late"})
    job = job_for(config, running)
    running.cancel_now()
    with pytest.raises(Abandoned):
        runner.run(running, job)


def test_stop_by_operator_fails_the_job_and_the_next_job_starts_uncancelled(config):
    started = threading.Event()

    def slow(job):
        started.set()
        job.cancel.wait(5)
        raise RuntimeError("killed")

    running, runner = make(config, {"t": slow})
    job = job_for(config, running)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("reply", runner.run(running, job)))
    t.start()
    assert started.wait(5)
    assert running.request_stop(job)
    t.join(5)
    assert failure_reason(out["reply"])["error"] == STOPPED_BY_OPERATOR
    assert running.finish() is False
    assert not running.request_stop(job)  # it ended: nothing to stop
    nxt = job_for(config, running, handle="H:2")
    assert not nxt.cancel.is_set() and not running.stop_requested


def test_stop_does_not_clear_a_shutdown_cancel(config):
    cancel_all = threading.Event()
    running, _ = make(config, {"t": lambda job: 1}, cancel_all)
    job = job_for(config, running)
    running.request_stop(job)
    running.finish()
    cancel_all.set()
    running.cancel_now()
    job_for(config, running, handle="H:2")
    assert running.cancel.is_set()  # the process is cancelling every job


def test_abandonment_and_answer_exclude_each_other(config):
    running, _ = make(config, {"t": lambda job: 1})
    job = job_for(config, running)
    assert running.abandon(job) and running.abandoned and running.cancel.is_set()
    assert not running.abandon(job)  # once
    assert not running.request_stop(job)  # an abandoned job is the watchdog's
    assert running.finish() is True  # the thread must send nothing for it
    running2, _ = make(config, {"t": lambda job: 1})
    job2 = job_for(config, running2)
    assert running2.finish() is False
    assert not running2.abandon(job2)  # it answered first: the watchdog leaves it alone


def test_abandonment_races_the_answer_exactly_one_wins(config):
    for i in range(200):
        running, _ = make(config, {"t": lambda job: 1})
        job = job_for(config, running, handle=f"H:{i}")
        results = {}
        go = threading.Barrier(2)

        def thread():
            go.wait()
            results["thread_abandoned"] = running.finish()

        def watchdog():
            go.wait()
            results["watchdog"] = running.abandon(job)

        ts = [threading.Thread(target=thread), threading.Thread(target=watchdog)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(5)
        # either the watchdog took the job (and the thread answers nothing), or the thread answered
        assert results["watchdog"] == results["thread_abandoned"]


def test_watchdog_timeout_interrupts_a_retry_backoff(config):
    def failing(job):
        raise ValueError("boom")

    running, runner = make(config, {"t": failing})
    runner.retry.backoff = lambda attempt: 30.0  # a long backoff the abandonment must cut short
    job = job_for(config, running)
    out = {}

    def run():
        try:
            runner.run(running, job)
        except Abandoned:
            out["abandoned"] = True

    t = threading.Thread(target=run)
    t.start()
    wait_until(lambda: running.attempt_started > 100.0, 5, message="first attempt ran")
    assert running.overdue(running.attempt_started + 61, 60.0) is job
    assert running.abandon(job)
    t.join(5)
    assert not t.is_alive() and out == {"abandoned": True}
    assert running.finish() is True
