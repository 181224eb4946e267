"""The listener hand-off between a worker's idle threads (geartask.worker.grab.Sleepers).

When the listening thread gets a job, a parked thread takes over listening with PRE_SLEEP
rather than a GRAB that would, for a single job, come back NO_JOB (gearmand answers
PRE_SLEEP with a NOOP at once when a job waits, so nothing waits longer for it).
"""

from __future__ import annotations

import gearclient as gc
from helpers import wait_until
from workers import in_process_worker


def test_a_sequential_job_costs_at_most_one_empty_grab(gearmand, make_config):
    _, config = make_config(gearmand, "worker:\n  poll_timeout: 30\n")
    with in_process_worker(config, gearmand.address, "listen", 4) as process:
        threads = process.job_threads
        wait_until(lambda: sum(t.no_jobs for t in threads) >= 4, 10, message="all threads idle")
        before = sum(t.no_jobs for t in threads)
        for i in range(40):
            out = gc.run_one(gearmand.address, "eg.reverse", f"j{i}")
            assert out.state == "complete" and out.result == {"reversed": f"j{i}"[::-1]}
        per_job = (sum(t.no_jobs for t in threads) - before) / 40
        # Before: ~2 (the job's thread after its answer, and the unparked thread's GRAB).
        assert per_job <= 1.25, f"{per_job:.2f} empty grabs per sequential job"


def test_jobs_waiting_when_a_thread_starts_listening_are_not_left_waiting(gearmand, make_config):
    """A burst after idling still spreads over every thread, each listening in turn."""
    _, config = make_config(gearmand, "worker:\n  poll_timeout: 30\n")
    with in_process_worker(config, gearmand.address, "listen", 4) as process:
        threads = process.job_threads
        wait_until(lambda: sum(t.no_jobs for t in threads) >= 4, 10, message="all threads idle")
        outs = gc.run(gearmand.address, "eg.slow", [{"seconds": 0.5}] * 4, timeout=30)
        assert all(o.state == "complete" for o in outs)
        assert sum(t.jobs_done > 0 for t in threads) == 4  # ran side by side, not one after another
        outs = gc.run(gearmand.address, "eg.reverse", [f"b{i}" for i in range(200)], timeout=30)
        assert [o.result for o in outs] == [{"reversed": f"b{i}"[::-1]} for i in range(200)]
