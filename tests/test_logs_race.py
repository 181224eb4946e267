"""job_context under threads of a fresh process (issue 21: structlog's lazily made ContextVars
raced and failed jobs), and geartask as a library: silent until its user configures logging."""

from __future__ import annotations

import json
import subprocess
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import structlog

from geartask import logs
from geartask.config import LogConfig
from geartask.logs import configure_logging, flush_logs, get_logger, job_context
from helpers import PYTHON, REPO


class _FirstCreationRace(dict):
    """structlog's registry of ContextVars, with the race forced: a key's first store waits
    until two threads have both missed it, so both make their own ContextVar for it."""

    def __init__(self) -> None:
        super().__init__()
        self.barrier = threading.Barrier(2, timeout=2)

    def __setitem__(self, key, value):
        try:
            self.barrier.wait()
        except threading.BrokenBarrierError:
            pass  # only one thread got here: no race to force
        super().__setitem__(key, value)


def _two_threads_at_once(body) -> list[BaseException | None]:
    errors: list[BaseException | None] = [None, None]

    def run(i: int) -> None:
        try:
            body(i)
        except BaseException as e:  # noqa: BLE001 - the test reports what each thread raised
            errors[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return errors


def test_the_forced_interleaving_breaks_structlogs_own_binding(monkeypatch):
    """The harness is real: structlog's bind/reset fails under it (the bug the worker had)."""
    monkeypatch.setattr(structlog.contextvars, "_CONTEXT_VARS", _FirstCreationRace())
    bound = threading.Barrier(2, timeout=5)

    def bind_and_reset(i: int) -> None:  # what job_context did, with the job between
        tokens = structlog.contextvars.bind_contextvars(race_key=i)
        bound.wait()
        structlog.contextvars.reset_contextvars(**tokens)

    errors = _two_threads_at_once(bind_and_reset)
    assert any(isinstance(e, ValueError) and "different ContextVar" in str(e) for e in errors), errors


def test_job_context_survives_threads_binding_its_keys_for_the_first_time_at_once(tmp_path, monkeypatch):
    monkeypatch.setattr(structlog.contextvars, "_CONTEXT_VARS", _FirstCreationRace())
    path = configure_logging(LogConfig(dir=str(tmp_path), level="debug"), "worker", "w1", stream=open("/dev/null", "w"))
    log = get_logger("geartask.worker")
    entered = threading.Barrier(2, timeout=5)

    def job(i: int) -> None:
        with job_context(task=f"t{i}", handle=f"H:{i}", unique=f"u{i}"):
            entered.wait()  # both inside at once
            log.info("job line", n=i)

    assert _two_threads_at_once(job) == [None, None]
    flush_logs()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    jobs = {e["n"]: e for e in lines if e["event"] == "job line"}
    assert {n: (e["task"], e["handle"], e["unique"]) for n, e in jobs.items()} == {
        0: ("t0", "H:0", "u0"), 1: ("t1", "H:1", "u1")}
    log.info("after")  # and nothing is left bound outside
    flush_logs()
    after = [json.loads(line) for line in path.read_text().splitlines() if '"after"' in line]
    assert "task" not in after[-1]


class _BrokenVar:
    def get(self):
        raise RuntimeError("broken context")

    def set(self, value):
        raise RuntimeError("broken context")


def test_a_logging_failure_never_reaches_the_job(monkeypatch):
    monkeypatch.setattr(logs, "_job_fields", _BrokenVar())
    ran = []
    with job_context(task="t", handle="H:1"):
        ran.append(True)
    assert ran == [True]
    with pytest.raises(KeyError, match="the job's own"):  # the job's exceptions still pass through
        with job_context(task="t"):
            raise KeyError("the job's own")


STRESS = textwrap.dedent("""
    import sys, threading
    sys.setswitchinterval(1e-6)
    from geartask.logs import job_context, get_logger
    log = get_logger("geartask.worker")
    start = threading.Barrier(32)
    failed = []
    def job(n):
        start.wait()
        try:
            with job_context(task="t", handle=f"H:{n}", unique=f"u{n}"):
                log.debug("x")
        except Exception as e:
            failed.append(repr(e))
    threads = [threading.Thread(target=job, args=(n,)) for n in range(32)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print(len(failed), failed[:1])
""")


def test_32_threads_entering_job_context_at_once_in_40_fresh_processes(tmp_path):
    """The issue's reproduction (it failed in 3 of 40 processes): bounded, 4 processes at a time."""
    def one(_: int) -> str:
        return subprocess.run([PYTHON, "-c", STRESS], capture_output=True, text=True, timeout=60,
                              cwd=REPO).stdout.strip().splitlines()[-1]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(40)))
    assert results == ["0 []"] * 40


LIBRARY_SCRIPT = textwrap.dedent("""
    import sys
    from geartask import JobSender, load_config
    config = load_config(sys.argv[1])
    with JobSender(config) as sender:
        results = sender.submit_many([{"task": sys.argv[2], "data": {"n": n}, "background": True}
                                      for n in range(3)])
    assert len(results) == 3 and all(r.ok for r in results), results
""")


def test_jobsender_used_as_a_library_prints_nothing(tmp_path, gearmand, make_config, fname):
    path, _ = make_config(gearmand)
    done = subprocess.run([PYTHON, "-c", LIBRARY_SCRIPT, str(path), fname], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("", "")


def test_a_library_user_who_configures_logging_sees_geartasks_lines(tmp_path, gearmand, make_config, fname):
    path, _ = make_config(gearmand)
    script = "import logging; logging.basicConfig(level=logging.DEBUG)\n" + LIBRARY_SCRIPT
    done = subprocess.run([PYTHON, "-c", script, str(path), fname], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "DEBUG:geartask.sender:connected" in done.stderr, done.stderr
