"""Reporting job outcomes: each one reaches the job's server before the job's own answer.

A worker reports the final outcome of every background job, of every job that fails for
good, and of every job without geartask's envelope (it can't tell those background from
foreground), as background jobs of ``geartask.outcomes`` on the server the job came from
(the collector stores them: geartask.outcomes). The outcome job goes out before the job's
WORK_COMPLETE/WORK_FAIL, in the same write on the same connection, and gearmand handles one
connection's packets in order: once gearmand considers a job finished, its outcome is in
gearmand too, whatever happens to the worker next.

A background job's answer may wait a little (OUTCOME_DELAY) so that many outcomes share one
outcome job: with gearmand's sqlite queue every job costs a row insert and delete, and a
job per outcome would double a drain's cost. Nobody waits for a background job's answer; a
worker killed meanwhile leaves those jobs unanswered, so gearmand gives them to another worker.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from typing import TYPE_CHECKING, Callable

from .. import gearman as gp
from ..logs import get_logger
from ..outcomes.record import OUTCOME_FUNCTION, outcome_jobs

if TYPE_CHECKING:
    from .grab import Link

log = get_logger("geartask.worker")

OUTCOME_BATCH = 100  # background outcomes held per connection before they go out together
OUTCOME_DELAY = 0.25  # seconds a background job's answer may wait for others to share its outcome job
_SUBMIT_BG = gp.submit_command("normal", True)


def outcome_packets(records: list[dict], acks: "collections.deque[bytes]",
                    sign: Callable[[bytes], bytes] | None = None) -> bytes:
    """The SUBMIT_JOB_BG packets that carry ``records``; each payload is remembered in ``acks``
    until gearmand answers it (JOB_CREATED, or ERROR: then the records are kept locally).
    ``sign`` (WorkerTrust.sign_report, with ``security.key``) signs each payload for ``report``;
    the unique key stays the unsigned payload's, so a resent batch is still one job."""
    packets = []
    for unique, payload in outcome_jobs(records, max_records=OUTCOME_BATCH):
        acks.append(payload)
        if sign is not None:
            payload = sign(payload)
        packets.append(gp.pack(_SUBMIT_BG, task=OUTCOME_FUNCTION, unique=unique, data=payload))
    return b"".join(packets)


class HeldAnswers:
    """Background jobs' answers a process holds back for a moment, per connection, with their
    outcome records; a flusher thread sends what has waited OUTCOME_DELAY, the grab threads
    send a full batch, and before they sleep or stop."""

    def __init__(self, delay: float = OUTCOME_DELAY, size: int = OUTCOME_BATCH,
                 sign: Callable[[bytes], bytes] | None = None):
        self.delay, self.size = delay, size
        self.sign = sign  # signs outcome jobs (outcome_packets), None without security.key
        self.lock = threading.Lock()
        self.held: dict[int, tuple["Link", list[dict], list[bytes], float]] = {}  # id(link) ->
        self.wake = threading.Event()
        self.stopped = False
        self._flusher: threading.Thread | None = None

    def now_or_later(self, link: "Link", record: dict, answer: bytes, hold: bool) -> bytes:
        """What to send on ``link`` now for this job: b"" when its answer is held, else its
        outcome and answer (with any held before them on this link)."""
        with self.lock:
            entry = self.held.get(id(link))
            if entry is None:
                entry = self.held[id(link)] = (link, [], [], time.monotonic())
            entry[1].append(record)
            entry[2].append(answer)
            if hold and len(entry[1]) < self.size:
                flusher = None
                if self._flusher is None:
                    flusher = self._flusher = threading.Thread(target=self._run, name="outcomes", daemon=True)
                self.wake.set()
            else:
                del self.held[id(link)]
                return outcome_packets(entry[1], link.acks, self.sign) + b"".join(entry[2])
        if flusher is not None:
            flusher.start()
        return b""

    def take(self, link: "Link") -> bytes:
        """Everything held for ``link``, to send now (before it sleeps, or the thread stops)."""
        with self.lock:
            entry = self.held.pop(id(link), None)
        if entry is None:
            return b""
        return outcome_packets(entry[1], link.acks, self.sign) + b"".join(entry[2])

    def forget(self, link: "Link") -> int:
        """``link`` is gone: its held answers never go out (gearmand requeues those jobs)."""
        with self.lock:
            entry = self.held.pop(id(link), None)
        return len(entry[1]) if entry else 0

    def close(self) -> None:
        self.stopped = True
        self.wake.set()

    def _run(self) -> None:
        while not self.stopped:
            self.wake.wait()
            self.wake.clear()
            while not self.stopped:
                time.sleep(self.delay)
                due: list[tuple["Link", bytes]] = []
                now = time.monotonic()
                with self.lock:
                    for key, (link, records, answers, since) in list(self.held.items()):
                        if now - since >= self.delay:
                            del self.held[key]
                            due.append((link, outcome_packets(records, link.acks, self.sign) + b"".join(answers)))
                    more = bool(self.held)
                for link, data in due:
                    try:
                        link.conn.send_raw(data)  # Connection.send_raw is safe against the grab thread's sends
                    except Exception as e:  # the grab thread sees the broken connection and drops it
                        log.warning("held answers not delivered; gearmand will requeue those jobs",
                                    server=link.conn.address, error=str(e))
                if not more:
                    break


def refused(payload: bytes) -> list[dict]:
    """The records of an outcome job gearmand refused (for the local fallback file)."""
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError):
        return []
    return value if isinstance(value, list) else [value]
