"""Threaded Gearman workers: one process, N threads, every thread attached to every server.

The loop each thread runs is the protocol's intended one, which is also the fast one:

* after a job it sends the result *and* the next GRAB_JOB_UNIQ in one write, so a busy
  worker costs one round trip per job (pygearman 0.2.6 sleeps and waits for a NOOP after
  every job: two);
* it sends PRE_SLEEP only when a server answers NO_JOB, and wakes on NOOP;
* at most one GRAB is outstanding per thread, so a thread never holds a job it is not
  about to run while another worker idles; a GRAB unanswered for ANSWER_TIMEOUT is *late*:
  the thread grabs elsewhere meanwhile, but keeps the connection (a result may still be in
  its send buffer) and serves a job that comes on it later;
* a connection that has slept ``worker.poll_timeout`` seconds is asked again (GRAB), which
  cures the python-gearman starvation bug: with several servers a NOOP can be lost or never
  sent, and a worker that only waits for NOOPs stops receiving jobs.

A connection is closed only when the server closes it or the kernel declares it dead (TCP
keepalive and user timeout, ``worker.keepalive``). A server that is down is retried with
backoff and logged once per outage. Each process also runs one control thread that only
serves its own control function (``geartask.control:<name>:<ip>:<pid>``, registered on
each server under the IP that server sees), so shutdown and ping are answered at once.
"""

from __future__ import annotations

import collections
import os
import select
import socket
import struct
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import protocol as gp
from ..control import WorkerIdentity, parse_command, parse_control_function
from ..errors import GeartaskError, PluginError, ServerError, UsageError
from ..jobs import decode_payload, encode_payload
from ..logs import JOB_LOGGER, get_logger, job_context
from ..plugins import is_reserved_task
from ..shell.task import ShellTask

from .dead_letters import DeadLetters, cap_text, payload_fields
from .errors import AttemptFailed, JobRejected, WorkerFailed
from .isolate import IsolatedTask

log = get_logger("geartask.worker")

RECONNECT_MIN, RECONNECT_MAX = 0.2, 10.0  # seconds between tries to reach a server that is down
ANSWER_TIMEOUT = 5.0  # seconds to answer ECHO (else the connection is dropped) or GRAB (else it is late)
CONNECT_TIMEOUT = 2.0  # seconds; refused connections fail at once, only blackholed hosts wait
BACKOFF_MAX = 30.0  # ceiling on the wait between attempts of one job
WATCHDOG_INTERVAL = 0.5  # seconds between looks for plugin tasks past worker.job_timeout
REPEATS_FATAL = 5  # the same thread error this many times in a row ends the process (exit 1)
UNANSWERED_LIMIT = 2  # a job handed to this process this often without an answer is failed unrun
REMEMBERED_JOBS = 10_000  # jobs remembered as failed by the watchdog or as unanswered


def keepalive_for(seconds: float) -> gp.Keepalive:
    """worker.keepalive -> socket options: a silent peer is declared dead after about
    ``seconds`` (idle half of it, then 3 probes over the other half; unacknowledged data
    waits at most ``seconds``)."""
    half = max(1.0, seconds / 2)
    return gp.Keepalive(idle=int(half), interval=max(1, int(half / 3)), count=3, user_timeout=seconds)


class Job:
    """What a plugin task receives; see geartask.hookspecs.geartask_tasks."""

    __slots__ = ("task", "handle", "unique", "raw", "attempt", "config", "cancel",
                 "_conn", "_data", "_decoded", "retries", "_log", "started")

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
        self.started = 0.0  # monotonic time the worker took the job (for ping)

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

    def status(self, numerator: int, denominator: int) -> None:
        """Report progress (WORK_STATUS) to the client waiting for this job."""
        self._conn.send(gp.WORK_STATUS, job_handle=self.handle, numerator=int(numerator),
                        denominator=int(denominator))

    def send_data(self, data: Any) -> None:
        """Send partial output (WORK_DATA) to the client waiting for this job."""
        self._conn.send(gp.WORK_DATA, job_handle=self.handle, data=encode_payload(data, self.task))


class Abandoned(ServerError):
    """A job stopped by a hard shutdown (gearmand gives it to another worker) or failed by the
    watchdog (which answered for it): its thread answers nothing."""

    def __init__(self, handle: str):
        super().__init__(f"job {handle} abandoned; this thread does not answer it")


