"""Threaded Gearman workers: one process, N threads, every thread attached to every server.

The loop each thread runs is the protocol's intended one, which is also the fast one:

* after a job it sends the result *and* the next GRAB_JOB_UNIQ in one write, so a busy
  worker costs one round trip per job (pygearman 0.2.6 sleeps and waits for a NOOP after
  every job: two);
* it sends PRE_SLEEP only when a server answers NO_JOB, and wakes on NOOP;
* at most one GRAB is outstanding per thread, so a thread never holds a job it is not
  about to run while another worker idles;
* a connection that has slept ``worker.poll_timeout`` seconds is asked again (GRAB), which
  cures the python-gearman starvation bug: with several servers a NOOP can be lost or never
  sent, and a worker that only waits for NOOPs stops receiving jobs.

A server that is down or goes away is retried with backoff and logged once per outage; the
thread keeps working with the others. Each process also runs one control thread that only
serves its own control function (``geartask.control:<name>:<ip>:<pid>``), so a shutdown
request is taken at once even when every job thread is busy.
"""

from __future__ import annotations

import collections
import json
import os
import select
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from geartask import protocol as gp
from geartask.control import WorkerIdentity, host_ip, parse_command
from geartask.errors import GeartaskError, PluginError, ServerError, UsageError
from geartask.plugins import is_reserved_task
from geartask.jobs import decode_payload, encode_payload
from geartask.logs import HotLogger, get_logger, job_context

from .errors import AttemptFailed, JobRejected
from .shell_task import ShellTask

log = get_logger("geartask.worker")

RECONNECT_MIN, RECONNECT_MAX = 0.2, 10.0  # seconds between tries to reach a server that is down
ANSWER_TIMEOUT = 5.0  # seconds a connected server may take to answer ECHO or GRAB before we drop it
CONNECT_TIMEOUT = 2.0  # seconds; refused connections fail at once, only blackholed hosts wait
BACKOFF_MAX = 30.0  # ceiling on the wait between attempts of one job
WATCHDOG_INTERVAL = 0.5  # seconds between looks for plugin tasks past worker.job_timeout


class Job:
    """What a plugin task receives; see geartask.hookspecs.geartask_tasks."""

    __slots__ = ("task", "handle", "unique", "raw", "attempt", "config", "cancel",
                 "_conn", "_data", "_decoded", "retries", "_log")

    def __init__(self, conn: gp.Connection, handle: str, task: str, unique: str, raw: bytes,
                 config: Any, cancel: threading.Event):
        self._conn = conn
        self.handle, self.task, self.unique, self.raw = handle, task, unique, raw
        self.config, self.cancel = config, cancel
        self.attempt = 1
        self.retries = 0
        self._decoded = False
        self._data = None
        self._log = None

    @property
    def log(self) -> Any:
        # Bound on first use: binding costs as much as the rest of a no-op job, and most
        # tasks never log (the per-job line comes from the worker, with job_context).
        if self._log is None:
            self._log = log.bind(task=self.task, handle=self.handle, unique=self.unique)
        return self._log

    @property
    def data(self) -> Any:
        if not self._decoded:
            self._data, self._decoded = decode_payload(self.raw), True
        return self._data

    def status(self, numerator: int, denominator: int) -> None:
        """Report progress (WORK_STATUS) to the client waiting for this job."""
        self._conn.send(gp.WORK_STATUS, job_handle=self.handle, numerator=int(numerator),
                        denominator=int(denominator))

    def send_data(self, data: Any) -> None:
        """Send partial output (WORK_DATA) to the client waiting for this job."""
        self._conn.send(gp.WORK_DATA, job_handle=self.handle, data=encode_payload(data, self.task))


class Abandoned(ServerError):
    """A job stopped by a hard shutdown: answer nothing, so gearmand gives it to another worker."""

    def __init__(self, handle: str):
        super().__init__(f"job {handle} abandoned at shutdown; gearmand will requeue it")


