"""The grab loop: a worker thread's connections to every server, and the cycle that takes jobs."""

from __future__ import annotations

import collections
import enum
import os
import select
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import gearman as gp
from ..control import WorkerIdentity
from ..errors import ServerError
from ..logs import get_logger

from .dead_letters import cap_text
from .job import Abandoned, Job
from .outcomes import refused
from .stats import TaskCounters

if TYPE_CHECKING:
    from .process import WorkerProcess

log = get_logger("geartask.worker")

ANSWER_TIMEOUT = 5.0  # seconds to answer ECHO (else the connection is dropped) or GRAB (else it is late)
REPEATS_FATAL = 5  # the same thread error this many times in a row ends the process (exit 1)


class LinkState(enum.Enum):
    """Where one thread's connection to one server is in the grab cycle."""

    DOWN = "down"  # not connected; reconnect at next_try
    HELLO = "hello"  # connected, abilities sent, awaiting the ECHO_RES that proves the server answers
    IDLE = "idle"  # may be sent a GRAB
    GRABBING = "grabbing"  # this thread's one punctual GRAB is outstanding here
    LATE = "late"  # a GRAB unanswered for ANSWER_TIMEOUT; kept open, its answer still served
    BUSY = "busy"  # running the job that came on it
    SLEEPING = "sleeping"  # PRE_SLEEP sent: the process's listener for this server, woken by NOOP
    PARKED = "parked"  # idle without PRE_SLEEP: another thread of the group listens (Sleepers)


# Module-level names: the per-job path compares states by identity, and a global is the
# fastest lookup (an Enum class attribute costs several times more).
DOWN, HELLO, IDLE, GRABBING, LATE, BUSY, SLEEPING, PARKED = LinkState
_WANTS_GRAB = (IDLE, SLEEPING, PARKED)  # states in which a link may be sent a GRAB
_RESTING = (SLEEPING, PARKED)


@dataclass
class Link:
    """One thread's connection to one server, and where it is in the grab cycle."""

    conn: gp.Connection
    state: LinkState = DOWN
    server: int = 0  # index into config.servers
    since: float = 0.0  # when it entered its state
    next_try: float = 0.0  # when to reconnect (state DOWN)
    backoff: float = gp.RECONNECT_MIN
    fd: int = -1  # the socket's descriptor while registered with the thread's poller
    job: tuple = ()  # (server, handle, unique) of the job it is busy with
    permit: bool = False  # its outstanding GRAB holds one of worker.max_jobs' permits
    acks: collections.deque = field(default_factory=collections.deque)  # outcome jobs awaiting JOB_CREATED


