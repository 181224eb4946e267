"""One call of JobSender.stream: its jobs and the event loop that sends, routes, fails
over and resubmits them. The rules are in docs/sender.md."""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator

from .. import envelope
from .. import gearman as p
from ..errors import JobDefinitionError, NoServerError, NoWorkerError, ServerError
from ..jobs import JobDefinition, decode_payload, new_unique
from .background import recorded_fields
from .link import ServerLink
from .no_worker import Unserved
from .results import JobResult, Progress, attempts_notice, reason_attempts
from .routing import score
from .settings import BatchSettings

# gearmand answers ERROR ARGUMENT_TOO_LARGE for a unique key over 64 bytes (measured).
MAX_UNIQUE = 64
PIPELINE_WINDOW = 2048  # unanswered SUBMIT_JOBs per connection; keeps buffers bounded (~200 KB)
OPEN_JOBS = 10_000  # jobs taken from the caller and not yet reported: the memory bound
OPEN_BYTES = 256 * 1024 * 1024  # ... and their payload bytes (one job always fits)
MAX_WARNINGS = 8  # WORK_WARNINGs kept per job (the last is the failure reason)
FINAL_STATES = ("complete", "failed", "timeout", "queued")
HOST = socket.gethostname()  # the envelope's "host": where a job was sent from


class _Job:
    """One job in flight: its definition, wire payload, rendezvous order and where it is."""

    __slots__ = ("index", "task", "unique", "payload", "priority", "background", "max_retries",
                 "res", "started", "last_error", "lane", "order", "accepted", "data_bytes", "at", "keep")

    def __init__(self, index: int, task: str, unique: str, payload: bytes, priority: str,
                 background: bool, max_retries: int, order: list["_Lane"], at: int | None = None):
        self.index, self.task, self.unique, self.payload, self.at = index, task, unique, payload, at
        self.priority, self.background, self.max_retries = priority, background, max_retries
        self.res = JobResult(task=task, unique=unique, background=background, index=index)
        self.started = time.monotonic()
        self.last_error: str | None = None
        self.lane: _Lane | None = None
        self.order = order
        self.accepted = False
        self.data_bytes = 0
        self.keep: dict | None = None  # a background job's data and options, for its record line (recover)

    @property
    def finished(self) -> bool:
        return self.res.state in FINAL_STATES


class _Lane:
    """This call's jobs on one server: routed to it (``todo``), sent and awaiting JOB_CREATED
    (``pending``, in order) and accepted (``waiting``, by handle; several jobs share a handle
    when gearmand coalesced them)."""

    __slots__ = ("link", "address", "hash_prefix", "todo", "pending", "waiting", "trouble_since", "warned")

    def __init__(self, link: ServerLink):
        self.link = link
        self.address, self.hash_prefix = link.address, link.hash_prefix
        self.todo: deque[_Job] = deque()
        self.pending: deque[_Job] = deque()
        self.waiting: dict[bytes, list[_Job]] = {}
        self.trouble_since: float | None = None  # unanswered or unreachable since
        self.warned = False  # "server slow" said for this stretch of silence

    def owed(self) -> bool:
        link = self.link
        return bool(self.pending) or link.option_owed or link.probe_sent is not None

    def sent(self) -> list[_Job]:
        return list(self.pending) + [j for js in self.waiting.values() for j in js]


