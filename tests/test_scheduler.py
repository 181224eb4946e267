"""Periodic jobs end to end: real schedulers (`send_job_client.py schedule`), a real worker, the
real outcomes collector and gearmand; each job appends its slot (its unique key) to a file."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

import gearclient as gc
from helpers import PYTHON, REPO, run_script, wait_until, write_config
from test_outcomes_collector import collector_config, collectors  # noqa: F401 (a fixture)
from test_worker import TEST_PLUGINS
from workers import WorkerProc

SEND = REPO / "send_job_client" / "send_job_client.py"


def runs(marker: Path) -> Counter:
    """How often each slot's job ran (by unique key)."""
    if not marker.exists():
        return Counter()
    return Counter(json.loads(line)["unique"] for line in marker.read_text().splitlines() if line.strip())


@pytest.fixture
def cron(fresh_gearmand, tmp_path, collectors):
    """(config for schedulers with ``schedules``, marker file, start_scheduler, srv)."""
    srv = fresh_gearmand
    collectors(collector_config(tmp_path, [srv.address]), [srv.address])
    marker = tmp_path / "runs.jsonl"
    worker_cfg = write_config(tmp_path / "worker" / "config.yaml", [srv.address], "worker:\n  poll_timeout: 1\n",
                              plugin_paths=[REPO / "plugins", TEST_PLUGINS])
    worker = WorkerProc(worker_cfg, "cronw", 4).wait_attached([srv.address])
    procs: list[subprocess.Popen] = []

    def config(schedules: list[dict], name: str = "sched") -> Path:
        body = "schedules:\n" + "".join(f"  - {json.dumps(s)}\n" for s in schedules)
        return write_config(tmp_path / name / "config.yaml", [srv.address], body,
                            plugin_paths=[REPO / "plugins", TEST_PLUGINS])

    def start(cfg: Path, *args: str) -> subprocess.Popen:
        out = open(cfg.parent / f"scheduler-{len(procs)}.out", "w")
        p = subprocess.Popen([PYTHON, str(SEND), "--config", str(cfg), "schedule", *args], stdout=out,
                             stderr=subprocess.STDOUT, cwd=cfg.parent)
        procs.append(p)
        return p

    yield config, marker, start, srv
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    worker.stop()


def slot_of(unique: str) -> str:
    return unique.split("@", 1)[1]


@pytest.mark.slow
def test_three_schedulers_run_each_slot_once_even_when_two_die(cron):
    """One schedule every 2 s, three schedulers for 30 s, two of them killed -9 halfway: every
    slot in the window ran, and ran once."""
    config, marker, start, srv = cron
    cfg = config([{"name": "tick", "every": 2, "task": "t.record", "data": {"file": str(marker)}}])
    t0 = time.time()
    schedulers = [start(cfg) for _ in range(3)]
    time.sleep(15)
    for p in schedulers[:2]:
        p.send_signal(signal.SIGKILL)
    time.sleep(15)
    schedulers[2].send_signal(signal.SIGTERM)
    assert schedulers[2].wait(20) == 0
    t1 = time.time()
    wait_until(lambda: gc.queued(srv.address, "t.record") == 0, 20, message="the last handed-over slot ran")
    counts = runs(marker)
    assert counts and max(counts.values()) == 1, [u for u, n in counts.items() if n > 1]
    # Every slot from the first after start to the last before the end ran (none missed).
    expected = {time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) for t in range(math.ceil(t0 / 2) * 2 + 2,
                                                                                 int(t1) - 1, 2)}
    ran = {slot_of(u) for u in counts}
    assert expected <= ran, sorted(expected - ran)