class DeadLetters:
    """Jobs that failed for good, as JSON lines: gearmand never requeues a failed job, and a
    background job's failure has nobody listening, so this file is where it is not lost.
    (A worker cannot tell a background job from a foreground one: every final failure is kept.)"""

    def __init__(self, path: Path):
        self.path = path

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # backslashreplace: a lone surrogate from a job's JSON ("\ud800") stays a valid JSON escape
        line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8", "backslashreplace")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one O_APPEND write: lines from many processes never interleave
        finally:
            os.close(fd)


@dataclass
class _Link:
    """One thread's connection to one server, and where it is in the grab cycle."""

    conn: gp.Connection
    state: str = "down"  # down | hello (connected, awaiting ECHO_RES) | idle | grabbing | sleeping | parked
    server: int = 0  # index into config.servers
    since: float = 0.0  # when it entered its state
    next_try: float = 0.0  # when to reconnect (state down)
    backoff: float = RECONNECT_MIN


@dataclass
class _Outage:
    """Shared by a process's threads, so an outage is logged once, not once per thread and try."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    down: dict[str, set] = field(default_factory=dict)  # server -> threads that cannot reach it

    def failed(self, server: str, thread: int, reason: str) -> None:
        with self.lock:
            threads = self.down.setdefault(server, set())
            new = not threads
            threads.add(thread)
        if new:
            log.warning("server unreachable; retrying with backoff", server=server, reason=reason)

    def recovered(self, server: str, thread: int) -> None:
        with self.lock:
            threads = self.down.get(server)
            if not threads or thread not in threads:
                return
            threads.discard(thread)
            back = not threads
            if back:
                del self.down[server]
        if back:
            log.info("server reachable again", server=server)


class Sleepers:
    """One sleeping connection per server per process, instead of one per thread.

    gearmand sends a NOOP to every sleeping connection for every job, so N idle threads
    wake, grab, and N-1 of them get NO_JOB and take the GIL from the one running the job.
    Here only one thread per server sleeps (PRE_SLEEP); the others park that connection
    (no PRE_SLEEP, so gearmand leaves them alone). The thread that gets a job wakes one
    parked thread, which grabs in its turn, so a burst still spreads over every thread.
    Parked connections, like sleeping ones, grab again after worker.poll_timeout.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.sleeper: dict[int, "GrabLoop"] = {}
        self.parked: dict[int, list["GrabLoop"]] = {}

    def sleep_or_park(self, server: int, thread: "GrabLoop") -> bool:
        """True: this thread sleeps on ``server`` (sends PRE_SLEEP); False: it parks."""
        with self.lock:
            if self.sleeper.get(server, thread) is thread:
                self.sleeper[server] = thread
                return True
            self.parked.setdefault(server, []).append(thread)
            return False

    def leave(self, server: int, thread: "GrabLoop") -> None:
        """``thread`` stops sleeping or being parked on ``server``."""
        with self.lock:
            if self.sleeper.get(server) is thread:
                del self.sleeper[server]
            parked = self.parked.get(server)
            if parked and thread in parked:
                parked.remove(thread)

    def wake_one(self, server: int) -> None:
        """A job came from ``server``: a parked thread takes over listening to it."""
        with self.lock:
            parked = self.parked.get(server)
            if not parked:
                return
            thread = parked.pop(0)
            thread.unparked.add(server)
        thread.nudge()