class Batch:
    """One stream() call: takes jobs from the caller in bounded windows, pipelines them to
    their servers, and yields each JobResult as it finishes (``run``). Owns every per-call
    state, so the JobSender keeps only its connections between calls."""

    def __init__(self, settings: BatchSettings, links: Iterable[ServerLink], jobs: Iterable[Any], wait: bool,
                 timeout: float | None, raw: bool = False,
                 on_data: Callable[[JobResult, bytes], None] | None = None):
        self.on_data = on_data  # WORK_DATA to the caller as it comes, not kept (JobSender.stream)
        self.settings = settings.sender
        self.log = settings.log
        self.debug = settings.debug
        self.max_payload, self.max_data = settings.max_payload, settings.max_data
        self.record = settings.record
        self.key = settings.key
        self.raw = raw  # each job's data is its whole payload: no envelope, no signature (JobSender.submit_raw)
        self.lanes = [_Lane(link) for link in links]
        self.source = iter(jobs)
        self.total: int | None = len(jobs) if hasattr(jobs, "__len__") else None  # type: ignore[arg-type]
        self.wait = wait
        self.timeout = timeout
        self.start = time.monotonic()
        self.submitted_at = round(time.time(), 3)  # the envelope's "at": one per call, so headers are reused
        self._headers: dict[tuple, bytes] = {}
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
        self.unsigned: list[_Job] = []  # taken, to be signed before they are sent (_sign_taken)
        self.done = self.failed = self.accepted = self.yielded = 0
        self.states: dict[str, int] = {}
        self.no_server_since: float | None = None
        self.last_progress = 0.0
        # tasks nobody serves (no_worker.py)
        self.unserved = Unserved([(s.link.host, s.link.port) for s in self.lanes], self.settings.submit_timeout,
                                 getattr(self.settings, "no_worker_timeout", 30.0), self.log, settings.served)
        self.abandoned: set[_Lane] = set()  # lanes holding jobs given up for want of a worker
        self.last_finish = self.start  # when a job last finished: a quiet call asks if its workers are gone

    # -- the loop ----------------------------------------------------------------------------
    def run(self, on_progress: Callable[[Progress], None] | None) -> Iterator[JobResult]:
        try:
            self._fill(first=True)
            while True:
                now = time.monotonic()
                self._fill()
                self._send(now)
                self._check_servers(now)
                self._check_no_server(now)
                if self.unserved.due(now):
                    self._check_no_worker(now)
                if self.unserved.watch_due(now, self.last_finish):
                    self._watch_workers(now)
                if self.deadline is not None and now >= self.deadline and not self.timed_out:
                    self._time_out()
                self._flush_record()  # as they are accepted: a killed sender still leaves a record
                while self.finished:
                    j = self.finished.popleft()
                    del self.open[j.index]
                    self.yielded += 1
                    yield j.res
                done = self.exhausted and not self.open
                if on_progress and (done or now - self.last_progress >= 0.1):
                    self.last_progress = now
                    on_progress(self.progress())
                if done:
                    break
                self._poll(now)
            if self.error is not None:
                raise self.error
        finally:
            self._end()

    def progress(self) -> Progress:
        running = [(j.task, *j.res.progress) for j in self.open.values()
                   if j.res.progress is not None and not j.finished]
        return Progress(total=self.total, done=self.done, failed=self.failed, accepted=self.accepted,
                        elapsed=time.monotonic() - self.start, running=running)

    def _end(self) -> None:
        self._flush_record()
        # Connections that still owe answers are out of step with the next call: close them.
        # Jobs we stopped waiting for are forgotten with this batch, so their packets are ignored.
        for s in self.lanes:
            # Abandoned: gearmand ignores a gone client's queued foreground jobs, so none runs unwanted.
            if s.owed() or s.link.out or s.link.connecting is not None or s in self.abandoned:
                s.link.close()
        if self.pulled > 1 or self.debug:  # a one-job submit() is on the latency path (W2)
            self.log.info("batch done", jobs=self.pulled, seconds=round(time.monotonic() - self.start, 3),
                          **self.states)

    # -- taking jobs -------------------------------------------------------------------------
    def _prepare(self, index: int, obj: Any) -> _Job:
        source = f"job #{index + 1}"
        d = JobDefinition.from_any(obj, source)
        if d.unique is not None and len(d.unique.encode("utf-8")) > MAX_UNIQUE:
            raise JobDefinitionError(f"{source} ({d.task}): unique key {d.unique[:20]!r}... is "
                                     f"{len(d.unique.encode('utf-8'))} bytes; gearmand takes at most {MAX_UNIQUE}",
                                     d.task, d.unique)
        payload = d.payload()  # encoded once, by from_any's check
        if len(payload) > self.max_payload:
            raise JobDefinitionError(f"{source} ({d.task}): data is {len(payload)} bytes, over the "
                                     f"{self.max_payload}-byte limit for one job", d.task, d.unique)
        settings = self.settings
        priority = d.priority or settings.priority
        # wait=False sends foreground jobs as background ones: gearmand discards a queued
        # foreground job as soon as its client disconnects (measured on 1.1.20).
        background = settings.background if d.background is None else d.background
        if not self.wait or d.at is not None:
            background = True
        unique = d.unique or new_unique()
        lanes = self.lanes
        order = lanes if len(lanes) == 1 else sorted(lanes, key=lambda s: score(s.hash_prefix, unique), reverse=True)
        requeue_of = d.extra.get("requeue_of")
        data = payload if self.raw else self._envelope(background, d.retries, priority, requeue_of) + payload
        job = _Job(index, d.task, unique, data, priority, background, settings.max_retries, order, d.at)
        if self.key is not None and requeue_of is None and not self.raw:
            # Signed before it is sent, over the envelope too, with the jobs taken with it
            # (_sign_taken; docs/outcomes.md, "Signed jobs"). A requeue is never signed as
            # new: it travels with its original signature.
            self.unsigned.append(job)
        if background and self.record is not None:
            job.keep = recorded_fields(payload, d.retries, d.at, raw=self.raw)
        return job

    def _envelope(self, background: bool, retries: int | None, priority: str, requeue_of: Any = None) -> bytes:
        """The job's envelope (geartask.envelope): built once per set of options in a call."""
        key = (background, retries, priority, requeue_of)
        head = self._headers.get(key)
        if head is None:
            head = self._headers[key] = envelope.header(bg=background, retries=retries, prio=priority,
                                                        at=self.submitted_at, host=HOST,
                                                        requeue_of=requeue_of if isinstance(requeue_of, str) else None)
        return head

    def _fill(self, first: bool = False) -> None:
        """Take jobs from the caller until the window is full; sign what was taken."""
        self._take(first)
        self._sign_taken()

    def _sign_taken(self) -> None:
        """Sign the jobs taken since the last call, before any of them is sent (they are only
        routed until _send): sign_jobs puts one signature on each group of them."""
        jobs = [j for j in self.unsigned if not j.finished]  # a finished one is never sent
        self.unsigned.clear()
        if not jobs:
            return
        from ..trust.signing import sign_jobs  # cryptography only for a signing sender
        assert self.key is not None  # only a signing sender holds unsigned jobs
        for j, data in zip(jobs, sign_jobs([(j.task, j.unique, j.payload) for j in jobs], self.key), strict=True):
            self.open_bytes += len(data) - len(j.payload)
            j.payload = data

    def _take(self, first: bool) -> None:
        while not self.exhausted and (not self.open or (len(self.open) < OPEN_JOBS and self.open_bytes < OPEN_BYTES)):
            try:
                j = self._prepare(self.pulled, next(self.source))
            except StopIteration:
                self.exhausted, self.total = True, self.pulled
                return
            except Exception as e:
                if first:
                    raise  # nothing was sent: fail the batch now
                self.error, self.exhausted = e, True
                return
            self.pulled += 1
            self.open[j.index] = j
            self.open_bytes += len(j.payload)
            if self.timed_out:
                self._finish(j, "timeout", error=f"no result within {self.timeout:g}s (not sent)")
            elif j.task in self.unserved.given_up and not j.background:
                j.res.no_worker = True
                self._finish(j, "failed", error=self.unserved.given_up[j.task] + " (not sent)")
            else:
                if self.unserved.seen(j.task, j.background, time.monotonic()):
                    j.res.no_worker = True
                self._route(j)

    def _route(self, j: _Job) -> None:
        """To the first healthy server in the job's rendezvous order."""
        for s in j.order:
            if s.link.healthy:
                j.lane = s
                s.todo.append(j)
                return
        j.lane = None
        self.homeless.append(j)

    def _time_out(self) -> None:
        self.timed_out = True
        for j in list(self.open.values()):
            if not j.finished:
                self._finish(j, "timeout", error=f"no result within {self.timeout:g}s"
                             + (f" (last problem: {j.last_error})" if j.last_error else ""))
        self.homeless.clear()
        for s in self.lanes:
            s.todo.clear()

    # -- sending -----------------------------------------------------------------------------
    def _send(self, now: float) -> None:
        """Connect where jobs wait, and pipeline routed jobs up to each server's window."""
        for s in self.lanes:
            link = s.link
            if link.conn is None:
                wanted = s.todo or (not link.healthy and self.open)  # a given-up server is probed
                if wanted and link.connecting is None and now >= link.retry_at:
                    failed = link.start_connect(now)
                    if failed:
                        self._connect_failed(s, *failed)
                continue
            room = PIPELINE_WINDOW - len(s.pending)
            if s.todo and room > 0:
                if not s.owed():
                    link.last_rx = now  # the clock for its answer starts now
                packets = []
                while s.todo and room > 0:
                    j = s.todo.popleft()
                    if j.finished:
                        continue
                    j.res.submissions += 1
                    s.pending.append(j)
                    room -= 1
                    if j.at is None:
                        packets.append(p.pack(p.submit_command(j.priority, j.background), task=j.task,
                                              unique=j.unique, data=j.payload))
                    else:  # held by gearmand until then (gearmand has no priorities for these)
                        packets.append(p.pack(p.SUBMIT_JOB_EPOCH, task=j.task, unique=j.unique, epoch=j.at,
                                              data=j.payload))
                    if self.debug:
                        self.log.debug("submit", task=j.task, unique=j.unique, server=s.address,
                                       submission=j.res.submissions)
                link.out += b"".join(packets)
            if link.out:
                self._flush(s)

    def _flush(self, s: _Lane) -> None:
        e = s.link.flush()
        if isinstance(e, ServerError):
            self._lost(s, e, str(e).removeprefix(s.address + ": "))
        elif e is not None:
            self._lost(s, e, f"connection lost while sending: {e.strerror or e}")

    def _connect_done(self, s: _Lane) -> None:
        failed = s.link.connect_done()
        if failed:
            self._connect_failed(s, *failed)
        elif s.link.conn is not None:  # else its TLS handshake goes on
            self.log.debug("connected", server=s.address)

    def _connect_failed(self, s: _Lane, reason: str, refused: bool) -> None:
        s.link.backoff(reason, time.monotonic())
        if refused:
            # Nothing listens: the process is gone, and with it any foreground job it held.
            self._give_up(s, reason)
        elif s.trouble_since is None:
            s.trouble_since = s.link.connect_started

    # -- failures ----------------------------------------------------------------------------
    def _lost(self, s: _Lane, exc: BaseException, reason: str | None = None) -> None:
        """A connection failed. The kernel's verdict that the peer is dead (keepalive or user
        timeout) fails its jobs over; anything else (reset, EOF, garbage) reconnects to it."""
        reason = reason or str(exc)
        if _errno(exc) == errno.ETIMEDOUT or isinstance(exc, p.TLSError):  # TLS: certificates won't change
            self._give_up(s, reason)
        else:
            self._broken(s, reason)

    def _broken(self, s: _Lane, reason: str) -> None:
        """Reconnect to the same server and resubmit its unfinished jobs there, same unique:
        gearmand attaches them to the originals if those are still queued or running."""
        now = time.monotonic()
        jobs = s.sent()
        if jobs:
            self.log.warning("connection lost; resubmitting its jobs to it", server=s.address, reason=reason,
                             jobs=len(jobs))
        if s.trouble_since is None:
            s.trouble_since = s.link.last_rx if s.owed() else now
        s.link.close()
        s.pending.clear()
        s.waiting.clear()
        s.link.backoff(reason, now)
        for j in reversed(jobs):
            self._requeue(j, reason, s)

    def _give_up(self, s: _Lane, reason: str) -> None:
        """Fail over: every job routed to ``s`` goes to the next healthy server in its order."""
        sent = s.sent()
        unsent = list(s.todo)
        if sent or unsent:
            self.log.warning("failing over: its jobs go to the next server", server=s.address, reason=reason,
                             jobs=len(sent) + len(unsent))
        link = s.link
        link.healthy = False
        link.close()
        s.todo.clear()
        s.pending.clear()
        s.waiting.clear()
        link.reason, s.trouble_since, s.warned = reason, None, False
        link.retry_at = max(link.retry_at, time.monotonic() + link.delay)
        for j in sent:
            self._requeue(j, f"{s.address}: {reason}")
        for j in unsent:
            if not j.finished:
                self._route(j)

    def _requeue(self, j: _Job, reason: str, to: _Lane | None = None) -> None:
        if j.finished:
            return
        j.last_error = reason
        if j.res.submissions - 1 >= j.max_retries:
            self._finish(j, "failed", error=f"gave up after {j.res.submissions} submission(s): {reason}")
            return
        j.res.handle = None
        if to is not None:
            to.todo.appendleft(j)
        else:
            self._route(j)

    def _recovered(self, s: _Lane) -> None:
        """``s`` answers again: route jobs that had nowhere to go."""
        if s.link.answered():
            self.log.info("server answering again", server=s.address, failed_tries=s.link.hidden)
            homeless, self.homeless = self.homeless, deque()
            for j in homeless:
                if not j.finished:
                    self._route(j)

    def _finish(self, j: _Job, state: str, result: Any = None, error: Any = None) -> None:
        if j.finished:
            return
        res = j.res
        res.state, res.result, res.error = state, result, error
        res.seconds = time.monotonic() - j.started
        self.last_finish = j.started + res.seconds
        if j.lane is not None and res.server is None:
            res.server = j.lane.address
        self.open_bytes -= len(j.payload)
        j.payload = b""  # kept only while it may have to be sent again
        ok = state in ("complete", "queued")
        if ok:
            self.done += 1
        else:
            self.failed += 1
        self.states[state] = self.states.get(state, 0) + 1
        self.finished.append(j)
        # A job that went well is a debug line (the worker logs each job at info; background
        # jobs are in the record file): at info level it cost more than the job itself. A
        # failed one is an info line: the caller reports it (the command prints it on stdout),
        # so the console, which shows warnings, does not say it twice.
        if ok and not self.debug:
            return
        self.log.log(logging.DEBUG if ok else logging.INFO, "job " + state,
                     task=j.task, unique=j.unique, handle=res.handle, server=res.server,
                     attempts=res.attempts, submissions=res.submissions, seconds=round(res.seconds, 3),
                     **({"error": error} if error is not None else {}))

    def _check_servers(self, now: float) -> None:
        """Late answers: a warning and an echo after submit_timeout, failover after
        failover_after. Quiet connections with jobs running get an echo every submit_timeout."""
        settings = self.settings
        fa = settings.failover_after
        for s in self.lanes:
            link = s.link
            # submit_timeout on a fast path; more where answers are measured slow or were late
            slow = link.slow_after(settings.submit_timeout, max(fa, settings.submit_timeout))
            limit = min(slow, settings.connect_timeout)
            if link.connecting is not None and now - link.connect_started > limit:
                stage = link.connecting.stage
                link.close()
                link.missed()  # a slow path gets longer next time, not a storm
                self._connect_failed(s, f"cannot connect: no answer within {limit:g}s"
                                     + (f" ({stage})" if stage != "connect" else ""), refused=False)
            if link.conn is not None:
                quiet = now - link.last_rx
                if s.owed() and quiet > fa:
                    if p.wait_readable(link.conn.fileno(), 0):
                        continue  # the answer is here, unread (we were stalled): read it first
                    self._give_up(s, f"no answer for {quiet:.0f}s (sender.failover_after {fa:g}s)")
                elif s.owed() and quiet > slow and not s.warned and link.healthy:
                    s.warned = True
                    link.missed()
                    self.log.warning("server slow: waiting for its answer", server=s.address,
                                     seconds=round(quiet, 1), pending=len(s.pending), failover_after=fa)
                elif s.waiting and not s.owed() and quiet > slow:
                    # A foreground job can run for hours without a packet; an echo proves the
                    # server (and so our place in its queue) is still there.
                    link.echo(now)
                    self._flush(s)
            elif not s.todo:
                s.trouble_since = None  # nothing waits for it
            elif link.healthy and s.trouble_since is not None and now - s.trouble_since > fa:
                self._give_up(s, f"unreachable for {now - s.trouble_since:.0f}s (sender.failover_after "
                                 f"{fa:g}s; last: {link.reason})")

    def _check_no_server(self, now: float) -> None:
        """Every server given up for connect_timeout: jobs with nowhere to go fail (or, when
        nothing was accepted yet, the batch raises NoServerError)."""
        if any(s.link.healthy for s in self.lanes):
            self.no_server_since = None
            return
        self.no_server_since = self.no_server_since or now
        refused = all(s.link.reason and p.is_refusal(s.link.reason) for s in self.lanes)  # TLS: no use waiting
        if not self.homeless or (now - self.no_server_since < self.settings.connect_timeout and not refused):
            return
        err = NoServerError([s.address for s in self.lanes],
                            {s.address: s.link.reason for s in self.lanes if s.link.reason})
        if not self.accepted and not self.yielded and not any(s.pending or s.waiting for s in self.lanes):
            raise err  # nothing was sent anywhere: one clear error
        homeless, self.homeless = self.homeless, deque()
        for j in homeless:
            self._finish(j, "failed", error=str(err))

    def _check_no_worker(self, now: float) -> None:
        """Foreground jobs of a task nobody has served for sender.no_worker_timeout fail; when
        they are all the call has and nothing was reported yet, the call raises NoWorkerError."""
        unserved = self.unserved
        waiting = {j.task for j in self.open.values() if not j.finished and not j.background
                   and (j.task in unserved.since or j.task in unserved.undecided)}
        expired = unserved.recheck(waiting, now)
        if not expired:
            return
        for j in list(self.open.values()):
            if j.task in expired and not j.finished and not j.background:
                j.res.no_worker = True
                if j.lane is not None:
                    self.abandoned.add(j.lane)
                self._finish(j, "failed", error=unserved.given_up[j.task])
        for task in expired:
            unserved.since.pop(task, None)
        if not self.yielded and self.exhausted and all(j.res.no_worker and j.res.state == "failed"
                                                       for j in self.open.values()):
            raise NoWorkerError(expired, unserved.snapshot.asked if unserved.snapshot else [],
                                [unserved.given_up[t] for t in expired])

    def _watch_workers(self, now: float) -> None:
        """Foreground jobs of a task whose workers all went away (a worker killed mid-job: gearmand
        requeues it for nobody) get sender.no_worker_timeout from now, as a task nobody serves."""
        self.unserved.watch({j.task for j in self.open.values() if not j.finished and not j.background}, now)

    # -- receiving ---------------------------------------------------------------------------
    def _poll(self, now: float) -> None:
        wake = 0.2
        for s in self.lanes:
            link = s.link
            if link.conn is None and link.connecting is None and (s.todo or not link.healthy) and link.retry_at > now:
                wake = min(wake, link.retry_at - now)
        if self.deadline is not None:
            wake = min(wake, self.deadline - now)
        if self.finished or (not self.exhausted and len(self.open) < OPEN_JOBS and self.open_bytes < OPEN_BYTES):
            wake = 0.0
        poller = select.poll()
        watched: dict[int, _Lane] = {}
        buffered = []
        for s in self.lanes:
            link = s.link
            if link.connecting is not None:
                poller.register(link.connecting, link.connecting.events)
                watched[link.connecting.fileno()] = s
            elif link.conn is not None:
                poller.register(link.conn, select.POLLIN | (select.POLLOUT if link.out else 0))
                watched[link.conn.fileno()] = s
                if link.conn.has_buffered_packet():
                    buffered.append(s)
        if buffered:
            wake = 0.0
        if not watched:
            time.sleep(max(0.0, wake))
            return
        events = poller.poll(max(0, int(wake * 1000 + 0.999)))
        for fd, ev in events:
            s = watched[fd]
            link = s.link
            if link.connecting is not None and link.connecting.fileno() == fd:
                self._connect_done(s)
                continue
            if link.conn is None or link.conn.fileno() != fd:
                continue  # closed by an earlier event in this round
            if ev & select.POLLOUT and link.out:
                self._flush(s)
            if link.conn is not None and ev & (select.POLLIN | select.POLLERR | select.POLLHUP):
                self._read(s, True)
                buffered = [x for x in buffered if x is not s]
        for s in buffered:
            if s.link.conn is not None:
                self._read(s, False)

    def _read(self, s: _Lane, readable: bool) -> None:
        link = s.link
        conn = link.conn
        assert conn is not None  # read only while connected
        try:
            # One recv for what poll saw (never a blocking one), then every whole packet.
            packets = conn.read_packets() if readable else conn.buffered_packets()
        except ServerError as e:
            self._lost(s, e, str(e).removeprefix(s.address + ": "))  # the server is named beside it
            return
        if packets:
            link.last_rx = time.monotonic()
            if s.warned:
                self.log.info("server answering again", server=s.address)
            s.trouble_since, s.warned = None, False
        for pkt in packets:
            self._handle(s, pkt)
            if link.conn is None:
                return

    def _handle(self, s: _Lane, pkt: p.Packet) -> None:
        cmd = pkt.cmd
        link = s.link
        if link.option_owed and cmd in (p.OPTION_RES, p.ERROR):  # the first answer on a connection
            link.option_owed = False
            link.measured(time.monotonic() - link.option_sent)
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
                self.accepted += 1
            if j.finished:
                return
            if j.background or not self.wait:
                self._finish(j, "queued")
                self.to_record.append(j)
            else:
                s.waiting.setdefault(handle, []).append(j)
            return
        if cmd == p.ECHO_RES:
            if link.probe_sent is not None:
                link.measured(time.monotonic() - link.probe_sent)
            link.probe_sent = None
            return
        if cmd == p.ERROR:
            text = p.error_text(pkt)
            if s.pending:  # gearmand answers a submission it refuses with ERROR, in order
                self._finish(s.pending.popleft(), "failed", error=text)
            else:
                self._broken(s, text)
            return
        handle = pkt.args.get("job_handle", b"")  # b"": no such job waits
        jobs = s.waiting.get(handle)
        if not jobs:
            return
        if "oversize" in pkt.args:  # the connection skipped it (gearman.max_packet): only its jobs fail
            self._oversize(s, handle, jobs, pkt)
            return
        if cmd == p.WORK_COMPLETE:
            s.waiting.pop(handle, None)
            result = decode_payload(pkt["data"])
            for j in jobs:
                if j.res.attempts is None:
                    j.res.attempts = 1  # no notice from the worker: it ran the job once
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
                j.res.attempts = reason_attempts(error)
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
            if self.on_data is not None:
                for j in jobs:
                    self.on_data(j.res, raw)
                return
            chunk = decode_payload(raw)
            for j in jobs:
                if j.data_bytes + len(raw) > self.max_data:
                    j.res.data_dropped += 1
                    continue
                j.data_bytes += len(raw)
                j.res.data.append(chunk)
        elif cmd == p.WORK_WARNING:
            warning = decode_payload(pkt["data"])
            attempts = attempts_notice(warning)
            for j in jobs:
                if attempts is not None:
                    j.res.attempts = attempts  # the worker's count, not a warning for the user
                    continue
                j.res.warnings.append(warning)
                if len(j.res.warnings) > MAX_WARNINGS:
                    del j.res.warnings[0]

    def _oversize(self, s: _Lane, handle: bytes, jobs: list[_Job], pkt: p.Packet) -> None:
        size = p.to_text(pkt["oversize"])
        conn = s.link.conn
        assert conn is not None  # the packet was read from it
        what = f"answer of {size} bytes ({pkt.name}) exceeds gearman.max_packet ({conn.max_packet} bytes)"
        if pkt.cmd == p.WORK_STATUS:
            return  # progress only: the job goes on
        if pkt.cmd == p.WORK_DATA:
            for j in jobs:
                j.res.data_dropped += 1  # counted, not kept, as past max_data
            return
        if pkt.cmd == p.WORK_WARNING:
            return
        s.waiting.pop(handle, None)  # gearmand has ended the job (WORK_COMPLETE/EXCEPTION)
        for j in jobs:
            j.res.attempts = j.res.attempts or 1
            self._finish(j, "failed", error=what)

    # -- background record -------------------------------------------------------------------
    def _flush_record(self) -> None:
        if not self.to_record:
            return
        jobs, self.to_record = self.to_record, []
        if self.record is None:
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        host, pid = socket.gethostname(), os.getpid()
        try:
            self.record.append_records([{"time": stamp, "task": j.task, "unique": j.unique, "handle": j.res.handle,
                                         "server": j.res.server, "priority": j.priority, "host": host, "pid": pid,
                                         **(j.keep or {})}
                                        for j in jobs])
        except OSError as e:  # the jobs are accepted and their handles printed; don't fail them
            self.log.error("cannot record background jobs", path=str(self.record.path), error=str(e))


def _errno(exc: BaseException | None) -> int | None:
    """The errno behind a ServerError (protocol.Connection raises it from the OSError)."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None