@pytest.mark.slow
def test_a_missed_slot_runs_once_under_latest_and_not_at_all_under_skip(cron):
    """A scheduler killed before it handed a slot over and started again 5 s later, after the
    slot: under misfire latest the slot runs once (late); under skip it never runs."""
    config, marker, start, srv = cron
    every = 8  # slots are handed over 4 s ahead; the scheduler is down from 4.6 s before the slot to 0.4 s after
    cfg = config([{"name": "late", "every": every, "task": "t.record", "data": {"file": str(marker)}},
                  {"name": "skip", "every": every, "task": "t.record", "data": {"file": str(marker)},
                   "misfire": "skip"}])
    now = time.time()
    slot = (math.floor(now / every) + 2) * every  # a slot at least one period away
    first = start(cfg)
    wait_until(lambda: time.time() >= slot - 4.6, every * 3, interval=0.02, message="4.6 s before the slot")
    first.send_signal(signal.SIGKILL)  # before it hands the slot over (4 s ahead)
    first.wait(10)
    time.sleep(5)  # back 0.4 s after the slot
    start(cfg)
    text = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(slot))
    wait_until(lambda: runs(marker)[f"late@{text}"] >= 1, 15, message="the missed slot of 'late' ran")
    time.sleep(3)  # 'skip' would have been sent at the same pass, to run 2 s later
    counts = runs(marker)
    assert counts[f"late@{text}"] == 1
    assert counts[f"skip@{text}"] == 0


def test_once_from_two_processes_at_the_same_moment_runs_each_slot_once(cron):
    """System cron on two machines runs `schedule --once` at the same minute: the due slot is
    sent by both, and runs once; the next slot, handed over ahead, is held in gearmand once."""
    config, marker, start, srv = cron
    cfg = config([{"name": "minutely", "cron": "* * * * *", "task": "t.record", "data": {"file": str(marker)}}])
    # as system cron does, early in the minute: a new schedule sends a past slot only while it
    # is late by less than the lead (30 s here); later in the minute only the next one goes
    wait_until(lambda: time.time() % 60 < 15, 60, 0.2, message="the start of a minute")
    a, b = start(cfg, "--once", "--json"), start(cfg, "--once", "--json")
    assert a.wait(30) == 0 and b.wait(30) == 0
    wait_until(lambda: runs(marker), 15, message="the due slot ran")
    time.sleep(2.5)  # a second copy, had it not met the first in gearmand, would run by now
    counts = runs(marker)
    assert counts and all(n == 1 for n in counts.values()), counts  # the due slot (and the next, if it came): once
    assert gc.queued(srv.address, "t.record") <= 1  # the next minute's job, if handed over and not run yet: once


@pytest.mark.parametrize("schedule, words", [
    ({"name": "a", "cron": "61 * * * *", "task": "t.record"}, "bad cron expression"),
    ({"name": "a", "every": 5, "task": "no.such"}, "unknown task 'no.such'"),
    ({"name": "a", "every": -5, "task": "t.record"}, "'every'"),
])
def test_bad_schedules_exit_2_with_one_line(tmp_path, gearmand, schedule, words):
    cfg = write_config(tmp_path / "config.yaml", [gearmand.address], f"schedules:\n  - {json.dumps(schedule)}\n",
                       plugin_paths=[REPO / "plugins", TEST_PLUGINS])
    r = run_script("send_job_client/send_job_client.py", "--config", str(cfg), "schedule", "--once")
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"{cfg}: schedules[0] (a)" in r.stderr


def test_two_schedules_with_one_name_exit_2(tmp_path, gearmand):
    cfg = write_config(tmp_path / "config.yaml", [gearmand.address],
                       'schedules:\n  - {"name": "d", "every": 5, "task": "t.record"}\n'
                       '  - {"name": "d", "every": 7, "task": "t.record"}\n',
                       plugin_paths=[REPO / "plugins", TEST_PLUGINS])
    r = run_script("send_job_client/send_job_client.py", "--config", str(cfg), "schedule", "list")
    assert r.returncode == 2 and "two schedules are named 'd'" in r.stderr


def test_schedule_list_shows_next_runs_and_the_last_run(cron):
    config, marker, start, srv = cron
    cfg = config([{"name": "lister", "every": 2, "task": "t.record", "data": {"file": str(marker)}}])
    p = start(cfg)
    wait_until(lambda: runs(marker), 15, message="a run")
    p.send_signal(signal.SIGTERM)
    p.wait(20)
    r = run_script("send_job_client/send_job_client.py", "--config", str(cfg), "schedule", "list", "--json")
    assert r.returncode == 0, r.stderr
    (row,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert row["name"] == "lister" and len(row["next"]) == 3
    assert row["last"] is not None and row["last"]["state"] == "complete" and row["last"]["worker"].startswith("cronw:")
