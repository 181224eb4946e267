"""The clear-queue grab loop: take queued jobs of a function as a worker and fail each."""

from __future__ import annotations

from typing import Callable

from ..gearman import CAN_DO, CANT_DO, GRAB_JOB_UNIQ, JOB_ASSIGN_UNIQ, NO_JOB, WORK_FAIL, Connection, pack

# Grabs pipelined per round trip. Small on purpose: with the sqlite queue each WORK_FAIL costs
# gearmand a synchronous row delete (~2.5 ms here), and a batch must finish within the timeout.
DRAIN_BATCH = 50


def drain(conn: Connection, function: str, limit: int, timeout: float,
          progress: Callable[[int], None] | None = None) -> int:
    """Grab up to ``limit`` queued jobs of ``function`` and fail each; returns how many.

    ``progress(n)`` is told each batch of ``n`` removals as it is sent, so a caller whose
    server dies half way still knows how many went (the return value is then lost).

    gearmand hands out only queued jobs, so running ones are untouched; a grab that races a
    real worker just means that worker got the job first.
    """
    conn.send(CAN_DO, task=function)
    cleared = 0
    try:
        while cleared < limit:
            n = min(DRAIN_BATCH, limit - cleared)
            conn.send_raw(pack(GRAB_JOB_UNIQ) * n)
            fails, empty = [], False
            for _ in range(n):
                p = conn.expect({JOB_ASSIGN_UNIQ, NO_JOB}, timeout)
                if p.cmd == NO_JOB:
                    empty = True
                else:
                    fails.append(pack(WORK_FAIL, job_handle=p["job_handle"]))
            if fails:
                conn.send_raw(b"".join(fails))
                cleared += len(fails)
                if progress is not None:
                    progress(len(fails))
            if empty:
                break
    finally:
        if conn.connected:
            conn.send(CANT_DO, task=function)
    return cleared
