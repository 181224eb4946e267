"""The sender's library: submit jobs to gearmand servers, stream their results, lose none.

``JobSender(config).stream(jobs)`` yields each job's JobResult as it finishes, taking job
definitions from any iterable in bounded windows (memory is flat in the number of jobs);
``submit_many`` collects them in input order; ``status`` asks about background jobs.
Each job goes to one server chosen by rendezvous hashing of its unique key, and moves to
another only when that server refuses connections or stays silent for
``sender.failover_after`` seconds. docs/sender.md explains the rules and when a job can run
twice. The sockets are driven here, not by pygearman (see geartask/protocol.py).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import select
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .. import protocol as p
from ..errors import JobDefinitionError, NoServerError, ServerError, UsageError
from ..jobs import JobDefinition, decode_payload, new_unique
from ..logs import get_logger

from .background import RECORD_NAME, BackgroundRecord, StatusQuery, StatusResult, asks_for

__all__ = ["JobSender", "JobResult", "Progress", "StatusResult", "rendezvous"]

# gearmand 1.1.20 itself accepts payloads up to the wire format's 4 GiB (measured: 200 MB
# went through) and holds every one in memory; the sender refuses more than this per job so
# one runaway plugin can't exhaust the job server. Checked before anything is sent.
MAX_PAYLOAD = 64 * 1024 * 1024
# gearmand answers ERROR ARGUMENT_TOO_LARGE for a unique key over 64 bytes (measured).
MAX_UNIQUE = 64
BACKGROUND_RECORD = RECORD_NAME
PIPELINE_WINDOW = 2048  # unanswered SUBMIT_JOBs per connection; keeps buffers bounded (~200 KB)
OPEN_JOBS = 10_000  # jobs taken from the caller and not yet reported: the memory bound
OPEN_BYTES = 256 * 1024 * 1024  # ... and their payload bytes (one job always fits)
RECONNECT_DELAY = 0.25  # seconds before a server is tried again, doubled, capped
RECONNECT_DELAY_MAX = 2.0
MAX_WARNINGS = 8  # WORK_WARNINGs kept per job (the last is the failure reason)
MAX_DATA = MAX_PAYLOAD  # bytes of WORK_DATA kept per job; later chunks are counted, not kept

_batch_log = get_logger("geartask.sender")  # once per batch: on the W2 latency path
FINAL_STATES = ("complete", "failed", "timeout", "queued")
_OPTION = p.pack(p.OPTION_REQ, option_name=b"exceptions")  # else gearmand turns WORK_EXCEPTION into WORK_FAIL
_ECHO = p.pack(p.ECHO_REQ, data=b"geartask")


def rendezvous(unique: str, servers: list[str]) -> list[str]:
    """``servers`` ("host:port") in the order a job with this unique key tries them: highest
    blake2b(server, unique) first. The same in every process and run; removing a server moves
    only the keys it had."""
    return sorted(servers, key=lambda s: _score(hashlib.blake2b(s.encode() + b"\0", digest_size=8), unique),
                  reverse=True)


def _score(prefix: Any, unique: str) -> bytes:
    h = prefix.copy()
    h.update(unique.encode("utf-8"))
    return h.digest()


@dataclass
class JobResult:
    """What became of one job. ``state``: complete | failed | timeout | queued (accepted,
    not waited for). ``result`` is the decoded WORK_COMPLETE payload, ``error`` the reason.
    ``index`` is the job's position in the input."""

    task: str
    unique: str
    handle: str | None = None
    server: str | None = None
    state: str = "new"
    result: Any = None
    error: Any = None
    attempts: int = 0
    seconds: float = 0.0
    background: bool = False
    data: list = field(default_factory=list)  # WORK_DATA chunks, decoded (up to MAX_DATA bytes)
    warnings: list = field(default_factory=list)  # the last MAX_WARNINGS WORK_WARNING payloads
    progress: tuple[int, int] | None = None  # last WORK_STATUS (numerator, denominator)
    index: int = -1
    data_dropped: int = 0  # WORK_DATA chunks past MAX_DATA, not kept

    @property
    def ok(self) -> bool:
        return self.state in ("complete", "queued")

    def to_json(self) -> dict:
        out = {"task": self.task, "unique": self.unique, "handle": self.handle, "server": self.server,
               "state": self.state}
        if self.state in ("failed", "timeout"):
            out["error"] = self.error
        else:
            out["result"] = self.result
        out["attempts"] = self.attempts
        out["seconds"] = round(self.seconds, 3)
        return out