@dataclass
class _Link:
    """One thread's connection to one server, and where it is in the grab cycle."""

    conn: gp.Connection
    # down | hello (connected, awaiting ECHO_RES) | idle | grabbing | late (GRAB unanswered
    # for ANSWER_TIMEOUT; still open) | busy (running its job) | sleeping | parked
    state: str = "down"
    server: int = 0  # index into config.servers
    since: float = 0.0  # when it entered its state
    next_try: float = 0.0  # when to reconnect (state down)
    backoff: float = RECONNECT_MIN
    fd: int = -1  # the socket's descriptor while registered with the thread's poller
    job: tuple = ()  # (server, handle, unique) of the job it is busy with


@dataclass
class _Outage:
    """Shared by a process's threads, so an outage is logged once, not once per thread and try."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    down: dict[str, set] = field(default_factory=dict)  # server -> threads that cannot reach it

    def failed(self, server: str, thread: int, reason: str,
               event: str = "server unreachable; retrying with backoff") -> None:
        with self.lock:
            threads = self.down.setdefault(server, set())
            new = not threads
            threads.add(thread)
        if new:
            log.warning(event, server=server, reason=reason)

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



_GRAB = gp.pack(gp.GRAB_JOB_UNIQ)
_WANTS_GRAB = ("idle", "sleeping", "parked")  # states in which a link may be sent a GRAB


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
        self.links = [_Link(gp.Connection(h, p, connect_timeout=CONNECT_TIMEOUT, keepalive=process.keepalive),
                            server=i) for i, (h, p) in enumerate(cfg.server_addresses)]
        # poll, not select: select fails for descriptor numbers past 1024.
        self.poller = select.poll()
        self.by_fd: dict[int, _Link] = {}
        for fd in (wake_fd, self._nudge_r):
            self.poller.register(fd, select.POLLIN)
        self.wants: collections.deque[_Link] = collections.deque()  # links to send a GRAB on
        self.outstanding: _Link | None = None  # the link with this thread's punctual GRAB
        self.current: Job | None = None  # the job running now (for the watchdog, ping, shutdown)
        self.attempt_started = 0.0  # when the current attempt began (for the watchdog)
        self.abandoned = False  # the watchdog failed this thread's stuck job and replaced the thread
        self.answer_lock = threading.Lock()  # the thread's answer and the watchdog's failure exclude each other
        self.released = threading.Event()  # the watchdog is done with an abandoned thread's sockets
        self.jobs_done = 0
        self.no_jobs = 0  # NO_JOB answers: grabs that found nothing (the herd shows here)
        self._last_error, self._last_error_at, self._repeats = "", 0.0, 0

    def abilities_at(self, identity: WorkerIdentity) -> list[str]:
        """The functions to register on a connection where we are ``identity``."""
        return self.abilities

    # -- connections -----------------------------------------------------------------
    def _connect(self, link: _Link, now: float) -> None:
        conn = link.conn
        try:
            conn.connect()
            link.fd = conn.fileno()
            self.poller.register(link.fd, select.POLLIN)
            self.by_fd[link.fd] = link
            # The IP this server sees us as: right even when the host got its address late
            # or has several, unlike one address guessed for the process at start.
            ip = conn.local_address or conn.host
            self.process.saw_ip(ip, conn.address)
            identity = self.identity.at(ip)
            packets = [gp.pack(gp.SET_CLIENT_ID, client_id=identity.client_id)]
            packets += [gp.pack(gp.CAN_DO, task=a) for a in self.abilities_at(identity)]
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

    def _forget(self, link: _Link) -> None:
        """Unregister and close ``link``'s socket; a job it was busy with went unanswered."""
        if link.state == "busy" and link.job:
            self.process.unanswered(link.job)
        if link.fd >= 0:
            try:
                self.poller.unregister(link.fd)
            except KeyError:
                pass
            self.by_fd.pop(link.fd, None)
            link.fd = -1
        link.conn.close()

    def _drop(self, link: _Link, reason: str) -> None:
        was_listening = link.state == "sleeping"
        self._forget(link)
        self._set_state(link, "down")
        if was_listening:
            self.sleepers.wake_one(link.server)  # someone else listens when the server is back
        link.next_try = time.monotonic() + link.backoff
        link.backoff = min(link.backoff * 2, RECONNECT_MAX)  # reset only when the server answers
        if self.outstanding is link:
            self.outstanding = None
        if link in self.wants:
            self.wants.remove(link)
        self.process.outage.failed(link.conn.address, self.index, reason)

    def close(self) -> None:
        for link in self.links:
            self._forget(link)
            self._set_state(link, "down")

    def shut_connections(self, keep: gp.Connection | None = None) -> None:
        """From another thread: end this thread's connections (all but ``keep``) without
        closing their sockets (it may be using them), so gearmand sees them gone."""
        for link in self.links:
            if link.conn is not keep:
                _shut(link.conn)

    # -- the loop --------------------------------------------------------------------
    def run(self) -> None:
        try:
            while not self.stop.is_set() and not self.abandoned:
                try:
                    self._cycle()
                except Exception as e:  # a bug must not end the thread: log it, start clean
                    self._thread_error(e)
        finally:
            if self.abandoned:  # the watchdog still uses the stuck job's connection
                self.released.wait(ANSWER_TIMEOUT + 1)
            self._close_quietly()  # the nudge pipe stays open: another thread may still write to it

    def _thread_error(self, e: Exception) -> None:
        what = cap_text(f"{type(e).__name__}: {e}", 500)
        log.error("worker thread error; reconnecting", error=what, traceback=traceback.format_exc(),
                  thread=self.index)
        now = time.monotonic()
        same = what == self._last_error and now - self._last_error_at < 60
        self._repeats = self._repeats + 1 if same else 1
        self._last_error, self._last_error_at = what, now
        if self._repeats >= REPEATS_FATAL:
            self.process.fatal(f"worker thread {self.index} failed {self._repeats} times in a row: {what}")
        self._close_quietly()
        self.wants.clear()
        self.outstanding = None
        self.stop.wait(1.0)

    def _close_quietly(self) -> None:
        try:
            self.close()
        except Exception:  # the state is broken (that is why we are here); keep the thread alive
            pass

    def _cycle(self) -> None:
        now = time.monotonic()
        for link in self.links:
            if link.state == "down" and now >= link.next_try:
                self._connect(link, now)
        if self.outstanding is None:
            self._grab_next()

        timeout = self._next_deadline(now)
        events = self.poller.poll(int(timeout * 1000 + 0.999))
        if self.stop.is_set():
            return
        for fd, _ in events:
            link = self.by_fd.get(fd)
            if link is None:
                if fd == self._nudge_r:
                    self._unpark()
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
                    if self.abandoned:
                        return  # the watchdog answered and owns the connection now
                    self._drop(link, str(e))
                    break
                if self.stop.is_set() or self.abandoned:
                    return
        now = time.monotonic()
        for link in self.links:
            state = link.state
            if state in ("sleeping", "parked"):
                # Starvation cure: a link asleep for poll_timeout is asked again, NOOP or not.
                if now - link.since >= self.poll_timeout and link not in self.wants:
                    self.wants.append(link)
            elif state == "hello" and now - link.since >= ANSWER_TIMEOUT:
                self._drop(link, f"connected, but no answer within {ANSWER_TIMEOUT:g}s")
            elif state == "grabbing" and now - link.since >= ANSWER_TIMEOUT:
                self._late(link)

    def _late(self, link: _Link) -> None:
        """No answer to GRAB in time: grab elsewhere, but keep the connection. Closing it would
        drop what may still be in its send buffer (the last job's result) and gain nothing:
        gearmand may still assign us a job on it, and the kernel ends it if the server is gone."""
        self._set_state(link, "late")
        if self.outstanding is link:
            self.outstanding = None
        self.process.outage.failed(link.conn.address, self.index,
                                   f"no answer to GRAB_JOB within {ANSWER_TIMEOUT:g}s",
                                   event="server slow to answer; connection kept, other servers served meanwhile")

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
        if after is not None and self.outstanding is None and not self.wants and not self.stop.is_set():
            link = after  # the fast path: result and next grab in one write
        else:
            if after is not None:
                if prefix:
                    after.conn.send_raw(prefix)
                    prefix = b""
                self._set_state(after, "idle")
                if not self.stop.is_set():
                    self.wants.append(after)
            if self.outstanding is not None:
                return  # one punctual GRAB at a time (a late one may be answered too: see _late)
            link = None
            while self.wants and not self.stop.is_set():
                candidate = self.wants.popleft()
                if candidate.state in _WANTS_GRAB:
                    link = candidate
                    break
            if link is None:
                return
        try:
            link.conn.send_raw(prefix + _GRAB if prefix else _GRAB)
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
            if link.state == "late":
                self.process.outage.recovered(link.conn.address, self.index)
            if link.state in ("grabbing", "late"):  # an answer we asked for
                if self.sleepers.sleep_or_park(link.server, self):
                    link.conn.send_raw(_PRE_SLEEP)
                    link.state, link.since = "sleeping", time.monotonic()
                else:
                    link.state, link.since = "parked", time.monotonic()
            if self.outstanding is None:
                self._grab_next()
        elif cmd in (gp.JOB_ASSIGN_UNIQ, gp.JOB_ASSIGN):
            if self.outstanding is link:
                self.outstanding = None
            state = link.state
            if state == "late":
                self.process.outage.recovered(link.conn.address, self.index)
            elif state in ("sleeping", "parked"):  # unasked for; serve it all the same
                self.sleepers.leave(link.server, self)
            link.state = "busy"
            self.sleepers.wake_one(link.server)  # while we work, another thread listens
            handle = pkt.text("job_handle")
            link.job = (link.conn.address, handle, pkt.text("unique") if "unique" in pkt.args else "")
            try:
                reply = self._serve(link, pkt, handle)
            except ServerError:
                raise
            except Exception as e:  # a worker bug or a job it can't handle: fail the job, once
                reply = self._serve_failed(link.job, e)
            self._grab_next(reply, after=link)
            link.job = ()
        elif cmd == gp.ERROR:
            log.warning("server error", server=link.conn.address, code=cap_text(pkt.text("error_code"), 100),
                        text=cap_text(pkt.text("error_text"), 500))
        # anything else needs no answer

    def _serve(self, link: _Link, pkt: gp.Packet, handle: str) -> bytes:
        process = self.process
        task = pkt.text("task")
        if process.unanswered_jobs and process.unanswered_jobs.get(link.job, 0) >= UNANSWERED_LIMIT:
            return process.refuse(link.job, task)
        job = Job(link.conn, handle, task, link.job[2], pkt["data"], process.config, process.cancel_jobs)
        job.started = self.attempt_started = time.monotonic()  # before current: the watchdog reads both
        self.current = job
        try:
            reply = process.execute(self, job, server=link.conn.address)
        finally:
            with self.answer_lock:  # from here on the watchdog leaves this job alone, or has taken it
                self.current = None
                abandoned = self.abandoned
            self.jobs_done += 1
        if abandoned:
            raise Abandoned(handle)
        return reply

    def _serve_failed(self, job_key: tuple, e: BaseException) -> bytes:
        _, handle, unique = job_key
        what = cap_text(f"{type(e).__name__}: {e}", 500)
        log.error("worker error while serving a job; failing it", handle=handle, unique=unique, error=what,
                  traceback=traceback.format_exc(), thread=self.index)
        return failure_packets(handle, {"error": f"worker error: {what}", "worker": self.process.label})


