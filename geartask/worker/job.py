"""A job as a worker thread holds it: what a task receives, and the packets that answer it."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from .. import gearman as gp
from ..envelope import EnvelopeError, unwrap_cached
from ..errors import GeartaskError
from ..jobs import decode_payload, encode_payload
from ..logs import get_logger

from .errors import JobRejected

if TYPE_CHECKING:
    from ..config import Config

log = get_logger("geartask.worker")

STOPPED_BY_OPERATOR = "stopped by operator"  # the reason of a job ended by a `stop` control command


class Job:
    """What a plugin task receives (``fn(job)``); see geartask.hookspecs.geartask_tasks.

    ``data`` (decoded on first use), ``raw``, ``task``, ``handle``, ``unique``, ``attempt``
    (1 for the first try), ``retries`` (how many this job gets), ``config``, ``log`` (bound to
    this job on first use), ``cancel`` (an Event set when the job must stop: the worker's
    grace is over, or an operator stopped it), and ``status()``/``send_data()`` for progress.
    """

    __slots__ = ("task", "handle", "unique", "raw", "attempt", "config", "cancel",
                 "_conn", "_data", "_decoded", "retries", "_log", "started", "options", "outcome", "signed",
                 "function")

    def __init__(self, conn: Any, handle: str, task: str, unique: str, raw: bytes,
                 config: Config, cancel: threading.Event):
        self._conn = conn
        self.handle, self.task, self.unique, self.raw = handle, task, unique, raw
        self.function = task  # the gearmand function it came as: task, or a targeted form (TASK@host:HOST)
        self.config, self.cancel = config, cancel
        self.attempt = 1
        self.retries = 0
        self._decoded = False
        self._data = None
        self._log = None
        self.started = 0.0  # monotonic time the worker took the job (for ping)
        self.options: dict | None = None  # the sender's envelope (geartask.envelope); None for a plain job
        self.outcome: dict | None = None  # the outcome record to report (geartask.worker.outcomes), if any
        self.signed: Any = None  # a signed job's Signed (geartask.worker.runner): signer, line, envelope

    def open_envelope(self) -> None:
        """Take geartask's options off the payload, leaving ``raw`` as the user's bytes.
        JobRejected for a malformed envelope: a job that says it is geartask's but can't be
        read must fail clearly, not run with guessed options."""
        try:
            self.options, self.raw = unwrap_cached(self.raw)
        except EnvelopeError as e:
            raise JobRejected(str(e)) from None
        at = self.options.get("at") if self.options else None
        if at is not None:  # a sender's clock (or a forger) must not date a job in the future
            skew, now = self.config.outcomes.max_clock_skew, time.time()
            if at > now + skew:
                self.options = {k: v for k, v in (self.options or {}).items() if k != "at"}  # not into its record
                raise JobRejected(f"envelope 'at' is {at - now:.0f} s ahead of this worker's clock "
                                  f"(more than outcomes.max_clock_skew, {skew:g} s)")

    @property
    def log(self) -> Any:
        # Bound on first use: binding costs as much as the rest of a no-op job, and most
        # tasks never log (the per-job line comes from the worker, with job_context).
        if self._log is None:
            self._log = log.bind(task=self.task, handle=self.handle, unique=self.unique)
        return self._log

    @property
    def data(self) -> Any:
        """The payload decoded: JSON, else text, else bytes. JobRejected when it can't be."""
        if not self._decoded:
            try:
                self._data = decode_payload(self.raw)
            except RecursionError:
                raise JobRejected(f"job data is JSON nested too deeply to decode ({len(self.raw)} bytes)") from None
            self._decoded = True
        return self._data

    @property
    def decoded(self) -> Any:
        """The payload as ``data`` decoded it, or None when no one asked for ``data``."""
        return self._data if self._decoded else None

    @property
    def connection(self) -> Any:
        """The connection the job came on (its answer goes back on it)."""
        return self._conn

    @property
    def server(self) -> str:
        """The job server this job came from (host:port as configured)."""
        return self._conn.address

    def status(self, numerator: int, denominator: int) -> None:
        """Report progress (WORK_STATUS) to the client waiting for this job."""
        self._conn.send(gp.WORK_STATUS, job_handle=self.handle, numerator=int(numerator),
                        denominator=int(denominator))

    def send_data(self, data: Any) -> None:
        """Send partial output (WORK_DATA) to the client waiting for this job."""
        self._conn.send(gp.WORK_DATA, job_handle=self.handle, data=encode_payload(data, self.task))


class Abandoned(Exception):
    """Control flow, not an error: the job was taken from its thread (the grace ran out at
    shutdown, so gearmand gives it to another worker; or the watchdog or a ``stop`` command
    answered for it). The thread sends nothing for it."""

    def __init__(self, handle: str):
        super().__init__(f"job {handle} abandoned; this thread does not answer it")
        self.handle = handle


def success_packets(handle: str, payload: bytes, attempts: int) -> bytes:
    """WORK_COMPLETE; after retries (``attempts`` > 1) preceded by WORK_WARNING
    ``{"geartask": {"attempts": N}}`` in the same write, so the sender can show them."""
    done = gp.pack(gp.WORK_COMPLETE, job_handle=handle, data=payload)
    if attempts > 1:
        note = encode_payload({"geartask": {"attempts": attempts}})
        return gp.pack(gp.WORK_WARNING, job_handle=handle, data=note) + done
    return done


def failure_packets(handle: str, reason: dict) -> bytes:
    """WORK_WARNING with the JSON reason, then WORK_FAIL.

    Not WORK_EXCEPTION: gearmand 1.1 ends the job on WORK_EXCEPTION but forwards it only to
    clients that asked for exceptions (OPTION_REQ "exceptions"); every other client waits for
    an answer that never comes (seen with the C `gearman` client). WORK_WARNING reaches every
    client, and WORK_FAIL then tells each of them, in the protocol's own terms, that it failed.
    """
    try:
        data = encode_payload(reason)
    except (GeartaskError, RecursionError):  # details a task filled with what JSON can't hold
        data = encode_payload({k: v for k, v in reason.items() if isinstance(v, (str, int, bool))})
    return gp.fail_packets(handle, data)