@dataclass
class Progress:
    """A snapshot for on_progress: counts, rate and the WORK_STATUS of running jobs.
    ``total`` is None while the jobs come from an iterator that is not exhausted yet."""

    total: int | None
    done: int
    failed: int
    accepted: int
    elapsed: float
    running: list[tuple[str, int, int]]  # (task, numerator, denominator) of jobs reporting status

    @property
    def finished(self) -> int:
        return self.done + self.failed

    @property
    def rate(self) -> float:
        return self.finished / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        if self.total is None or not self.finished or self.finished >= self.total:
            return None
        return (self.total - self.finished) / self.rate


class _Job:
    """One job in flight: its definition, wire payload, rendezvous order and where it is."""

    __slots__ = ("index", "task", "unique", "payload", "priority", "background", "max_retries",
                 "res", "started", "last_error", "server", "order", "accepted", "data_bytes")

    def __init__(self, index: int, task: str, unique: str, payload: bytes, priority: str,
                 background: bool, max_retries: int, order: list["_Server"]):
        self.index, self.task, self.unique, self.payload = index, task, unique, payload
        self.priority, self.background, self.max_retries = priority, background, max_retries
        self.res = JobResult(task=task, unique=unique, background=background, index=index)
        self.started = time.monotonic()
        self.last_error: str | None = None
        self.server: _Server | None = None
        self.order = order
        self.accepted = False
        self.data_bytes = 0

    @property
    def finished(self) -> bool:
        return self.res.state in FINAL_STATES


