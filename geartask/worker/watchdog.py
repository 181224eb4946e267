"""The watchdog: plugin tasks past worker.job_timeout are failed and their threads replaced."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from .. import gearman as gp
from ..errors import ServerError
from ..logs import get_logger, job_context

from .grab import ANSWER_TIMEOUT, GrabLoop, shut
from .job import Job

if TYPE_CHECKING:
    from .process import WorkerProcess

log = get_logger("geartask.worker")

WATCHDOG_INTERVAL = 0.5  # seconds between looks for plugin tasks past worker.job_timeout


class Watchdog(threading.Thread):
    """Fails plugin tasks that outlive ``worker.job_timeout``, and replaces their threads.

    Python code can't be killed from outside: the stuck thread is left to finish on its own
    (its result is then dropped), the job fails with the reason (a requeue would only hang
    the next worker too; the job is never run here again) and a new thread takes its place.
    Shell commands and isolated tasks end themselves at their own timeout and are left alone.
    ``abandon`` is also how a ``stop`` control command ends a plugin task.
    """

    def __init__(self, process: "WorkerProcess"):
        super().__init__(name="watchdog", daemon=True)
        self.process = process
        self.limit = process.config.worker.job_timeout

    def run(self) -> None:
        process = self.process
        while not process.finished.wait(WATCHDOG_INTERVAL):
            now = time.monotonic()
            for t in list(process.job_threads):
                running = t.running
                job = running.overdue(now, self.limit)
                if job is not None and job.task not in process.own_timeout and not process.stopping.is_set():
                    seconds = now - running.attempt_started
                    limit = self.limit
                    self.abandon(t, job, {
                        "error": f"timed out after {seconds:.1f}s (worker.job_timeout {limit:g}s); a Python task "
                                 f"can't be killed, so its thread was abandoned and replaced (worker.isolate "
                                 f"runs a task in a process that can be)", "timed_out": True},
                        "task timed out; failing the job and replacing its thread",
                        seconds=round(seconds, 3), job_timeout=limit)

    def abandon(self, t: GrabLoop, job: Job, reason: dict, event: str, **fields) -> bool:
        """Fail ``job`` for its stuck thread ``t`` with ``reason`` (logged as ``event``) and
        start a replacement thread. False when the job answered in the meantime."""
        process = self.process
        if not t.running.abandon(job):
            return False  # it answered in the meantime
        conn = job.connection
        key = (job.server, job.handle, job.unique)
        process.unanswered.count(key, at_least=process.unanswered.limit)  # never run here again
        seconds = time.monotonic() - job.started
        with job_context(task=job.task, handle=job.handle, unique=job.unique):
            log.warning(event, thread=t.index, **fields)
            packets = process.runner.fail(job, reason, job.attempt, seconds)
        process.count_finished(job.task, seconds)
        t.retire(keep=conn)  # its other connections: a late GRAB must not catch a job
        process.replace_thread(t)
        threading.Thread(target=self._deliver_failure, args=(t, conn, packets), daemon=True,
                         name=f"watchdog-{t.index}").start()
        process.budget.job_done()
        return True

    @staticmethod
    def _deliver_failure(t: GrabLoop, conn: gp.Connection, packets: bytes) -> None:
        """Send a stuck job's failure, and shut its connection only once gearmand has processed
        it: gearmand requeues the jobs of a connection that closes, and may do so before it
        handles packets still queued from it (the job then ran again elsewhere). Its answer to
        an ECHO sent after the failure proves the failure was handled."""
        token = b"geartask-watchdog-%d" % id(conn)
        echo_res = gp.response_bytes(gp.ECHO_RES, token)
        sock = conn.sock
        try:
            conn.send_raw(packets + gp.pack(gp.ECHO_REQ, data=token))
            seen = b""
            deadline = time.monotonic() + ANSWER_TIMEOUT
            while echo_res not in seen and sock is not None:
                left = deadline - time.monotonic()
                if left <= 0 or not gp.wait_readable(sock.fileno(), left):
                    break
                chunk = sock.recv(65536)
                if not chunk:
                    break
                seen = seen[-len(echo_res):] + chunk
        except (ServerError, OSError, ValueError):
            pass  # the connection is gone: gearmand requeues the job, and we refuse it if it comes back
        finally:
            shut(conn)
            t.released.set()