_PRE_SLEEP = gp.pack(gp.PRE_SLEEP)


def _shut(conn: gp.Connection) -> None:
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


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
        # The IP part is per connection (see GrabLoop._connect); ips collects them for the label.
        self.identity = WorkerIdentity(name, "", os.getpid())
        self.ips: frozenset[str] = frozenset()
        self.label = f"{name}::{self.identity.pid}"
        self.keepalive = keepalive_for(config.worker.keepalive)
        self.tasks = dict(tasks)
        self.tasks["shell"] = ShellTask(config.worker, self.label)
        # Tasks that end themselves at their timeout: the watchdog leaves them alone.
        self.own_timeout = {"shell"} | {t for t, fn in self.tasks.items() if isinstance(fn, IsolatedTask)}
        self.outage = _Outage()
        self.dead_letters = DeadLetters(Path(config.log.dir) / "dead-letter.jsonl",
                                        max_bytes=config.log.max_bytes, backups=config.log.backups)
        self.stopping = threading.Event()  # job threads: take no new jobs
        self.finished = threading.Event()  # control thread: the process is done
        self.cancel_jobs = threading.Event()  # running shell commands: killed
        self.now_requested = threading.Event()
        self._stop_r, self._stop_w = os.pipe()
        self._fin_r, self._fin_w = os.pipe()
        self.job_threads: list[GrabLoop] = []
        self.job_log = get_logger(JOB_LOGGER)  # the per-job line: on the console only with -v
        self.control: GrabLoop | None = None
        self.shutdown_reason = ""
        self.fatal_reason: str | None = None
        # (server, handle, unique) -> times handed to us without an answer getting out; the
        # watchdog's failures are put at the limit: such a job is failed unrun when it comes back.
        self.unanswered_jobs: collections.OrderedDict[tuple, int] = collections.OrderedDict()
        self.started_at = time.time()
        self._lock = threading.Lock()

    # -- identity --------------------------------------------------------------------
    def saw_ip(self, ip: str, server: str) -> None:
        """A connection's local address: the label (in results and logs) shows every one."""
        if ip in self.ips:
            return
        with self._lock:
            if ip in self.ips:
                return
            self.ips = self.ips | {ip}
            self.label = f"{self.name}:{','.join(sorted(self.ips))}:{self.identity.pid}"
            self.tasks["shell"].worker_label = self.label
        log.info("connected from a new local address", ip=ip, server=server)

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        names = sorted(self.tasks)
        self.sleepers = Sleepers()
        for i in range(1, self.threads_wanted + 1):
            t = self._job_thread(i)
            self.job_threads.append(t)
        # Thread index 0 is the control connection: it serves only this process's control function.
        self.control = ControlLoop(self, 0, [], self.finished, self._fin_r, name="control")
        for t in self.job_threads:
            t.start()
        self.control.start()
        threading.Thread(target=self._watchdog, name="watchdog", daemon=True).start()
        log.info("worker started", worker=self.name, pid=self.identity.pid, threads=self.threads_wanted,
                 servers=self.config.servers, tasks=names, isolated=sorted(self.own_timeout - {"shell"}),
                 keepalive=self.keepalive.bound, control=self.identity.at("<ip>").control_function)

    def _job_thread(self, index: int) -> GrabLoop:
        return GrabLoop(self, index, sorted(self.tasks), self.stopping, self._stop_r, name=f"job-{index}",
                        sleepers=self.sleepers)

    def _watchdog(self) -> None:
        """Fail plugin tasks that outlive worker.job_timeout, and replace their threads.

        Python code can't be killed from outside: the stuck thread is left to finish on its
        own (its result is then dropped), the job fails with the reason (a requeue would only
        hang the next worker too) and a new thread takes its place. Shell commands and
        isolated tasks are killed at their own timeout instead.
        """
        limit = self.config.worker.job_timeout
        while not self.finished.wait(WATCHDOG_INTERVAL):
            now = time.monotonic()
            for pos, t in enumerate(list(self.job_threads)):
                job = t.current
                if (job is not None and job.task not in self.own_timeout and not t.abandoned
                        and now - t.attempt_started > limit and not self.stopping.is_set()):
                    self._abandon(pos, t, job, now - t.attempt_started)

    def _abandon(self, pos: int, t: GrabLoop, job: Job, seconds: float) -> None:
        with t.answer_lock:
            if t.current is not job or t.abandoned:
                return  # it answered in the meantime
            t.abandoned = True
        key = (job._conn.address, job.handle, job.unique)
        self.unanswered(key, at_least=UNANSWERED_LIMIT)  # never run here again, whatever gearmand does
        with job_context(task=job.task, handle=job.handle, unique=job.unique):
            log.warning("task timed out; failing the job and replacing its thread", seconds=round(seconds, 3),
                        job_timeout=self.config.worker.job_timeout, thread=t.index)
            reason = {"error": f"timed out after {seconds:.1f}s (worker.job_timeout "
                               f"{self.config.worker.job_timeout:g}s); a Python task can't be killed, "
                               f"so its thread was abandoned and replaced (worker.isolate runs a task "
                               f"in a process that can be)", "timed_out": True}
            packets = self._fail(job, reason, job.attempt, seconds)
        t.shut_connections(keep=job._conn)  # its other connections: a late GRAB must not catch a job
        for link in t.links:
            self.sleepers.leave(link.server, t)
            self.sleepers.wake_one(link.server)
        replacement = self._job_thread(t.index)
        self.job_threads[pos] = replacement
        replacement.start()
        threading.Thread(target=self._deliver_failure, args=(t, job._conn, packets), daemon=True,
                         name=f"watchdog-{t.index}").start()

    @staticmethod
    def _deliver_failure(t: GrabLoop, conn: gp.Connection, packets: bytes) -> None:
        """Send a stuck job's failure, and shut its connection only once gearmand has processed
        it: gearmand requeues the jobs of a connection that closes, and may do so before it
        handles packets still queued from it (the job then ran again elsewhere). Its answer to
        an ECHO sent after the failure proves the failure was handled."""
        token = b"geartask-watchdog-%d" % id(conn)
        echo_res = struct.pack("!4sII", b"\0RES", gp.ECHO_RES, len(token)) + token
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
            _shut(conn)
            t.released.set()

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

    def fatal(self, reason: str) -> None:
        """Something keeps failing that retrying will not cure: stop, and exit 1 (wait raises)."""
        with self._lock:
            if self.fatal_reason is not None:
                return
            self.fatal_reason = reason
        log.error("worker cannot go on; stopping", reason=reason)
        self.request_shutdown(reason=reason)

    def wait(self) -> int:
        """Block until shutdown is requested and done; return the exit status (0).

        Raises WorkerFailed (exit 1) after the shutdown when the process stopped on ``fatal``.
        """
        while not self.stopping.wait(0.5):
            pass
        grace = self.config.worker.grace
        deadline = time.monotonic() + grace
        for t in list(self.job_threads):
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
                        jobs=[job.handle for t in busy if (job := t.current) is not None])
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
        if self.fatal_reason is not None:
            raise WorkerFailed(self.fatal_reason)
        return 0

    def close(self) -> None:
        for fn in self.tasks.values():
            if isinstance(fn, IsolatedTask):
                fn.close()
        for fd in (self._stop_r, self._stop_w, self._fin_r, self._fin_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- jobs ------------------------------------------------------------------------
    def unanswered(self, key: tuple, at_least: int = 0) -> None:
        """Count a job that this process was handed and did not answer (bounded memory)."""
        with self._lock:
            seen = self.unanswered_jobs
            seen[key] = max(seen.pop(key, 0) + 1, at_least)
            while len(seen) > REMEMBERED_JOBS:
                seen.popitem(last=False)

    def refuse(self, key: tuple, task: str) -> bytes:
        """Fail a job that came back after it went unanswered here UNANSWERED_LIMIT times (or
        after the watchdog failed it), without running it again."""
        server, handle, unique = key
        with job_context(task=task, handle=handle, unique=unique):
            log.warning("job handed out again after it went unanswered here; failing it unrun",
                        times=self.unanswered_jobs.get(key))
        return failure_packets(handle, {"error": "this job was handed to this worker again after it "
                                                 "timed out or went unanswered here: failed without "
                                                 "running it again", "task": task, "worker": self.label})

    def _retries_for(self, job: Job) -> int:
        """The job's own "retries" (capped by worker.max_retries), else worker.retries.
        JobRejected when the data can't be decoded or "retries" is not a whole number >= 0."""
        wcfg = self.config.worker
        data = job.data
        asked = data.get("retries") if isinstance(data, dict) else None
        if asked is None:
            return min(wcfg.retries, wcfg.max_retries)
        if not isinstance(asked, int) or isinstance(asked, bool) or asked < 0:
            raise JobRejected(f"'retries' must be a whole number >= 0, got {cap_text(repr(asked), 80)}")
        return min(asked, wcfg.max_retries)

    def execute(self, thread: GrabLoop, job: Job, server: str) -> bytes:
        """Run a job with its retries; return the packets that answer it."""
        fn = self.tasks.get(job.task)
        job_log = self.job_log
        with job_context(task=job.task, handle=job.handle, unique=job.unique):
            if fn is None:  # only a misbehaving server assigns a task we did not CAN_DO
                return self._fail(job, {"error": f"no such task {cap_text(job.task, 200)!r} on this worker"},
                                  0, 0.0)
            try:
                job.retries = retries = self._retries_for(job)
            except JobRejected as e:
                job_log.info("job", attempt=1, outcome="rejected", seconds=0.0, reason=e.reason)
                return self._fail(job, {"error": e.reason, **e.details}, 1, 0.0)
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
                except BaseException as e:  # SystemExit and KeyboardInterrupt too: a task's, not ours
                    if isinstance(e, ServerError) and not job._conn.connected:
                        raise  # our connection is gone: gearmand requeues the job
                    if self.cancel_jobs.is_set() or thread.abandoned:
                        raise Abandoned(job.handle) from None
                    if isinstance(e, AttemptFailed):
                        reason = {"error": e.reason, **e.details}
                    else:
                        reason = {"error": f"{type(e).__name__}: {e}", "type": type(e).__name__}
                    last = attempt > retries
                    job_log.info("job", attempt=attempt, outcome="failed" if last else "retrying",
                                 seconds=round(time.monotonic() - a0, 6), reason=cap_text(reason["error"], 500))
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
                except Exception as e:  # nested too deep for JSON, or a broken container type
                    return self._fail(job, {"error": f"task result cannot be serialised as JSON: "
                                                     f"{type(e).__name__}: {e}"}, attempt, time.monotonic() - t0)
                job_log.info("job", attempt=attempt, outcome="complete",
                             seconds=round(time.monotonic() - a0, 6), server=server)
                return gp.pack(gp.WORK_COMPLETE, job_handle=job.handle, data=payload)

    def _fail(self, job: Job, reason: dict, attempts: int, seconds: float) -> bytes:
        reason = {**reason, "error": cap_text(str(reason.get("error"))), "task": job.task,
                  "attempts": attempts, "worker": self.label}
        record = {"time": time.time(), "task": job.task, "unique": job.unique, "handle": job.handle,
                  **payload_fields(job.raw, job._data if job._decoded else None), "reason": reason["error"],
                  "attempts": attempts, "worker": self.label, "seconds": round(seconds, 6)}
        try:
            self.dead_letters.append(record)
        except OSError as e:
            log.error("cannot write dead letter", error=str(e), path=str(self.dead_letters.path))
        return failure_packets(job.handle, reason)

    # -- ping ------------------------------------------------------------------------
    def ping_reply(self) -> dict:
        """What a ping control job is answered with (the contract: geartask.control.ping_request)."""
        now = time.monotonic()
        running = []
        for t in list(self.job_threads):
            job = t.current
            if job is not None:
                running.append({"handle": job.handle, "task": job.task, "unique": job.unique,
                                "server": job._conn.address, "seconds": round(now - job.started, 3)})
        return {"ok": True, "command": "ping", "worker": self.label, "name": self.name,
                "pid": self.identity.pid, "ips": sorted(self.ips), "threads": self.threads_wanted,
                "busy": len(running), "jobs_done": sum(t.jobs_done for t in list(self.job_threads)),
                "started": round(self.started_at, 3), "running": running}


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
    return gp.pack(gp.WORK_WARNING, job_handle=handle, data=data) + gp.pack(gp.WORK_FAIL, job_handle=handle)


class ControlLoop(GrabLoop):
    """Serves only this process's control function, registered per connection: shutdown, ping."""

    def abilities_at(self, identity: WorkerIdentity) -> list[str]:
        return [identity.control_function]

    def _serve(self, link: _Link, pkt: gp.Packet, handle: str) -> bytes:
        process = self.process
        function = parse_control_function(pkt.text("task"))
        if function is None or (function.name, function.pid) != (self.identity.name, self.identity.pid):
            return failure_packets(handle, {"error": f"not this worker's control function: "
                                                     f"{cap_text(pkt.text('task'), 200)!r}"})
        try:
            cmd = parse_command(pkt["data"])
        except UsageError as e:
            log.warning("bad control job", error=str(e), server=link.conn.address)
            return failure_packets(handle, {"error": str(e)})
        if cmd["command"] == "ping":
            return gp.pack(gp.WORK_COMPLETE, job_handle=handle, data=encode_payload(process.ping_reply()))
        now = bool(cmd.get("now"))
        reply = gp.pack(gp.WORK_COMPLETE, job_handle=handle,
                        data=encode_payload({"ok": True, "worker": process.label, "command": cmd["command"],
                                             "now": now}))
        link.conn.send_raw(reply)
        process.request_shutdown(now=now, reason=f"control job from {link.conn.address}")
        return b""
