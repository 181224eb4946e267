"""The sender's library: submit jobs to one or more gearmand servers and never lose one.

``JobSender(config).submit_many(jobs)`` is what the command line and the tests call.

How it keeps jobs safe:

* Every job carries a unique key (the plugin's, or a generated one). gearmand coalesces
  jobs with the same function and unique key, so a resubmission that raced an accepted
  submission attaches to the queued/running job instead of running it twice.
* Submissions are pipelined: many SUBMIT_JOB* go out on a connection, and the JOB_CREATED
  answers come back in the same order (gearmand answers requests in order per connection).
* One select loop waits on every connection for WORK_* packets keyed by job handle.
* A connection that drops, or that stays silent for ``sender.submit_timeout`` while an answer
  is owed (JOB_CREATED, or an ECHO probe while foreground jobs wait), is closed and every job
  on it that is not finished is resubmitted, same unique key, to the next live server, up to
  ``sender.max_retries`` times with exponential backoff. A dead server is retried later, so
  one that comes back is used again.
* Background jobs are finished for us once JOB_CREATED arrives; their handle and server are
  appended to ``log.dir/sender-background.jsonl`` so ``status`` can ask about them later.

We drive the sockets with geartask.protocol.Connection rather than pygearman's client,
whose wait/poll semantics can't express "resubmit on timeout" (see geartask/protocol.py).
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from geartask.errors import JobDefinitionError, NoServerError, ServerError
from geartask.jobs import JobDefinition, decode_payload, new_unique
from geartask.logs import HotLogger, get_logger
from geartask import protocol as p

# gearmand 1.1.20 itself accepts payloads up to the wire format's 4 GiB (measured: 200 MB
# went through) and holds every one in memory; the sender refuses more than this per job so
# one runaway plugin can't exhaust the job server. Checked before anything is sent.
MAX_PAYLOAD = 64 * 1024 * 1024
# gearmand answers ERROR ARGUMENT_TOO_LARGE for a unique key over 64 bytes (measured).
MAX_UNIQUE = 64
BACKGROUND_RECORD = "sender-background.jsonl"
RETRY_BACKOFF = 0.25  # seconds before the first resubmission, doubled each time, capped
RETRY_BACKOFF_MAX = 4.0
RECONNECT_DELAY = 0.25  # seconds before a dead server is tried again, doubled, capped
RECONNECT_DELAY_MAX = 2.0
PIPELINE_WINDOW = 2048  # unanswered SUBMIT_JOBs per connection; keeps buffers bounded (~200 KB)

_batch_log = HotLogger("geartask.sender")  # once per submit(): on the W2 latency path
FINAL_STATES = ("complete", "failed", "timeout", "queued")


@dataclass
class JobResult:
    """What became of one job. ``state``: complete | failed | timeout | queued (accepted,
    not waited for). ``result`` is the decoded WORK_COMPLETE payload, ``error`` the reason."""

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
    data: list = field(default_factory=list)  # WORK_DATA chunks, decoded
    warnings: list = field(default_factory=list)  # WORK_WARNING payloads, decoded
    progress: tuple[int, int] | None = None  # last WORK_STATUS (numerator, denominator)

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
    """A snapshot for on_progress: counts, rate and the WORK_STATUS of running jobs."""

    total: int
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
        if not self.finished or self.finished >= self.total:
            return None
        return (self.total - self.finished) / self.rate


@dataclass
class StatusResult:
    """GET_STATUS for one handle. ``known`` False means the server no longer has it: done
    (or lost with a server that had no persistent queue)."""

    handle: str
    server: str | None
    known: bool | None
    running: bool = False
    numerator: int = 0
    denominator: int = 0
    task: str | None = None
    unique: str | None = None
    error: str | None = None

    @property
    def state(self) -> str:
        if self.error:
            return "unreachable"
        if not self.known:
            return "done"
        return "running" if self.running else "queued"

    def to_json(self) -> dict:
        return {"handle": self.handle, "server": self.server, "task": self.task, "unique": self.unique,
                "state": self.state, "known": self.known, "running": self.running,
                "numerator": self.numerator, "denominator": self.denominator, "error": self.error}


class _Job:
    """One job in flight: its definition, wire payload and where it is."""

    __slots__ = ("index", "task", "unique", "payload", "priority", "background", "max_retries",
                 "res", "not_before", "started", "last_error", "server")

    def __init__(self, index: int, task: str, unique: str, payload: bytes, priority: str,
                 background: bool, max_retries: int):
        self.index, self.task, self.unique, self.payload = index, task, unique, payload
        self.priority, self.background, self.max_retries = priority, background, max_retries
        self.res = JobResult(task=task, unique=unique, background=background)
        self.not_before = 0.0
        self.started = time.monotonic()
        self.last_error: str | None = None
        self.server: _Server | None = None

    @property
    def finished(self) -> bool:
        return self.res.state in FINAL_STATES


class _Server:
    """One job server: its connection, the submissions awaiting JOB_CREATED in order, and the
    accepted foreground jobs by handle (several jobs share a handle when gearmand coalesced them)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.address = f"{host}:{port}"
        self.conn: p.Connection | None = None
        self.pending: deque[_Job] = deque()
        self.waiting: dict[bytes, list[_Job]] = {}
        self.down_until = 0.0
        self.delay = RECONNECT_DELAY
        self.reason: str | None = None
        self.last_rx = 0.0  # when we last heard from it, or started owing it nothing
        self.probe_sent: float | None = None

    @property
    def live(self) -> bool:
        return self.conn is not None and self.conn.connected

    def owed(self) -> bool:
        return bool(self.pending) or self.probe_sent is not None