@dataclass
class Outage:
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
    """One sleeping connection per server per group of threads, instead of one per thread.

    gearmand sends a NOOP to every sleeping connection for every job, so N idle threads
    wake, grab, and N-1 of them get NO_JOB and take the GIL from the one running the job.
    Here only one thread per server sleeps (PRE_SLEEP); the others park that connection
    (no PRE_SLEEP, so gearmand leaves them alone). The thread that gets a job wakes one
    parked thread, which grabs in its turn, so a burst still spreads over every thread.
    Parked connections, like sleeping ones, grab again after worker.poll_timeout. Threads
    that serve different tasks (worker.tasks) have a Sleepers each: gearmand wakes only the
    connections that can do the job's function.
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
_PRE_SLEEP = gp.pack(gp.PRE_SLEEP)


def shut(conn: gp.Connection) -> None:
    """End ``conn`` for the server without closing the socket (another thread may be using it)."""
    sock = conn.sock
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class GrabLoop(threading.Thread):
    """A job thread: one connection per server, serving jobs of ``abilities``.

    The cycle is the protocol's intended one, which is also the fast one:

    * after a job it sends the result *and* the next GRAB_JOB_UNIQ in one write, so a busy
      thread costs one round trip per job;
    * it sends PRE_SLEEP only when a server answers NO_JOB, and wakes on NOOP (one sleeper
      per server and group, see Sleepers);
    * at most one GRAB is outstanding per thread, so a thread never holds a job it is not
      about to run while another worker idles; a GRAB unanswered for ANSWER_TIMEOUT is
      *late*: the thread grabs elsewhere meanwhile, but keeps the connection (a result may
      still be in its send buffer) and serves a job that comes on it later;
    * a connection that has slept ``worker.poll_timeout`` seconds is asked again (GRAB),
      which cures python-gearman's starvation bug (a NOOP lost or never sent with several
      servers).

    A connection is closed only when the server closes it or the kernel declares it dead
    (``worker.keepalive``); a server that is down is retried with backoff, logged once per
    outage. With ``worker.max_jobs`` each GRAB first takes a permit from the process's
    JobBudget, so no thread ever receives a job beyond the limit.
    """

    def __init__(self, process: "WorkerProcess", index: int, abilities: list[str],
                 stop: threading.Event, wake_fd: int, name: str, sleepers: Sleepers | None = None):
        super().__init__(name=name, daemon=True)
        self.sleepers = sleepers or Sleepers()
        self.unparked: set[int] = set()  # servers another thread asked us to grab from (under sleepers.lock)
        self._nudge_r, self._nudge_w = os.pipe()
        self.process = process
        self.runner = process.runner
        self.budget = process.budget  # None: no worker.max_jobs
        self.index = index
        self.identity = process.identity.for_thread(index)
        self.abilities = abilities
        self.stop = stop
        self.wake_fd = wake_fd
        cfg = process.config
        self.poll_timeout = cfg.worker.poll_timeout
        # A short connect timeout: while a thread waits on an unreachable server it serves no other.
        self.links = [Link(gp.Connection(h, p, connect_timeout=gp.CONNECT_TIMEOUT, keepalive=process.keepalive),
                           server=i) for i, (h, p) in enumerate(cfg.server_addresses)]
        # poll, not select: select fails for descriptor numbers past 1024.
        self.poller = select.poll()
        self.by_fd: dict[int, Link] = {}
        for fd in (wake_fd, self._nudge_r):
            self.poller.register(fd, select.POLLIN)
        self.wants: collections.deque[Link] = collections.deque()  # links to send a GRAB on
        self.outstanding: Link | None = None  # the link with this thread's punctual GRAB
        self.current: Job | None = None  # the job running now (for the watchdog, ping, stop, shutdown)
        self.attempt_started = 0.0  # when the current attempt began (for the watchdog)
        self.abandoned = False  # the watchdog or a stop answered for this thread's job and replaced the thread
        self.answer_lock = threading.Lock()  # the thread's answer and the watchdog's failure exclude each other
        self.released = threading.Event()  # the watchdog is done with an abandoned thread's sockets
        self.cancel = threading.Event()  # the running job's job.cancel: set at shutdown past grace, or by a stop
        self.stop_requested = False  # an operator stopped the running job (set with cancel, under answer_lock)
        self.counters = TaskCounters(abilities)  # written by this thread only
        self.outcome: dict | None = None  # the outcome record of the job just served, if it is reported
        self.jobs_done = 0
        self.no_jobs = 0  # NO_JOB answers: grabs that found nothing (the herd shows here)
        self._last_error, self._last_error_at, self._repeats = "", 0.0, 0

    def abilities_at(self, identity: WorkerIdentity) -> list[str]:
        """The functions to register on a connection where we are ``identity``."""
        return self.abilities

    # -- connections -----------------------------------------------------------------
    def _connect(self, link: Link, now: float) -> None:
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
        link.state, link.since = HELLO, now

    def _hello_answered(self, link: Link) -> None:
        link.state, link.since, link.backoff = IDLE, time.monotonic(), gp.RECONNECT_MIN
        self.process.outage.recovered(link.conn.address, self.index)
        self.wants.append(link)

    def nudge(self) -> None:
        """From another thread: wake this thread's poll (it was unparked, or a permit is free)."""
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
            if link.state is PARKED and link not in self.wants:
                link.state = IDLE
                self.wants.append(link)

    def _set_state(self, link: Link, state: LinkState) -> None:
        if link.state in _RESTING and state not in _RESTING:
            self.sleepers.leave(link.server, self)
        link.state, link.since = state, time.monotonic()

    def _forget(self, link: Link) -> None:
        """Unregister and close ``link``'s socket; a job it was busy with went unanswered
        (gearmand requeues it, so its max_jobs permit goes back, unless the watchdog answered
        for it), and so does a permit its GRAB held."""
        if link.state is BUSY and link.job:
            self.process.unanswered.count(link.job)
            if self.budget is not None and not self.abandoned:
                self.budget.give_back()
        if link.permit:
            link.permit = False
            self.budget.give_back()
        self.process.held.forget(link)
        link.acks.clear()
        if link.fd >= 0:
            try:
                self.poller.unregister(link.fd)
            except KeyError:
                pass
            self.by_fd.pop(link.fd, None)
            link.fd = -1
        link.conn.close()

    def _drop(self, link: Link, reason: str) -> None:
        was_listening = link.state is SLEEPING
        self._forget(link)
        self._set_state(link, DOWN)
        if was_listening:
            self.sleepers.wake_one(link.server)  # someone else listens when the server is back
        link.next_try = time.monotonic() + link.backoff
        link.backoff = min(link.backoff * 2, gp.RECONNECT_MAX)  # reset only when the server answers
        if self.outstanding is link:
            self.outstanding = None
        if link in self.wants:
            self.wants.remove(link)
        self.process.outage.failed(link.conn.address, self.index, reason)

    def close(self) -> None:
        for link in self.links:
            self._forget(link)
            self._set_state(link, DOWN)

    def shut_connections(self, keep: gp.Connection | None = None) -> None:
        """From another thread: end this thread's connections (all but ``keep``) without
        closing their sockets (it may be using them), so gearmand sees them gone."""
        for link in self.links:
            if link.conn is not keep:
                shut(link.conn)

    # -- stop (from the control thread) ----------------------------------------------------
    def request_stop(self, job: Job) -> bool:
        """Cancel ``job`` if it is still this thread's: its command or isolated process is
        killed and the runner fails it with "stopped by operator". False when it has ended."""
        with self.answer_lock:
            if self.current is not job or self.abandoned:
                return False
            self.stop_requested = True
            self.cancel.set()
        return True

    def _new_job_after_stop(self) -> None:
        """The job an operator stopped has ended: the next one starts uncancelled (unless the
        process is cancelling every job)."""
        self.stop_requested = False
        if not self.process.cancel_jobs.is_set():
            self.cancel.clear()

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
            else:
                self._send_held()
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

    def _send_held(self) -> None:
        """Send every answer held back for an outcome batch (the thread stops)."""
        for link in self.links:
            data = self.process.held.take(link)
            if data and link.state is not DOWN:
                try:
                    link.conn.send_raw(data)
                except ServerError:
                    pass  # those jobs are requeued by gearmand

    def _close_quietly(self) -> None:
        try:
            self.close()
        except Exception:  # the state is broken (that is why we are here); keep the thread alive
            pass

    def _cycle(self) -> None:
        now = time.monotonic()
        for link in self.links:
            if link.state is DOWN and now >= link.next_try:
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
                except (ServerError, Abandoned) as e:
                    if self.abandoned:
                        return  # the watchdog answered and owns the connection now
                    self._drop(link, str(e))  # shutdown past grace: gearmand requeues the job
                    break
                if self.stop.is_set() or self.abandoned:
                    return
        now = time.monotonic()
        for link in self.links:
            state = link.state
            if state in _RESTING:
                # Starvation cure: a link asleep for poll_timeout is asked again, NOOP or not.
                if now - link.since >= self.poll_timeout and link not in self.wants:
                    self.wants.append(link)
            elif state is HELLO and now - link.since >= ANSWER_TIMEOUT:
                self._drop(link, f"connected, but no answer within {ANSWER_TIMEOUT:g}s")
            elif state is GRABBING and now - link.since >= ANSWER_TIMEOUT:
                self._late(link)

    def _late(self, link: Link) -> None:
        """No answer to GRAB in time: grab elsewhere, but keep the connection. Closing it would
        drop what may still be in its send buffer (the last job's result) and gain nothing:
        gearmand may still assign us a job on it, and the kernel ends it if the server is gone."""
        self._set_state(link, LATE)
        if self.outstanding is link:
            self.outstanding = None
        self.process.outage.failed(link.conn.address, self.index,
                                   f"no answer to GRAB_JOB within {ANSWER_TIMEOUT:g}s",
                                   event="server slow to answer; connection kept, other servers served meanwhile")

    def _next_deadline(self, now: float) -> float:
        t = self.poll_timeout
        for link in self.links:
            state = link.state
            if state is DOWN:
                t = min(t, link.next_try - now)
            elif state in _RESTING:
                t = min(t, link.since + self.poll_timeout - now)
            elif state is HELLO or state is GRABBING:
                t = min(t, link.since + ANSWER_TIMEOUT - now)
        return max(0.0, t)

    def _permit(self) -> bool:
        """worker.max_jobs: may this thread send a GRAB now? (Always, without a limit.)"""
        return self.budget is None or self.budget.take(self)

    def _grab_next(self, prefix: bytes = b"", after: Link | None = None) -> None:
        """Send GRAB_JOB_UNIQ on the next link that wants one (with ``prefix`` packets on ``after``)."""
        if (after is not None and self.outstanding is None and not self.wants and not self.stop.is_set()
                and (self.budget is None or self.budget.take(self))):
            link = after  # the fast path: result and next grab in one write
        else:
            if after is not None:
                if prefix:
                    after.conn.send_raw(prefix)
                    prefix = b""
                self._set_state(after, IDLE)
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
            if not self._permit():
                self.wants.appendleft(link)  # grabbed for when a permit comes back (nudge)
                return
        if self.budget is not None:
            link.permit = True
        try:
            link.conn.send_raw(prefix + _GRAB if prefix else _GRAB)
        except ServerError as e:
            self._drop(link, str(e))
            return
        self._set_state(link, GRABBING)
        self.outstanding = link

    def _on_packet(self, link: Link, pkt: gp.Packet) -> None:
        cmd = pkt.cmd
        if cmd == gp.ECHO_RES:
            if link.state is HELLO:
                self._hello_answered(link)
        elif cmd == gp.NOOP:
            if link.state is SLEEPING:
                self._set_state(link, IDLE)
                if link not in self.wants:
                    self.wants.append(link)
        elif cmd == gp.NO_JOB:
            self.no_jobs += 1
            if self.outstanding is link:
                self.outstanding = None
            if link.permit:
                link.permit = False
                self.budget.give_back()
            state = link.state
            if state is LATE:
                self.process.outage.recovered(link.conn.address, self.index)
            if state is GRABBING or state is LATE:  # an answer we asked for
                held = self.process.held.take(link)  # nothing more is coming: no reason to wait
                if held:
                    link.conn.send_raw(held)
                if self.sleepers.sleep_or_park(link.server, self):
                    link.conn.send_raw(_PRE_SLEEP)
                    link.state, link.since = SLEEPING, time.monotonic()
                else:
                    link.state, link.since = PARKED, time.monotonic()
            if self.outstanding is None:
                self._grab_next()
        elif cmd == gp.JOB_ASSIGN_UNIQ or cmd == gp.JOB_ASSIGN:
            if self.outstanding is link:
                self.outstanding = None
            link.permit = False  # used up by this job
            state = link.state
            if state is LATE:
                self.process.outage.recovered(link.conn.address, self.index)
            elif state in _RESTING:  # unasked for; serve it all the same
                self.sleepers.leave(link.server, self)
            link.state = BUSY
            self.sleepers.wake_one(link.server)  # while we work, another thread listens
            handle = pkt.text("job_handle")
            link.job = (link.conn.address, handle, pkt.text("unique") if "unique" in pkt.args else "")
            self.outcome = None
            try:
                reply = self._serve(link, pkt, handle)
            except (ServerError, Abandoned):
                raise
            except Exception as e:  # a worker bug or a job it can't handle: fail the job, once
                reply = self._serve_failed(link.job, e)
            record, self.outcome = self.outcome, None
            if record is not None:  # the outcome goes before the answer, on this connection
                reply = self.process.held.now_or_later(link, record, reply,
                                                       hold=record.get("background") is True and self.budget is None)
            self._grab_next(reply, after=link)
            answered = link.state is not DOWN  # else the answer did not get out: see _forget
            link.job = ()
            if self.budget is not None and answered:
                self.budget.job_done()  # after the answer is out: the last one must not be lost
        elif cmd == gp.JOB_CREATED:
            if link.acks:
                link.acks.popleft()  # an outcome job is in gearmand
        elif cmd == gp.ERROR:
            code = pkt.text("error_code")
            log.warning("server error", server=link.conn.address, code=cap_text(code, 100),
                        text=cap_text(pkt.text("error_text"), 500))
            if link.acks and "NOT_FOUND" not in code:  # our outcome job refused (queue full, ...)
                self.process.runner.keep_locally(refused(link.acks.popleft()), link.conn.address)
        # anything else needs no answer

    def _serve(self, link: Link, pkt: gp.Packet, handle: str) -> bytes:
        process = self.process
        task = pkt.text("task")
        unanswered = process.unanswered.seen
        if unanswered and unanswered.get(link.job, 0) >= process.unanswered.limit:
            self.counters.finished(task, 0.0, False)
            return self.runner.refuse(link.job, task)
        if self.stop_requested:
            self._new_job_after_stop()
        job = Job(link.conn, handle, task, link.job[2], pkt["data"], process.config, self.cancel)
        job.started = self.attempt_started = time.monotonic()  # before current: the watchdog reads both
        self.current = job
        try:
            reply = self.runner.run(self, job)
        finally:
            with self.answer_lock:  # from here on the watchdog leaves this job alone, or has taken it
                self.current = None
                abandoned = self.abandoned
            self.jobs_done += 1
        if abandoned:
            raise Abandoned(handle)
        self.outcome = job.outcome  # reported before the answer (geartask.worker.outcomes)
        return reply

    def _serve_failed(self, job_key: tuple, e: BaseException) -> bytes:
        _, handle, unique = job_key
        what = cap_text(f"{type(e).__name__}: {e}", 500)
        log.error("worker error while serving a job; failing it", handle=handle, unique=unique, error=what,
                  traceback=traceback.format_exc(), thread=self.index)
        return self.runner.fail_unrun(job_key, "?", {"error": f"worker error: {what}"})