class GrabLoop(threading.Thread):
    """A thread that keeps one connection per server and serves jobs of ``abilities``."""

    def __init__(self, process: "WorkerProcess", index: int, abilities: list[str],
                 stop: threading.Event, wake_fd: int, name: str, sleepers: Sleepers | None = None):
        super().__init__(name=name, daemon=True)
        self.sleepers = sleepers or Sleepers()
        self.unparked: set[int] = set()  # servers another thread asked us to grab from (under sleepers.lock)
        self._nudge_r, self._nudge_w = os.pipe()
        self.process = process
        self.index = index
        self.identity = process.identity.for_thread(index)
        self.abilities = abilities
        self.stop = stop
        self.wake_fd = wake_fd
        cfg = process.config
        self.poll_timeout = cfg.worker.poll_timeout
        # A short connect timeout: while a thread waits on an unreachable server it serves no other.
        self.links = [_Link(gp.Connection(h, p, connect_timeout=CONNECT_TIMEOUT), server=i)
                      for i, (h, p) in enumerate(cfg.server_addresses)]
        self.wants: collections.deque[_Link] = collections.deque()  # links to send a GRAB on
        self.outstanding: _Link | None = None
        self.current: Job | None = None  # the job running now (for a hard shutdown)
        self.attempt_started = 0.0  # when the current attempt began (for the watchdog)
        self.abandoned = False  # the watchdog gave up on this thread's stuck task
        self.jobs_done = 0
        self.no_jobs = 0  # NO_JOB answers: grabs that found nothing (the herd shows here)

    # -- connections -----------------------------------------------------------------
    def _connect(self, link: _Link, now: float) -> None:
        conn = link.conn
        try:
            conn.connect()
            packets = [gp.pack(gp.SET_CLIENT_ID, client_id=self.identity.client_id)]
            packets += [gp.pack(gp.CAN_DO, task=a) for a in self.abilities]
            # The echo proves the server answers: a server that accepts connections but never
            # replies must not hold this thread's one outstanding GRAB (and with it every server).
            packets.append(gp.pack(gp.ECHO_REQ, data=b"hello"))
            conn.send_raw(b"".join(packets))
        except ServerError as e:
            self._drop(link, str(e))
            return
        link.state, link.since = "hello", now

    def _hello_answered(self, link: _Link) -> None:
        link.state, link.since, link.backoff = "idle", time.monotonic(), RECONNECT_MIN
        self.process.outage.recovered(link.conn.address, self.index)
        self.wants.append(link)

    def nudge(self) -> None:
        try:
            os.write(self._nudge_w, b"x")
        except OSError:
            pass

    def _unpark(self) -> None:
        try:
            os.read(self._nudge_r, 4096)
        except OSError:
            pass
        with self.sleepers.lock:
            servers, self.unparked = self.unparked, set()
        for i in servers:
            link = self.links[i]
            if link.state == "parked" and link not in self.wants:
                link.state = "idle"
                self.wants.append(link)

    def _set_state(self, link: _Link, state: str) -> None:
        if link.state in ("sleeping", "parked") and state not in ("sleeping", "parked"):
            self.sleepers.leave(link.server, self)
        link.state, link.since = state, time.monotonic()

    def _drop(self, link: _Link, reason: str) -> None:
        was_listening = link.state == "sleeping"
        self._set_state(link, "down")
        if was_listening:
            self.sleepers.wake_one(link.server)  # someone else listens when the server is back
        link.conn.close()
        link.state, link.next_try = "down", time.monotonic() + link.backoff
        link.backoff = min(link.backoff * 2, RECONNECT_MAX)  # reset only when the server answers
        if self.outstanding is link:
            self.outstanding = None
        if link in self.wants:
            self.wants.remove(link)
        self.process.outage.failed(link.conn.address, self.index, reason)

    def close(self) -> None:
        for link in self.links:
            self._set_state(link, "down")
            link.conn.close()

    def shut_connections(self) -> None:
        """From another thread: end this thread's connections without closing its sockets
        (it may be using them), so gearmand sees the worker gone."""
        for link in self.links:
            sock = link.conn.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    # -- the loop --------------------------------------------------------------------
    def run(self) -> None:
        while not self.stop.is_set() and not self.abandoned:
            try:
                self._cycle()
            except Exception as e:  # a bug must not end the thread: log it, start clean
                log.error("worker thread error; reconnecting", error=repr(e),
                          traceback=traceback.format_exc(), thread=self.index)
                self.close()
                self.wants.clear()
                self.outstanding = None
                self.stop.wait(1.0)
        self.close()  # the nudge pipe stays open: another thread may still write to it

    def _cycle(self) -> None:
        now = time.monotonic()
        for link in self.links:
            if link.state == "down" and now >= link.next_try:
                self._connect(link, now)
        if self.outstanding is None:
            self._grab_next()

        timeout = self._next_deadline(now)
        rlist = [link.conn.sock for link in self.links if link.state != "down"]
        ready, _, _ = select.select(rlist + [self.wake_fd, self._nudge_r], [], [], timeout)
        if self.stop.is_set():
            return
        if self._nudge_r in ready:
            self._unpark()
        now = time.monotonic()
        for link in self.links:
            if link.state == "down" or link.conn.sock not in ready:
                continue
            try:
                packets = link.conn.read_packets()
            except ServerError as e:
                self._drop(link, str(e))
                continue
            for pkt in packets:
                try:
                    self._on_packet(link, pkt)
                except ServerError as e:
                    self._drop(link, str(e))
                    break
                if self.stop.is_set():
                    return
        # Starvation cure: a link asleep for poll_timeout is asked again, NOOP or not.
        now = time.monotonic()
        for link in self.links:
            if link.state in ("sleeping", "parked") and now - link.since >= self.poll_timeout \
                    and link not in self.wants:
                self.wants.append(link)
            elif link.state == "hello" and now - link.since >= ANSWER_TIMEOUT:
                self._drop(link, f"connected, but no answer within {ANSWER_TIMEOUT:g}s")
            elif link.state == "grabbing" and now - link.since >= ANSWER_TIMEOUT:
                self._drop(link, f"no answer to GRAB_JOB within {ANSWER_TIMEOUT:g}s")

    def _next_deadline(self, now: float) -> float:
        t = self.poll_timeout
        for link in self.links:
            if link.state == "down":
                t = min(t, link.next_try - now)
            elif link.state in ("sleeping", "parked"):
                t = min(t, link.since + self.poll_timeout - now)
            elif link.state in ("hello", "grabbing"):
                t = min(t, link.since + ANSWER_TIMEOUT - now)
        return max(0.0, t)

    def _grab_next(self, prefix: bytes = b"", after: _Link | None = None) -> None:
        """Send GRAB_JOB_UNIQ on the next link that wants one (with ``prefix`` packets on ``after``)."""
        if after is not None and not self.wants and not self.stop.is_set():
            link = after  # the fast path: result and next grab in one write
        else:
            if after is not None:
                if prefix:
                    after.conn.send_raw(prefix)
                    prefix = b""
                self._set_state(after, "idle")
                if not self.stop.is_set():
                    self.wants.append(after)
            link = None
            while self.wants and not self.stop.is_set():
                candidate = self.wants.popleft()
                if candidate.state != "down":
                    link = candidate
                    break
            if link is None:
                return
        try:
            link.conn.send_raw(prefix + gp.pack(gp.GRAB_JOB_UNIQ))
        except ServerError as e:
            self._drop(link, str(e))
            return
        self._set_state(link, "grabbing")
        self.outstanding = link

    def _on_packet(self, link: _Link, pkt: gp.Packet) -> None:
        cmd = pkt.cmd
        if cmd == gp.ECHO_RES:
            if link.state == "hello":
                self._hello_answered(link)
        elif cmd == gp.NOOP:
            if link.state == "sleeping":
                self._set_state(link, "idle")
                if link not in self.wants:
                    self.wants.append(link)
        elif cmd == gp.NO_JOB:
            self.no_jobs += 1
            if self.outstanding is link:
                self.outstanding = None
            if self.sleepers.sleep_or_park(link.server, self):
                link.conn.send(gp.PRE_SLEEP)
                link.state, link.since = "sleeping", time.monotonic()
            else:
                link.state, link.since = "parked", time.monotonic()
            if self.outstanding is None:
                self._grab_next()
        elif cmd in (gp.JOB_ASSIGN_UNIQ, gp.JOB_ASSIGN):
            if self.outstanding is link:
                self.outstanding = None
            link.state = "busy"
            self.sleepers.wake_one(link.server)  # while we work, another thread listens
            reply = self._serve(link, pkt)
            self._grab_next(reply, after=link)
        elif cmd == gp.ERROR:
            log.warning("server error", server=link.conn.address, code=pkt.text("error_code"),
                        text=pkt.text("error_text"))
        # anything else needs no answer

    def _serve(self, link: _Link, pkt: gp.Packet) -> bytes:
        handle = pkt.text("job_handle")
        task = pkt.text("task")
        unique = pkt.text("unique") if "unique" in pkt.args else ""
        job = Job(link.conn, handle, task, unique, pkt["data"], self.process.config,
                  self.process.cancel_jobs)
        self.attempt_started = time.monotonic()  # before current: the watchdog reads both
        self.current = job
        try:
            return self.process.execute(self, job, server=link.conn.address)
        finally:
            self.current = None
            self.jobs_done += 1