class JobSender:
    """Submit jobs to the configured servers. Not thread-safe: one sender per thread."""

    def __init__(self, config: Any, log: Any = None, record_background: bool = True):
        self.config = config
        self.settings = config.sender
        # Bound once: structlog's lazy proxy builds a new logger on every call otherwise.
        self.log = (log or get_logger("geartask.sender")).bind()
        self.servers = [_Server(h, port) for h, port in config.server_addresses]
        self.record_path = Path(config.log.dir) / BACKGROUND_RECORD
        self.record_background = record_background
        self.max_payload = MAX_PAYLOAD
        self._rr = 0  # round-robin cursor
        self._debug = logging.getLogger("geartask.sender").isEnabledFor(logging.DEBUG)
        self._to_record: list[_Job] = []  # accepted background jobs not yet in the record

    # -- public API --------------------------------------------------------------------------
    def close(self) -> None:
        for s in self.servers:
            if s.conn is not None:
                s.conn.close()
            s.conn = None
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
        """Submit every job; return one JobResult per job, in the order given.

        ``jobs``: JobDefinitions or mappings (task, data, unique, priority, background, retries).
        ``wait``: wait for foreground jobs' results (background jobs never wait). With
        wait=False every job goes as a background job and is done once accepted, because
        gearmand discards a queued foreground job when its client disconnects.
        ``timeout``: seconds to wait for all results; unfinished jobs end as state 'timeout'.
        Raises JobDefinitionError for a bad job before anything is sent, NoServerError when
        no server can be reached within sender.connect_timeout and nothing was accepted.
        """
        prepared = [self._prepare(i, j, wait) for i, j in enumerate(jobs)]
        if not prepared:
            return []
        self._to_record: list[_Job] = []
        start = time.monotonic()
        try:
            self._run(prepared, wait, timeout, on_progress)
        finally:
            self._flush_record()
        if len(prepared) > 1 or self._debug:  # a one-job submit() is on the latency path (W2)
            states: dict[str, int] = {}
            for j in prepared:
                states[j.res.state] = states.get(j.res.state, 0) + 1
            _batch_log.info("batch done", jobs=len(prepared), seconds=round(time.monotonic() - start, 3),
                            **states)
        return [j.res for j in prepared]

    def status(self, handles: Iterable[Any] | None = None, timeout: float | None = None) -> list[StatusResult]:
        """GET_STATUS for background jobs.

        ``handles``: handle strings (``HANDLE`` or ``HANDLE@HOST:PORT``), (handle, server) pairs
        or record dicts; None means every job in the background record. A handle with no server
        given or recorded is asked of every configured server (handles are only unique per
        server, so the record or @server is the reliable way).
        """
        timeout = timeout or self.settings.submit_timeout
        records = self.background_records()
        by_handle = {r["handle"]: r for r in records}
        wanted: list[dict] = []
        if handles is None:
            wanted = records
        else:
            for h in handles:
                if isinstance(h, Mapping):
                    wanted.append(dict(h))
                elif isinstance(h, (tuple, list)):
                    wanted.append({"handle": h[0], "server": h[1]})
                else:
                    text = str(h)
                    handle, _, server = text.partition("@")  # HANDLE@HOST:PORT, as the CLI prints it
                    rec = dict(by_handle.get(handle, {"handle": handle, "server": None}))
                    if server:
                        rec["server"] = server
                    wanted.append(rec)
        conns: dict[str, p.Connection] = {}
        out: list[StatusResult] = []
        try:
            for rec in wanted:
                servers = [rec["server"]] if rec.get("server") else [s.address for s in self.servers]
                result = None
                errors = []
                for addr in servers:
                    try:
                        r = self._get_status(conns, addr, rec["handle"], timeout)
                    except ServerError as e:
                        errors.append(str(e))
                        continue
                    if r.known or result is None:
                        result = r
                    if r.known:
                        break
                if result is None:
                    result = StatusResult(handle=rec["handle"], server=rec.get("server"), known=None,
                                          error="; ".join(errors) or "no server to ask")
                result.task, result.unique = rec.get("task"), rec.get("unique")
                out.append(result)
        finally:
            for c in conns.values():
                c.close()
        return out

    def background_records(self) -> list[dict]:
        """Every background job this sender's log dir has recorded (JSON lines)."""
        try:
            lines = self.record_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        records = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn line from a crashed writer is not worth failing over
            if isinstance(rec, dict) and rec.get("handle"):
                records.append(rec)
        return records

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
        return _Job(index, d.task, d.unique or new_unique(), payload, priority, background,
                    self.settings.max_retries)

    # -- the loop ----------------------------------------------------------------------------
    def _run(self, jobs: list[_Job], wait: bool, timeout: float | None,
             on_progress: Callable[[Progress], None] | None) -> None:
        start = time.monotonic()
        deadline = start + timeout if timeout else None
        self._wait = wait
        self._todo: deque[_Job] = deque(jobs)
        self._next_due: float | None = None
        self._accepted_any = False
        self._open = len(jobs)  # kept by _finish: no O(n) scan per packet
        no_server_since: float | None = None
        reasons: dict[str, str] = {}
        last_progress = 0.0
        while True:
            now = time.monotonic()
            if self._send_ready(now):
                no_server_since = no_server_since or now
                reasons.update({s.address: s.reason for s in self.servers if s.reason})
                if now - no_server_since >= self.settings.connect_timeout:
                    err = NoServerError([s.address for s in self.servers], reasons)
                    if not self._accepted_any and not any(s.waiting or s.pending for s in self.servers):
                        self.close()
                        raise err  # nothing was sent anywhere: one clear error
                    # Some jobs are out there: report these ones as failed, not the whole batch.
                    for j in list(self._todo):
                        self._finish(j, "failed", error=str(err))
                    self._todo.clear()
            else:
                no_server_since = None
            if on_progress and (now - last_progress >= 0.1 or not self._open):
                last_progress = now
                on_progress(self._progress(jobs, start))
            if not self._open:
                break
            if deadline is not None and now >= deadline:
                for j in jobs:
                    if not j.finished:
                        self._finish(j, "timeout", error=f"no result within {timeout:g}s"
                                     + (f" (last problem: {j.last_error})" if j.last_error else ""))
                break
            wake = 0.2
            if self._next_due is not None:  # a resubmission waiting out its backoff
                wake = min(wake, max(0.0, self._next_due - now))
            if deadline is not None:
                wake = min(wake, max(0.0, deadline - now))
            self._poll(wake)
            self._flush_record()  # as they are accepted: a killed sender still leaves a record
            self._check_silence(time.monotonic())
        # Foreground jobs we stopped waiting for stay attached to our connections; forget them
        # so a later batch on this sender doesn't mistake their packets for its own.
        self._todo.clear()
        for s in self.servers:
            s.waiting.clear()
            if s.pending:  # a timed-out batch left answers owed: the stream is out of step
                self._close(s)
                s.pending.clear()

    def _send_ready(self, now: float) -> bool:
        """Send every job whose backoff has passed; True when jobs wait but no server is live."""
        if not self._todo:
            return False
        batches: dict[_Server, list[_Job]] = {}
        later: list[_Job] = []  # resubmissions still in their backoff
        blocked = False
        todo = self._todo
        # From the front, and only until every server's window is full: a batch of n jobs
        # costs O(n) in all, not a scan of the whole queue per network event.
        while todo:
            job = todo.popleft()
            if job.not_before > now:
                later.append(job)
                continue
            server = self._pick(now)
            if server is None:
                blocked = True
                todo.appendleft(job)
                break
            job.res.attempts += 1
            job.server = server
            if not server.owed():
                server.last_rx = now  # the submit_timeout clock starts now
            server.pending.append(job)  # counts against the pipeline window at once
            batches.setdefault(server, []).append(job)
        todo.extend(later)
        self._next_due = min((j.not_before for j in later), default=None)
        for server, batch in batches.items():
            data = b"".join(p.pack(p.submit_command(j.priority, j.background), task=j.task,
                                   unique=j.unique, data=j.payload) for j in batch)
            if self._debug:
                for j in batch:
                    self.log.debug("submit", task=j.task, unique=j.unique, server=server.address,
                                   attempt=j.res.attempts)
            try:
                server.conn.send_raw(data)
            except ServerError as e:
                self._drop(server, str(e))
        # Blocked with a live server means its pipeline window is full: not an outage.
        return blocked and not any(s.live for s in self.servers)

    def _pick(self, now: float) -> _Server | None:
        """The next live server round-robin (connecting when needed), None when none is live."""
        n = len(self.servers)
        for k in range(n):
            s = self.servers[(self._rr + k) % n]
            if len(s.pending) >= PIPELINE_WINDOW:
                continue
            if not s.live:
                if now < s.down_until or not self._connect(s):
                    continue
            self._rr = (self._rr + k + 1) % n
            return s
        return None

    def _connect(self, s: _Server) -> bool:
        t = min(self.settings.connect_timeout, self.settings.submit_timeout)
        conn = p.Connection(s.host, s.port, connect_timeout=t)
        try:
            conn.connect()
            # Without this option gearmand swallows WORK_EXCEPTION and we'd only see WORK_FAIL.
            conn.send(p.OPTION_REQ, option_name=b"exceptions")
            conn.expect(p.OPTION_RES, t)
        except ServerError as e:
            conn.close()
            self._mark_down(s, e)
            return False
        s.conn, s.reason, s.delay = conn, None, RECONNECT_DELAY
        s.last_rx, s.probe_sent = time.monotonic(), None
        self.log.debug("connected", server=s.address)
        return True

    def _mark_down(self, s: _Server, reason: Any) -> None:
        text = str(reason)
        prefix = s.address + ": "
        s.reason = text[len(prefix):] if text.startswith(prefix) else text
        s.down_until = time.monotonic() + s.delay
        s.delay = min(s.delay * 2, RECONNECT_DELAY_MAX)

    def _close(self, s: _Server) -> None:
        if s.conn is not None:
            s.conn.close()
        s.conn, s.probe_sent = None, None

    def _drop(self, s: _Server, reason: str) -> None:
        """The connection failed: close it and resubmit everything on it that isn't finished."""
        self.log.warning("connection lost; resubmitting its jobs", server=s.address, reason=reason,
                         pending=len(s.pending), waiting=sum(len(v) for v in s.waiting.values()))
        self._close(s)
        self._mark_down(s, reason)
        jobs = list(s.pending) + [j for js in s.waiting.values() for j in js]
        s.pending.clear()
        s.waiting.clear()
        for j in jobs:
            if not j.finished:
                self._requeue(j, reason)

    def _requeue(self, j: _Job, reason: str) -> None:
        j.last_error = reason
        resubmissions = j.res.attempts - 1
        if resubmissions >= j.max_retries:
            self._finish(j, "failed", error=f"gave up after {j.res.attempts} attempt(s): {reason}")
            return
        j.not_before = time.monotonic() + min(RETRY_BACKOFF * 2 ** resubmissions, RETRY_BACKOFF_MAX)
        j.res.handle = None
        self._todo.append(j)

    def _finish(self, j: _Job, state: str, result: Any = None, error: Any = None) -> None:
        if j.finished:
            return
        self._open -= 1
        j.res.state, j.res.result, j.res.error = state, result, error
        j.res.seconds = time.monotonic() - j.started
        if j.server is not None:
            j.res.server = j.server.address
        # A job that went well is a debug line (the worker logs each job at info; background
        # jobs are in the record file): at info level it cost more than the job itself.
        # Failures and timeouts are warnings.
        ok = state in ("complete", "queued")
        if ok and not self._debug:
            return
        self.log.log(logging.DEBUG if ok else logging.WARNING, "job " + state,
                     task=j.task, unique=j.unique, handle=j.res.handle, server=j.res.server,
                     attempts=j.res.attempts, seconds=round(j.res.seconds, 3),
                     **({"error": error} if error is not None else {}))

    def _poll(self, wake: float) -> None:
        live = [s for s in self.servers if s.live and (s.pending or s.waiting or s.probe_sent)]
        if not live:
            time.sleep(wake)
            return
        # Packets already buffered must be handled before select, which only sees the socket.
        buffered = [s for s in live if s.conn.has_buffered_packet()]
        readable: set = set()
        if not buffered:
            try:
                r, _, _ = select.select([s.conn.sock for s in live], [], [], wake)
            except (OSError, ValueError):
                r = [s.conn.sock for s in live]  # the read will say which one is broken
            readable = set(r)
        for s in buffered or [s for s in live if s.conn.sock in readable]:
            self._read(s, s.conn.sock in readable)

    def _read(self, s: _Server, readable: bool) -> None:
        try:
            # One recv for what select saw (never a blocking one), then every whole packet.
            packets = s.conn.read_packets() if readable else s.conn.buffered_packets()
            if packets:
                s.last_rx = time.monotonic()
            for pkt in packets:
                self._handle(s, pkt)
                if not s.live:
                    return
        except ServerError as e:
            self._drop(s, str(e))

    def _handle(self, s: _Server, pkt: p.Packet) -> None:
        cmd = pkt.cmd
        if cmd == p.JOB_CREATED:
            if not s.pending:
                return  # an answer owed to a batch we stopped waiting for
            j = s.pending.popleft()
            handle = pkt["job_handle"]
            j.res.handle, j.res.server = p.to_text(handle), s.address
            self._accepted_any = True
            if j.finished:
                return
            if j.background or not self._wait:
                self._finish(j, "queued")
                self._to_record.append(j)
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
                self._drop(s, text)
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
            chunk = decode_payload(pkt["data"])
            for j in jobs:
                j.res.data.append(chunk)
        elif cmd == p.WORK_WARNING:
            warning = decode_payload(pkt["data"])
            for j in jobs:
                j.res.warnings.append(warning)

    def _check_silence(self, now: float) -> None:
        """Drop connections that owe us an answer and stay silent; probe idle ones with waiters."""
        limit = self.settings.submit_timeout
        for s in self.servers:
            if not s.live:
                continue
            if s.owed() and now - s.last_rx > limit:
                what = "JOB_CREATED" if s.pending else "an echo"
                self._drop(s, f"no {what} within {limit:g}s")
            elif s.waiting and not s.owed() and now - s.last_rx > limit:
                # A foreground job can run for hours without a packet; an echo proves the
                # server (and so our place in its queue) is still there.
                try:
                    s.conn.send(p.ECHO_REQ, data=b"geartask")
                    s.probe_sent = now
                    s.last_rx = now
                except ServerError as e:
                    self._drop(s, str(e))

    def _progress(self, jobs: list[_Job], start: float) -> Progress:
        done = failed = accepted = 0
        running = []
        for j in jobs:
            st = j.res.state
            if st in ("complete", "queued"):
                done += 1
            elif st in ("failed", "timeout"):
                failed += 1
            elif j.res.progress is not None:
                running.append((j.task, *j.res.progress))
            if j.res.handle:
                accepted += 1
        return Progress(total=len(jobs), done=done, failed=failed, accepted=accepted,
                        elapsed=time.monotonic() - start, running=running)

    # -- background record and status -----------------------------------------------------------
    def _flush_record(self) -> None:
        jobs, self._to_record = self._to_record, []
        if jobs and self.record_background:
            self._record(jobs)

    def _record(self, jobs: Iterable[_Job]) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        lines = "".join(json.dumps({"time": stamp, "task": j.task, "unique": j.unique,
                                    "handle": j.res.handle, "server": j.res.server,
                                    "priority": j.priority, "host": socket.gethostname(),
                                    "pid": os.getpid()}) + "\n" for j in jobs)
        # One append per batch: O_APPEND keeps concurrent senders' lines whole.
        try:
            self.record_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.record_path, "a", encoding="utf-8") as f:
                f.write(lines)
        except OSError as e:  # the jobs are accepted and their handles printed; don't fail them
            self.log.error("cannot record background jobs", path=str(self.record_path), error=str(e))

    def _get_status(self, conns: dict[str, p.Connection], addr: str, handle: str,
                    timeout: float) -> StatusResult:
        conn = conns.get(addr)
        if conn is None or not conn.connected:
            host, _, port = addr.rpartition(":")
            conn = conns[addr] = p.Connection(host, int(port), connect_timeout=timeout).connect()
        conn.send(p.GET_STATUS, job_handle=handle)
        pkt = conn.expect(p.STATUS_RES, timeout)
        num = int(pkt["numerator"] or 0) if pkt["numerator"].isdigit() else 0
        den = int(pkt["denominator"] or 0) if pkt["denominator"].isdigit() else 0
        return StatusResult(handle=handle, server=addr, known=pkt["known"] == b"1",
                            running=pkt["running"] == b"1", numerator=num, denominator=den)