class _Server:
    """One job server: its connection and the jobs routed to it, sent to it (awaiting
    JOB_CREATED, in order) and accepted by it (by handle; several jobs share a handle when
    gearmand coalesced them). ``healthy`` False: given up on (refused, or silent past
    failover_after) until it answers again; no job is routed to it meanwhile."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.address = f"{host}:{port}"
        self.hash_prefix = hashlib.blake2b(self.address.encode() + b"\0", digest_size=8)
        self.conn: p.Connection | None = None
        self.connecting: socket.socket | None = None
        self.connect_started = 0.0
        self.out = bytearray()  # bytes not yet taken by the socket (never a blocking send)
        self.todo: deque[_Job] = deque()
        self.pending: deque[_Job] = deque()
        self.waiting: dict[bytes, list[_Job]] = {}
        self.option_owed = False
        self.probe_sent: float | None = None
        self.healthy = True
        self.retry_at = 0.0
        self.delay = RECONNECT_DELAY
        self.reason: str | None = None
        self.last_rx = 0.0  # when we last heard from it, or started owing it nothing
        self.trouble_since: float | None = None  # unanswered or unreachable since
        self.warned = False

    @property
    def live(self) -> bool:
        return self.conn is not None and self.conn.connected

    def owed(self) -> bool:
        return bool(self.pending) or self.option_owed or self.probe_sent is not None


class _Batch:
    """The state of one stream() call."""

    def __init__(self, jobs: Iterable[Any], wait: bool, timeout: float | None):
        self.source = iter(jobs)
        self.total: int | None = len(jobs) if hasattr(jobs, "__len__") else None  # type: ignore[arg-type]
        self.wait = wait
        self.timeout = timeout
        self.start = time.monotonic()
        self.deadline = self.start + timeout if timeout else None
        self.timed_out = False
        self.pulled = 0
        self.exhausted = False
        self.error: BaseException | None = None  # a bad definition after jobs were sent: raised at the end
        self.open: dict[int, _Job] = {}
        self.open_bytes = 0
        self.finished: deque[_Job] = deque()
        self.homeless: deque[_Job] = deque()  # no healthy server to route to
        self.to_record: list[_Job] = []
        self.done = self.failed = self.accepted = self.yielded = 0
        self.states: dict[str, int] = {}
        self.no_server_since: float | None = None
        self.last_progress = 0.0


class JobSender:
    """Submit jobs to the configured servers. Not thread-safe: one sender per thread, one
    batch at a time."""

    def __init__(self, config: Any, log: Any = None, record_background: bool = True):
        self.config = config
        self.settings = config.sender
        # Bound once: structlog's lazy proxy builds a new logger on every call otherwise.
        self.log = (log or get_logger("geartask.sender")).bind()
        self.servers = [_Server(h, port) for h, port in config.server_addresses]
        fa = self.settings.failover_after
        # The kernel ends a connection whose peer is silent for about failover_after: unacked
        # data (TCP_USER_TIMEOUT) or unanswered keepalive probes.
        self.keepalive = p.Keepalive(idle=max(1, int(fa / 2)), interval=max(1, int(fa / 6)), count=3,
                                     user_timeout=fa)
        self.record = BackgroundRecord(Path(config.log.dir) / BACKGROUND_RECORD, config.log.max_bytes,
                                       config.log.backups)
        self.record_path = self.record.path
        self.record_background = record_background
        self.max_payload = MAX_PAYLOAD
        self.max_data = MAX_DATA
        self._debug = logging.getLogger("geartask.sender").isEnabledFor(logging.DEBUG)
        self._b: _Batch | None = None

    # -- public API --------------------------------------------------------------------------
    def close(self) -> None:
        for s in self.servers:
            self._close(s)
            s.todo.clear()
            s.pending.clear()
            s.waiting.clear()

    def __enter__(self) -> "JobSender":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def submit(self, task: str, data: Any = None, unique: str | None = None, priority: str | None = None,
               background: bool | None = None, timeout: float | None = None, wait: bool = True) -> JobResult:
        """One job; waits for its result unless it is a background job (or wait=False)."""
        job = {"task": task, "data": data, "unique": unique, "priority": priority, "background": background}
        return self.submit_many([{k: v for k, v in job.items() if v is not None or k == "data"}],
                                wait=wait, timeout=timeout)[0]

    def submit_many(self, jobs: Iterable[Any], wait: bool = True, timeout: float | None = None,
                    on_progress: Callable[[Progress], None] | None = None) -> list[JobResult]:
        """stream() collected into a list in input order (memory grows with the batch)."""
        results = list(self.stream(jobs, wait, timeout, on_progress))
        results.sort(key=lambda r: r.index)
        return results

    def stream(self, jobs: Iterable[Any], wait: bool = True, timeout: float | None = None,
               on_progress: Callable[[Progress], None] | None = None) -> Iterator[JobResult]:
        """Submit every job; yield each one's JobResult as it finishes (completion order).

        ``jobs``: JobDefinitions or mappings (task, data, unique, priority, background, retries),
        from any iterable; at most OPEN_JOBS are held at a time.
        ``wait``: wait for foreground jobs' results (background jobs never wait). With
        wait=False every job goes as a background job and is done once accepted, because
        gearmand discards a queued foreground job when its client disconnects.
        ``timeout``: seconds for the whole batch; jobs unfinished then end as 'timeout' (jobs
        not yet taken from ``jobs`` too, without being sent).
        A bad definition among the first OPEN_JOBS raises JobDefinitionError before anything
        is sent; a later one (or an error from the iterable) stops taking jobs, lets those
        sent finish and report, then is raised. NoServerError: no server could be reached
        within sender.connect_timeout and nothing was accepted.
        """
        if self._b is not None:
            raise UsageError("this JobSender is already running a batch (one at a time)")
        self._b = b = _Batch(jobs, wait, timeout)
        yield from self._run(b, on_progress)

    def status(self, handles: Iterable[Any] | None = None, timeout: float | None = None) -> list[StatusResult]:
        """GET_STATUS for background jobs; list(iter_status(...))."""
        return list(self.iter_status(handles, timeout))

    def iter_status(self, handles: Iterable[Any] | None = None,
                    timeout: float | None = None) -> Iterator[StatusResult]:
        """One StatusResult per handle (or per record line), in order.

        ``handles``: handle strings (``HANDLE`` or ``HANDLE@HOST:PORT``), (handle, server) pairs
        or record dicts; None means every line of the background record. A handle with no
        server given or recorded is asked of every configured server. A bad handle, record
        line or server reply is reported as state 'unknown' with the reason; the rest are asked.
        """
        asks = self.record.entries() if handles is None else asks_for(handles, self.record)
        query = StatusQuery([s.address for s in self.servers], timeout or self.settings.submit_timeout)
        try:
            yield from query.run(asks)
        finally:
            query.close()

    def background_records(self) -> list[dict]:
        """Every well-formed background job record in log.dir (rotated files included)."""
        return list(self.record.records())

    # -- preparing ---------------------------------------------------------------------------
    def _prepare(self, index: int, obj: Any, wait: bool = True) -> _Job:
        source = f"job #{index + 1}"
        d = JobDefinition.from_any(obj, source)
        if d.unique is not None and len(d.unique.encode("utf-8")) > MAX_UNIQUE:
            raise JobDefinitionError(f"{source} ({d.task}): unique key {d.unique[:20]!r}... is "
                                     f"{len(d.unique.encode('utf-8'))} bytes; gearmand takes at most {MAX_UNIQUE}",
                                     d.task, d.unique)
        if d.retries_lost:
            self.log.warning("job retries ignored: they travel only in a JSON-object payload",
                             task=d.task, unique=d.unique)
        payload = d.payload()  # encoded once, by from_any's check
        if len(payload) > self.max_payload:
            raise JobDefinitionError(f"{source} ({d.task}): data is {len(payload)} bytes, over the "
                                     f"{self.max_payload}-byte limit for one job", d.task, d.unique)
        priority = d.priority or self.settings.priority
        # wait=False sends foreground jobs as background ones: gearmand discards a queued
        # foreground job as soon as its client disconnects (measured on 1.1.20).
        background = self.settings.background if d.background is None else d.background
        if not wait:
            background = True
        unique = d.unique or new_unique()
        servers = self.servers
        order = servers if len(servers) == 1 else sorted(
            servers, key=lambda s: _score(s.hash_prefix, unique), reverse=True)
        return _Job(index, d.task, unique, payload, priority, background, self.settings.max_retries, order)

    def _fill(self, b: _Batch, first: bool = False) -> None:
        """Take jobs from the caller until the window is full."""
        while not b.exhausted and (not b.open or (len(b.open) < OPEN_JOBS and b.open_bytes < OPEN_BYTES)):
            try:
                j = self._prepare(b.pulled, next(b.source), b.wait)
            except StopIteration:
                b.exhausted, b.total = True, b.pulled
                return
            except Exception as e:
                if first:
                    raise  # nothing was sent: fail the batch now
                b.error, b.exhausted = e, True
                return
            b.pulled += 1
            b.open[j.index] = j
            b.open_bytes += len(j.payload)
            if b.timed_out:
                self._finish(j, "timeout", error=f"no result within {b.timeout:g}s (not sent)")
            else:
                self._route(j)

    def _route(self, j: _Job) -> None:
        """To the first healthy server in the job's rendezvous order."""
        for s in j.order:
            if s.healthy:
                j.server = s
                s.todo.append(j)
                return
        j.server = None
        self._b.homeless.append(j)

    # -- the loop ----------------------------------------------------------------------------
    def _run(self, b: _Batch, on_progress: Callable[[Progress], None] | None) -> Iterator[JobResult]:
        try:
            self._fill(b, first=True)
            while True:
                now = time.monotonic()
                self._fill(b)
                self._send(b, now)
                self._check_servers(now)
                self._check_no_server(b, now)
                if b.deadline is not None and now >= b.deadline and not b.timed_out:
                    self._time_out(b)
                self._flush_record()  # as they are accepted: a killed sender still leaves a record
                while b.finished:
                    j = b.finished.popleft()
                    del b.open[j.index]
                    b.yielded += 1
                    yield j.res
                done = b.exhausted and not b.open
                if on_progress and (done or now - b.last_progress >= 0.1):
                    b.last_progress = now
                    on_progress(self._progress(b))
                if done:
                    break
                self._poll(b, now)
            if b.error is not None:
                raise b.error
        finally:
            self._end_batch(b)

    def _end_batch(self, b: _Batch) -> None:
        self._flush_record()
        # Connections that still owe answers are out of step with the next batch: close them.
        # Jobs we stopped waiting for are forgotten, so their packets are ignored.
        for s in self.servers:
            if s.owed() or s.out or s.connecting is not None:
                self._close(s)
            s.todo.clear()
            s.pending.clear()
            s.waiting.clear()
            s.trouble_since, s.warned = None, False
        self._b = None
        if b.pulled > 1 or self._debug:  # a one-job submit() is on the latency path (W2)
            _batch_log.info("batch done", jobs=b.pulled, seconds=round(time.monotonic() - b.start, 3), **b.states)

    def _time_out(self, b: _Batch) -> None:
        b.timed_out = True
        for j in list(b.open.values()):
            if not j.finished:
                self._finish(j, "timeout", error=f"no result within {b.timeout:g}s"
                             + (f" (last problem: {j.last_error})" if j.last_error else ""))
        b.homeless.clear()
        for s in self.servers:
            s.todo.clear()

    def _send(self, b: _Batch, now: float) -> None:
        """Connect where jobs wait, and pipeline routed jobs up to each server's window."""
        for s in self.servers:
            if s.conn is None:
                wanted = s.todo or (not s.healthy and b.open)  # a given-up server is probed
                if wanted and s.connecting is None and now >= s.retry_at:
                    self._start_connect(s, now)
                continue
            room = PIPELINE_WINDOW - len(s.pending)
            if s.todo and room > 0:
                if not s.owed():
                    s.last_rx = now  # the clock for its answer starts now
                packets = []
                while s.todo and room > 0:
                    j = s.todo.popleft()
                    if j.finished:
                        continue
                    j.res.attempts += 1
                    s.pending.append(j)
                    room -= 1
                    packets.append(p.pack(p.submit_command(j.priority, j.background), task=j.task,
                                          unique=j.unique, data=j.payload))
                    if self._debug:
                        self.log.debug("submit", task=j.task, unique=j.unique, server=s.address,
                                       attempt=j.res.attempts)
                s.out += b"".join(packets)
            if s.out:
                self._flush_out(s)

    def _flush_out(self, s: _Server) -> None:
        try:
            while s.out:
                n = s.conn.sock.send(s.out, socket.MSG_DONTWAIT)
                del s.out[:n]
        except (BlockingIOError, InterruptedError):
            pass  # the socket buffer is full: poll says when it drains
        except OSError as e:
            self._lost(s, e, f"connection lost while sending: {e.strerror or e}")

    def _start_connect(self, s: _Server, now: float) -> None:
        """A non-blocking connect, so a silent host doesn't stall the other servers."""
        s.connect_started = now
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(s.host, s.port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
        except OSError as e:
            self._connect_failed(s, f"cannot connect: {e.strerror or e}", refused=False)
            return
        sock.setblocking(False)
        err = sock.connect_ex(addr)
        if err in (0, errno.EINPROGRESS):
            s.connecting = sock
            return
        sock.close()
        self._connect_failed(s, f"cannot connect: {os.strerror(err)}", refused=err == errno.ECONNREFUSED)

    def _connect_done(self, s: _Server) -> None:
        sock, s.connecting = s.connecting, None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            sock.close()
            self._connect_failed(s, f"cannot connect: {os.strerror(err)}", refused=err == errno.ECONNREFUSED)
            return
        s.conn = p.Connection(s.host, s.port, keepalive=self.keepalive).adopt(sock)
        s.out = bytearray(_OPTION)
        s.option_owed, s.probe_sent = True, None
        s.last_rx = time.monotonic()
        self.log.debug("connected", server=s.address)

    def _connect_failed(self, s: _Server, reason: str, refused: bool) -> None:
        now = time.monotonic()
        s.reason = reason
        s.retry_at = now + s.delay
        s.delay = min(s.delay * 2, RECONNECT_DELAY_MAX)
        if refused:
            # Nothing listens: the process is gone, and with it any foreground job it held.
            self._give_up(s, reason)
        elif s.trouble_since is None:
            s.trouble_since = s.connect_started

    def _close(self, s: _Server) -> None:
        if s.conn is not None:
            s.conn.close()
        if s.connecting is not None:
            s.connecting.close()
        s.conn = s.connecting = None
        s.out = bytearray()
        s.option_owed, s.probe_sent = False, None

    def _lost(self, s: _Server, exc: BaseException, reason: str | None = None) -> None:
        """A connection failed. The kernel's verdict that the peer is dead (keepalive or user
        timeout) fails its jobs over; anything else (reset, EOF, garbage) reconnects to it."""
        reason = reason or str(exc)
        if _errno(exc) == errno.ETIMEDOUT:
            self._give_up(s, reason)
        else:
            self._broken(s, reason)

    def _broken(self, s: _Server, reason: str) -> None:
        """Reconnect to the same server and resubmit its unfinished jobs there, same unique:
        gearmand attaches them to the originals if those are still queued or running."""
        now = time.monotonic()
        jobs = list(s.pending) + [j for js in s.waiting.values() for j in js]
        if jobs:
            self.log.warning("connection lost; resubmitting its jobs to it", server=s.address, reason=reason,
                             jobs=len(jobs))
        if s.trouble_since is None:
            s.trouble_since = s.last_rx if s.owed() else now
        self._close(s)
        s.pending.clear()
        s.waiting.clear()
        s.reason = reason
        s.retry_at = now + s.delay
        s.delay = min(s.delay * 2, RECONNECT_DELAY_MAX)
        for j in reversed(jobs):
            self._requeue(j, reason, s)

    def _give_up(self, s: _Server, reason: str) -> None:
        """Fail over: every job routed to ``s`` goes to the next healthy server in its order."""
        sent = list(s.pending) + [j for js in s.waiting.values() for j in js]
        unsent = list(s.todo)
        if sent or unsent:
            self.log.warning("failing over: its jobs go to the next server", server=s.address, reason=reason,
                             jobs=len(sent) + len(unsent))
        s.healthy = False
        self._close(s)
        s.todo.clear()
        s.pending.clear()
        s.waiting.clear()
        s.reason, s.trouble_since, s.warned = reason, None, False
        s.retry_at = max(s.retry_at, time.monotonic() + s.delay)
        for j in sent:
            self._requeue(j, f"{s.address}: {reason}")
        for j in unsent:
            if not j.finished:
                self._route(j)

    def _requeue(self, j: _Job, reason: str, to: _Server | None = None) -> None:
        if j.finished:
            return
        j.last_error = reason
        if j.res.attempts - 1 >= j.max_retries:
            self._finish(j, "failed", error=f"gave up after {j.res.attempts} attempt(s): {reason}")
            return
        j.res.handle = None
        if to is not None:
            to.todo.appendleft(j)
        else:
            self._route(j)

    def _recovered(self, s: _Server) -> None:
        """``s`` answers again: route jobs that had nowhere to go."""
        s.delay, s.reason = RECONNECT_DELAY, None
        if not s.healthy:
            s.healthy = True
            self.log.info("server answering again", server=s.address)
            b = self._b
            if b is not None:
                homeless, b.homeless = b.homeless, deque()
                for j in homeless:
                    if not j.finished:
                        self._route(j)

    def _finish(self, j: _Job, state: str, result: Any = None, error: Any = None) -> None:
        if j.finished:
            return
        b = self._b
        j.res.state, j.res.result, j.res.error = state, result, error
        j.res.seconds = time.monotonic() - j.started
        if j.server is not None and j.res.server is None:
            j.res.server = j.server.address
        b.open_bytes -= len(j.payload)
        j.payload = b""  # kept only while it may have to be sent again
        ok = state in ("complete", "queued")
        if ok:
            b.done += 1
        else:
            b.failed += 1
        b.states[state] = b.states.get(state, 0) + 1
        b.finished.append(j)
        # A job that went well is a debug line (the worker logs each job at info; background
        # jobs are in the record file): at info level it cost more than the job itself.
        if ok and not self._debug:
            return
        self.log.log(logging.DEBUG if ok else logging.WARNING, "job " + state,
                     task=j.task, unique=j.unique, handle=j.res.handle, server=j.res.server,
                     attempts=j.res.attempts, seconds=round(j.res.seconds, 3),
                     **({"error": error} if error is not None else {}))

    def _check_servers(self, now: float) -> None:
        """Late answers: a warning and an echo after submit_timeout, failover after
        failover_after. Quiet connections with jobs running get an echo every submit_timeout."""
        slow, fa = self.settings.submit_timeout, self.settings.failover_after
        for s in self.servers:
            if s.connecting is not None and now - s.connect_started > min(slow, self.settings.connect_timeout):
                self._close(s)
                self._connect_failed(s, f"cannot connect: no answer within {min(slow, self.settings.connect_timeout):g}s",
                                     refused=False)
            if s.conn is not None:
                quiet = now - s.last_rx
                if s.owed() and quiet > fa:
                    if p.wait_readable(s.conn.fileno(), 0):
                        continue  # the answer is here, unread (we were stalled): read it first
                    self._give_up(s, f"no answer for {quiet:.0f}s (sender.failover_after {fa:g}s)")
                elif s.owed() and quiet > slow and not s.warned and s.healthy:
                    s.warned = True
                    self.log.warning("server slow: waiting for its answer", server=s.address,
                                     seconds=round(quiet, 1), pending=len(s.pending), failover_after=fa)
                elif s.waiting and not s.owed() and quiet > slow:
                    # A foreground job can run for hours without a packet; an echo proves the
                    # server (and so our place in its queue) is still there.
                    s.out += _ECHO
                    s.probe_sent = s.last_rx = now
                    self._flush_out(s)
            elif not s.todo:
                s.trouble_since = None  # nothing waits for it
            elif s.healthy and s.trouble_since is not None and now - s.trouble_since > fa:
                self._give_up(s, f"unreachable for {now - s.trouble_since:.0f}s (sender.failover_after "
                                 f"{fa:g}s; last: {s.reason})")

    def _check_no_server(self, b: _Batch, now: float) -> None:
        """Every server given up for connect_timeout: jobs with nowhere to go fail (or, when
        nothing was accepted yet, the batch raises NoServerError)."""
        if any(s.healthy for s in self.servers):
            b.no_server_since = None
            return
        b.no_server_since = b.no_server_since or now
        if not b.homeless or now - b.no_server_since < self.settings.connect_timeout:
            return
        err = NoServerError([s.address for s in self.servers],
                            {s.address: s.reason for s in self.servers if s.reason})
        if not b.accepted and not b.yielded and not any(s.pending or s.waiting for s in self.servers):
            raise err  # nothing was sent anywhere: one clear error
        homeless, b.homeless = b.homeless, deque()
        for j in homeless:
            self._finish(j, "failed", error=str(err))

    def _poll(self, b: _Batch, now: float) -> None:
        wake = 0.2
        for s in self.servers:
            if s.conn is None and s.connecting is None and (s.todo or not s.healthy) and s.retry_at > now:
                wake = min(wake, s.retry_at - now)
        if b.deadline is not None:
            wake = min(wake, b.deadline - now)
        if b.finished or (not b.exhausted and len(b.open) < OPEN_JOBS and b.open_bytes < OPEN_BYTES):
            wake = 0.0
        poller = select.poll()
        watched: dict[int, _Server] = {}
        buffered = []
        for s in self.servers:
            if s.connecting is not None:
                poller.register(s.connecting, select.POLLOUT)
                watched[s.connecting.fileno()] = s
            elif s.conn is not None:
                poller.register(s.conn.sock, select.POLLIN | (select.POLLOUT if s.out else 0))
                watched[s.conn.sock.fileno()] = s
                if s.conn.has_buffered_packet():
                    buffered.append(s)
        if buffered:
            wake = 0.0
        if not watched:
            time.sleep(max(0.0, wake))
            return
        events = poller.poll(max(0, int(wake * 1000 + 0.999)))
        for fd, ev in events:
            s = watched[fd]
            if s.connecting is not None and s.connecting.fileno() == fd:
                self._connect_done(s)
                continue
            if s.conn is None or s.conn.sock.fileno() != fd:
                continue  # closed by an earlier event in this round
            if ev & select.POLLOUT and s.out:
                self._flush_out(s)
            if s.conn is not None and ev & (select.POLLIN | select.POLLERR | select.POLLHUP):
                self._read(s, True)
                buffered = [x for x in buffered if x is not s]
        for s in buffered:
            if s.conn is not None:
                self._read(s, False)

    def _read(self, s: _Server, readable: bool) -> None:
        try:
            # One recv for what poll saw (never a blocking one), then every whole packet.
            packets = s.conn.read_packets() if readable else s.conn.buffered_packets()
        except ServerError as e:
            self._lost(s, e)
            return
        if packets:
            s.last_rx = time.monotonic()
            if s.warned:
                self.log.info("server answering again", server=s.address)
            s.trouble_since, s.warned = None, False
        for pkt in packets:
            self._handle(s, pkt)
            if s.conn is None:
                return

    def _handle(self, s: _Server, pkt: p.Packet) -> None:
        cmd = pkt.cmd
        if s.option_owed and cmd in (p.OPTION_RES, p.ERROR):  # the first answer on a connection
            s.option_owed = False
            if cmd == p.ERROR:
                self.log.warning("server refused the 'exceptions' option", server=s.address,
                                 error=pkt.text("error_text"))
            self._recovered(s)
            return
        if cmd == p.JOB_CREATED:
            if not s.pending:
                return  # an answer owed to a batch we stopped waiting for
            j = s.pending.popleft()
            handle = pkt["job_handle"]
            j.res.handle, j.res.server = p.to_text(handle), s.address
            if not j.accepted:
                j.accepted = True
                self._b.accepted += 1
            if j.finished:
                return
            if j.background or not self._b.wait:
                self._finish(j, "queued")
                self._b.to_record.append(j)
            else:
                s.waiting.setdefault(handle, []).append(j)
            return
        if cmd == p.ECHO_RES:
            s.probe_sent = None
            return
        if cmd == p.ERROR:
            text = f"server error {pkt.text('error_code')}: {pkt.text('error_text')}"
            if s.pending:  # gearmand answers a submission it refuses with ERROR, in order
                self._finish(s.pending.popleft(), "failed", error=text)
            else:
                self._broken(s, text)
            return
        handle = pkt.args.get("job_handle")
        jobs = s.waiting.get(handle) if handle is not None else None
        if not jobs:
            return
        if cmd == p.WORK_COMPLETE:
            s.waiting.pop(handle, None)
            result = decode_payload(pkt["data"])
            for j in jobs:
                self._finish(j, "complete", result=result)
        elif cmd in (p.WORK_FAIL, p.WORK_EXCEPTION):
            # gearmand 1.1 ends a job on WORK_EXCEPTION (forwarded to us thanks to the
            # "exceptions" option). geartask workers send their JSON reason as WORK_WARNING
            # and then WORK_FAIL, which every client understands: the last warning is the reason.
            s.waiting.pop(handle, None)
            for j in jobs:
                if cmd == p.WORK_EXCEPTION:
                    error = decode_payload(pkt["data"])
                else:
                    error = j.res.warnings[-1] if j.res.warnings else None
                self._finish(j, "failed", error=error if error not in ("", None) else "job failed (WORK_FAIL)")
        elif cmd == p.WORK_STATUS:
            try:
                prog = (int(pkt["numerator"]), int(pkt["denominator"]))
            except ValueError:
                return
            for j in jobs:
                j.res.progress = prog
        elif cmd == p.WORK_DATA:
            raw = pkt["data"]
            chunk = decode_payload(raw)
            for j in jobs:
                if j.data_bytes + len(raw) > self.max_data:
                    j.res.data_dropped += 1
                    continue
                j.data_bytes += len(raw)
                j.res.data.append(chunk)
        elif cmd == p.WORK_WARNING:
            warning = decode_payload(pkt["data"])
            for j in jobs:
                j.res.warnings.append(warning)
                if len(j.res.warnings) > MAX_WARNINGS:
                    del j.res.warnings[0]

    def _progress(self, b: _Batch) -> Progress:
        running = [(j.task, *j.res.progress) for j in b.open.values()
                   if j.res.progress is not None and not j.finished]
        return Progress(total=b.total, done=b.done, failed=b.failed, accepted=b.accepted,
                        elapsed=time.monotonic() - b.start, running=running)

    # -- background record -----------------------------------------------------------------------
    def _flush_record(self) -> None:
        b = self._b
        if b is None or not b.to_record:
            return
        jobs, b.to_record = b.to_record, []
        if not self.record_background:
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        host, pid = socket.gethostname(), os.getpid()
        try:
            self.record.append([{"time": stamp, "task": j.task, "unique": j.unique, "handle": j.res.handle,
                                 "server": j.res.server, "priority": j.priority, "host": host, "pid": pid}
                                for j in jobs])
        except OSError as e:  # the jobs are accepted and their handles printed; don't fail them
            self.log.error("cannot record background jobs", path=str(self.record.path), error=str(e))


def _errno(exc: BaseException) -> int | None:
    """The errno behind a ServerError (protocol.Connection raises it from the OSError)."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None