class WorkerProcess:
    """N job threads and one control thread, with a shutdown that loses nothing.

    ``tasks`` maps task names to callables ``fn(job)``; the built-in ``shell`` task is added.
    """

    def __init__(self, config, name: str, threads: int, tasks: dict[str, Callable]):
        self.config = config
        self.name = name
        self.threads_wanted = threads
        reserved = [t for t in tasks if is_reserved_task(t)]
        if reserved:
            raise PluginError(f"task name {reserved[0]!r} is geartask's own (the shell task or a control function)")
        self.identity = WorkerIdentity(name, host_ip(config.server_addresses), os.getpid())
        self.label = f"{name}:{self.identity.ip}:{self.identity.pid}"
        self.tasks = dict(tasks)
        self.tasks["shell"] = ShellTask(config.worker, self.label)
        self.outage = _Outage()
        self.dead_letters = DeadLetters(Path(config.log.dir) / "dead-letter.jsonl")
        self.stopping = threading.Event()  # job threads: take no new jobs
        self.finished = threading.Event()  # control thread: the process is done
        self.cancel_jobs = threading.Event()  # running shell commands: killed
        self.now_requested = threading.Event()
        self._stop_r, self._stop_w = os.pipe()
        self._fin_r, self._fin_w = os.pipe()
        self.job_threads: list[GrabLoop] = []
        # The per-job line: HotLogger renders it with one json.dumps when logs are JSON lines.
        self.job_log = HotLogger("geartask.worker")
        self.control: GrabLoop | None = None
        self.shutdown_reason = ""
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        names = sorted(self.tasks)
        self.sleepers = Sleepers()
        for i in range(1, self.threads_wanted + 1):
            t = self._job_thread(i)
            self.job_threads.append(t)
        # Thread index 0 is the control connection: it serves only this process's control function.
        self.control = ControlLoop(self, 0, [self.identity.control_function], self.finished,
                                   self._fin_r, name="control")
        for t in self.job_threads:
            t.start()
        self.control.start()
        threading.Thread(target=self._watchdog, name="watchdog", daemon=True).start()
        log.info("worker started", worker=self.name, ip=self.identity.ip, pid=self.identity.pid,
                 threads=self.threads_wanted, servers=self.config.servers, tasks=names,
                 control=self.identity.control_function)

    def _job_thread(self, index: int) -> GrabLoop:
        return GrabLoop(self, index, sorted(self.tasks), self.stopping, self._stop_r, name=f"job-{index}",
                        sleepers=self.sleepers)

    def _watchdog(self) -> None:
        """Fail plugin tasks that outlive worker.job_timeout, and replace their threads.

        Python code can't be killed from outside: the stuck thread is left to finish on its
        own (its result is then dropped), its connections are shut, the job fails with the
        reason (a requeue would only hang the next worker too), and a new thread takes its
        place. Shell commands are killed at their own timeout by veryeasyprocess instead.
        """
        limit = self.config.worker.job_timeout
        while not self.finished.wait(WATCHDOG_INTERVAL):
            now = time.monotonic()
            for pos, t in enumerate(list(self.job_threads)):
                job = t.current
                if (job is not None and job.task != "shell" and not t.abandoned
                        and now - t.attempt_started > limit and not self.stopping.is_set()):
                    self._abandon(pos, t, job, now - t.attempt_started)

    def _abandon(self, pos: int, t: GrabLoop, job: Job, seconds: float) -> None:
        t.abandoned = True
        with job_context(task=job.task, handle=job.handle, unique=job.unique):
            log.warning("task timed out; failing the job and replacing its thread", seconds=round(seconds, 3),
                        job_timeout=self.config.worker.job_timeout, thread=t.index)
            reason = {"error": f"timed out after {seconds:.1f}s (worker.job_timeout "
                               f"{self.config.worker.job_timeout:g}s); a Python task can't be killed, "
                               f"so its thread was abandoned and replaced", "timed_out": True}
            try:
                job._conn.send_raw(self._fail(job, reason, job.attempt, seconds))
            except ServerError:
                pass  # the connection is gone: gearmand requeues the job
        t.shut_connections()  # shut, not closed: the stuck thread still holds the sockets
        for link in t.links:
            self.sleepers.leave(link.server, t)
            self.sleepers.wake_one(link.server)
        replacement = self._job_thread(t.index)
        self.job_threads[pos] = replacement
        replacement.start()

    def request_shutdown(self, now: bool = False, reason: str = "request") -> None:
        with self._lock:
            first = not self.stopping.is_set()
            if now:
                self.now_requested.set()
            if first:
                self.shutdown_reason = reason
                self.stopping.set()
                os.write(self._stop_w, b"x")  # wakes every sleeping job thread
        if first or now:
            log.info("shutdown requested", reason=reason, now=now, grace=0 if now else self.config.worker.grace)

    def wait(self) -> int:
        """Block until shutdown is requested and done; return the exit status (0)."""
        while not self.stopping.wait(0.5):
            pass
        grace = self.config.worker.grace
        deadline = time.monotonic() + grace
        for t in self.job_threads:
            while t.is_alive():
                left = 0 if self.now_requested.is_set() else deadline - time.monotonic()
                if left <= 0:
                    break
                t.join(min(left, 0.1))
        busy = [t for t in self.job_threads if t.is_alive()]
        if busy:
            # In-flight jobs past the grace: kill their commands and close their connections,
            # so gearmand gives those jobs to another worker.
            log.warning("grace over; stopping in-flight jobs, gearmand will requeue them",
                        jobs=[t.current.handle for t in busy if t.current])
            # Connections first: a killed command must not be reported as a failure.
            for t in busy:
                t.shut_connections()
            self.cancel_jobs.set()
            for t in busy:
                t.join(2.0)
        self.finished.set()
        os.write(self._fin_w, b"x")
        if self.control is not None:
            self.control.join(2.0)
        done = sum(t.jobs_done for t in self.job_threads)
        log.info("worker stopped", reason=self.shutdown_reason, jobs_done=done)
        return 0

    def close(self) -> None:
        for fd in (self._stop_r, self._stop_w, self._fin_r, self._fin_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- jobs ------------------------------------------------------------------------
    def _retries_for(self, job: Job) -> int:
        wcfg = self.config.worker
        data = job.data
        asked = data.get("retries") if isinstance(data, dict) else None
        if isinstance(asked, int) and not isinstance(asked, bool) and asked >= 0:
            return min(asked, wcfg.max_retries)
        return min(wcfg.retries, wcfg.max_retries)

    def execute(self, thread: GrabLoop, job: Job, server: str) -> bytes:
        """Run a job with its retries; return the packets that answer it."""
        fn = self.tasks.get(job.task)
        job_log = self.job_log
        with job_context(task=job.task, handle=job.handle, unique=job.unique):
            if fn is None:  # cannot happen unless the server misbehaves: we only CAN_DO our tasks
                return self._fail(job, {"error": f"no such task {job.task!r} on this worker"}, 1, 0.0)
            try:
                retries = self._retries_for(job)
            except Exception:
                retries = 0
            job.retries = retries
            t0 = time.monotonic()
            attempt = 0
            while True:
                attempt += 1
                job.attempt = attempt
                a0 = time.monotonic()
                thread.attempt_started = a0
                try:
                    result = fn(job)
                    if self.cancel_jobs.is_set() or thread.abandoned:
                        raise Abandoned(job.handle)
                except Abandoned:
                    raise
                except JobRejected as e:
                    reason = {"error": e.reason, **e.details}
                    job_log.info("job", attempt=attempt, outcome="rejected",
                                 seconds=round(time.monotonic() - a0, 6), reason=e.reason)
                    return self._fail(job, reason, attempt, time.monotonic() - t0)
                except ServerError:
                    raise  # our connection is gone: gearmand requeues the job
                except Exception as e:
                    if self.cancel_jobs.is_set() or thread.abandoned:
                        raise Abandoned(job.handle) from None
                    if isinstance(e, AttemptFailed):
                        reason = {"error": e.reason, **e.details}
                    else:
                        reason = {"error": f"{type(e).__name__}: {e}", "type": type(e).__name__}
                    last = attempt > retries
                    job_log.info("job", attempt=attempt, outcome="failed" if last else "retrying",
                                 seconds=round(time.monotonic() - a0, 6), reason=reason["error"])
                    if last:
                        return self._fail(job, reason, attempt, time.monotonic() - t0)
                    backoff = min(self.config.worker.retry_backoff * 2 ** (attempt - 1), BACKOFF_MAX)
                    if self.cancel_jobs.wait(backoff):
                        raise Abandoned(job.handle)
                    continue
                try:
                    payload = encode_payload(result, job.task)
                except GeartaskError as e:
                    return self._fail(job, {"error": f"task result {e}"}, attempt, time.monotonic() - t0)
                job_log.info("job", attempt=attempt, outcome="complete",
                             seconds=round(time.monotonic() - a0, 6), server=server)
                return gp.pack(gp.WORK_COMPLETE, job_handle=job.handle, data=payload)

    def _fail(self, job: Job, reason: dict, attempts: int, seconds: float) -> bytes:
        reason = {**reason, "task": job.task, "attempts": attempts, "worker": self.label}
        try:
            self.dead_letters.append({"time": time.time(), "task": job.task, "unique": job.unique,
                                      "handle": job.handle, "data": job.data if not isinstance(job.data, bytes)
                                      else job.raw.hex(), "reason": reason.get("error"),
                                      "attempts": attempts, "worker": self.label, "seconds": round(seconds, 6)})
        except OSError as e:
            log.error("cannot write dead letter", error=str(e), path=str(self.dead_letters.path))
        return failure_packets(job.handle, reason)


def failure_packets(handle: str, reason: dict) -> bytes:
    """WORK_WARNING with the JSON reason, then WORK_FAIL.

    Not WORK_EXCEPTION: gearmand 1.1 ends the job on WORK_EXCEPTION but forwards it only to
    clients that asked for exceptions (OPTION_REQ "exceptions"); every other client waits for
    an answer that never comes (seen with the C `gearman` client). WORK_WARNING reaches every
    client, and WORK_FAIL then tells each of them, in the protocol's own terms, that it failed.
    """
    return (gp.pack(gp.WORK_WARNING, job_handle=handle, data=encode_payload(reason))
            + gp.pack(gp.WORK_FAIL, job_handle=handle))


class ControlLoop(GrabLoop):
    """Serves only this process's control function: shutdown requests."""

    def run(self) -> None:
        try:
            super().run()
        finally:
            self.close()

    def _serve(self, link: _Link, pkt: gp.Packet) -> bytes:
        handle = pkt.text("job_handle")
        try:
            cmd = parse_command(pkt["data"])
        except UsageError as e:
            log.warning("bad control job", error=str(e))
            return failure_packets(handle, {"error": str(e)})
        now = bool(cmd.get("now"))
        reply = gp.pack(gp.WORK_COMPLETE, job_handle=handle,
                        data=encode_payload({"ok": True, "worker": self.process.label, "command": cmd["command"],
                                             "now": now}))
        link.conn.send_raw(reply)
        self.process.request_shutdown(now=now, reason=f"control job from {link.conn.address}")
        return b""
