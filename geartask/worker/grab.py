"""The grab loop: a worker thread's connections to every server, and the cycle that takes jobs."""

from __future__ import annotations

import collections
import os
import select
import socket
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from .. import gearman as gp
from ..control import WorkerIdentity
from ..errors import ServerError
from ..gearman.grab import (BUSY, DOWN, GRABBING, HELLO, IDLE, LATE, PARKED, RESTING, SLEEPING,  # noqa: F401
                            GRAB, GRAB_PACKET, HELLO_TIMEOUT, LATE_ACT, WANTS_GRAB, LinkMachine, LinkState)  # noqa: F401
from ..gearman.timing import ANSWER_FLOOR, RoundTrip
from ..logs import get_logger
from ..targets import base_task, expand

from .dead_letters import cap_text
from .job import Abandoned, Job
from .outcomes import refused
from .running import RunningJob
from .stats import TaskCounters

if TYPE_CHECKING:
    from ..config import Config
    from .budget import JobBudget, Unlimited
    from .outcomes import HeldAnswers
    from .runner import JobRunner, UnansweredJobs

log = get_logger("geartask.worker")

ANSWER_TIMEOUT = ANSWER_FLOOR  # seconds: the least a hello or a GRAB is given (adapted: gearman.timing)
REPEATS_FATAL = 5  # the same thread error this many times in a row ends the process (exit 1)

_WANTS_GRAB = WANTS_GRAB
GRAB_ACT = GRAB
_RESTING = RESTING


class Host(Protocol):
    """What a GrabLoop needs of its process (geartask.worker.process.WorkerProcess)."""

    config: Config
    runner: "JobRunner"
    budget: "JobBudget | Unlimited"  # worker.max_jobs' permits
    identity: WorkerIdentity
    keepalive: gp.Keepalive
    outage: "Outage"
    unanswered: "UnansweredJobs"
    held: "HeldAnswers"
    cancel_jobs: threading.Event  # set when every running job is cancelled (shutdown past grace)

    def saw_ip(self, ip: str, server: str) -> None: ...

    def fatal(self, reason: str) -> None: ...


class Link(LinkMachine):
    """One thread's connection to one server: the grab cycle's state (LinkMachine) and what
    the thread keeps with it."""

    __slots__ = ("conn", "fd", "job", "permit", "acks", "woken")

    def __init__(self, conn: gp.Connection, server: int = 0, rtt: RoundTrip | None = None,
                 poll_timeout: float = 60.0):
        super().__init__(rtt, poll_timeout, server)
        self.conn = conn
        self.fd = -1  # the socket's descriptor while registered with the thread's poller
        self.job: tuple = ()  # (server, handle, unique) of the job it is busy with
        self.permit = False  # its outstanding GRAB holds one of worker.max_jobs' permits
        self.acks: collections.deque = collections.deque()  # outcome jobs awaiting JOB_CREATED
        self.woken = False  # its outstanding GRAB followed a NOOP (it had been sleeping)


@dataclass
class Outage:
    """Shared by a process's threads, so an outage is logged once, not once per thread and try;
    the line that ends it counts the failed tries it hid."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    down: dict[str, set] = field(default_factory=dict)  # server -> threads that cannot reach it
    tries: dict[str, int] = field(default_factory=dict)  # server -> failures during its outage
    since: dict[str, float] = field(default_factory=dict)  # server -> when its outage began
    refused: set = field(default_factory=set)  # servers whose outage's TLS refusal was said

    def failed(self, server: str, thread: int, reason: str,
               event: str = "server unreachable; retrying with backoff", refusal: bool = False) -> None:
        with self.lock:
            threads = self.down.setdefault(server, set())
            new = not threads
            threads.add(thread)
            self.tries[server] = self.tries.get(server, 0) + 1
            if new:
                self.since[server] = time.monotonic()
            say_refusal = refusal and server not in self.refused  # once per outage, at error level
            if say_refusal:
                self.refused.add(server)
        if say_refusal:
            log.error(gp.REFUSED_EVENT, server=server, reason=reason.removeprefix(server + ": "))
        elif new:
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
                self.refused.discard(server)
                tries = self.tries.pop(server, 0)
                since = self.since.pop(server, time.monotonic())
        if back:
            log.info("server reachable again", server=server, failures=tries,
                     down_for=round(time.monotonic() - since, 3))


class RoundTrips:
    """One RoundTrip per server, shared by a process's links (geartask.gearman.timing)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_server: dict[str, RoundTrip] = {}

    def of(self, server: str) -> RoundTrip:
        with self.lock:
            rtt = self.by_server.get(server)
            if rtt is None:
                rtt = self.by_server[server] = RoundTrip()
            return rtt


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

    def park_if_listened(self, server: int, thread: "GrabLoop") -> bool:
        """True: another thread sleeps on ``server``, and ``thread`` is now parked."""
        with self.lock:
            sleeper = self.sleeper.get(server)
            if sleeper is None or sleeper is thread:
                return False
            self.parked.setdefault(server, []).append(thread)
            return True

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

    Each connection is a Link, whose grab cycle is the pure state machine of
    geartask.gearman.grab; this thread does the I/O and coordinates its links. The cycle is
    the protocol's intended one, which is also the fast one:

    * after a job it sends the result *and* the next GRAB_JOB_UNIQ in one write, so a busy
      thread costs one round trip per job;
    * it sends PRE_SLEEP only when a server answers NO_JOB, and wakes on NOOP (one sleeper
      per server and group, see Sleepers);
    * at most one GRAB is outstanding per thread, so a thread never holds a job it is not
      about to run while another worker idles; a GRAB unanswered for its deadline is
      *late*: the thread grabs elsewhere meanwhile, but keeps the connection (a result may
      still be in its send buffer) and serves a job that comes on it later;
    * a connection that has slept ``worker.poll_timeout`` seconds is asked again (GRAB),
      which cures python-gearman's starvation bug (a NOOP lost or never sent with several
      servers).

    A connection is closed only when the server closes it, the kernel declares it dead
    (``worker.keepalive``) or its hello goes unanswered (a deadline adapted to the server's
    round trip, longer after each miss); a server that is down is retried with backoff,
    logged once per outage. With ``worker.max_jobs`` each GRAB first takes a permit from the
    process's JobBudget, so no thread ever receives a job beyond the limit. The job it runs
    is ``running`` (a RunningJob: what the watchdog and the control handlers act on).
    """

    def __init__(self, process: Host, index: int, abilities: list[str],
                 stop: threading.Event, wake_fd: int, name: str, sleepers: Sleepers | None = None,
                 round_trips: RoundTrips | None = None):
        super().__init__(name=name, daemon=True)
        self.sleepers = sleepers or Sleepers()
        self.unparked: set[int] = set()  # servers another thread asked us to grab from (under sleepers.lock)
        self._nudge_r, self._nudge_w = os.pipe()
        self.process = process
        self.runner = process.runner
        self.budget = process.budget  # worker.max_jobs' permits (budget.UNLIMITED without a limit)
        self.index = index
        self.identity = process.identity.for_thread(index)
        self.abilities = abilities
        host, labels = getattr(process, "targets", ("", ()))
        self.registered = expand(abilities, host, labels)  # each task, and its @host:/@label: names
        self.stop = stop
        self.wake_fd = wake_fd
        cfg = process.config
        self.poll_timeout = cfg.worker.poll_timeout
        round_trips = round_trips or RoundTrips()
        # A short connect timeout: while a thread waits on an unreachable server it serves no other.
        self.links = []
        for i, (h, p) in enumerate(cfg.server_addresses):
            conn = gp.Connection(h, p, connect_timeout=gp.CONNECT_TIMEOUT, keepalive=process.keepalive,
                                 max_packet=cfg.gearman.max_packet)
            self.links.append(Link(conn, i, round_trips.of(conn.address), self.poll_timeout))
        # poll, not select: select fails for descriptor numbers past 1024.
        self.poller = select.poll()
        self.by_fd: dict[int, Link] = {}
        for fd in (wake_fd, self._nudge_r):
            self.poller.register(fd, select.POLLIN)
        self.wants: collections.deque[Link] = collections.deque()  # links to send a GRAB on
        self.outstanding: Link | None = None  # the link with this thread's punctual GRAB
        self.counters = TaskCounters(abilities)  # written by this thread only
        self.running = RunningJob(self.counters, process.cancel_jobs)  # the job this thread runs
        self.released = threading.Event()  # the watchdog is done with an abandoned thread's sockets
        self.jobs_done = 0
        self._last_error, self._last_error_at, self._repeats = "", 0.0, 0

    @property
    def current(self) -> Job | None:
        """The job running now (for ping and the shutdown's log)."""
        return self.running.job

    @property
    def no_jobs(self) -> int:
        """NO_JOB answers: grabs that found nothing (the herd shows here)."""
        return sum(link.no_jobs for link in self.links)

    def abilities_at(self, identity: WorkerIdentity) -> list[str]:
        """The functions to register on a connection where we are ``identity``."""
        return self.registered

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
            # The hello's clock starts now, not at the cycle's start: the connect itself (and
            # other links' connects before it) must not count in the server's round trip.
            conn.send_raw(link.connected(time.monotonic(), identity.client_id, self.abilities_at(identity)))
        except ServerError as e:
            self._drop(link, e)

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
        now = time.monotonic()
        for i in servers:
            link = self.links[i]
            if link.state is PARKED and link not in self.wants:
                link.unpark(now)
                # Listen in the job's thread's place with PRE_SLEEP, not GRAB: gearmand answers
                # it with a NOOP at once if a job waits (then we grab), and otherwise wakes us
                # with the next job. A GRAB here, while the other thread runs its job, mostly
                # came back NO_JOB: a round trip and a wake-up of this thread taken from it.
                # If another thread listens already, park again: it is told of any job.
                sleep = self.sleepers.sleep_or_park(link.server, self)
                pre_sleep = link.rest(now, sleep)
                if pre_sleep:
                    try:
                        link.conn.send_raw(pre_sleep)
                    except ServerError as e:
                        self._drop(link, e)

    def _leave_rest(self, link: Link) -> None:
        """``link`` stops sleeping or being parked: it no longer counts for its Sleepers."""
        if link.state is SLEEPING or link.state is PARKED:
            self.sleepers.leave(link.server, self)

    def _forget(self, link: Link) -> None:
        """Unregister and close ``link``'s socket; a job it was busy with went unanswered
        (gearmand requeues it, so its max_jobs permit goes back, unless the watchdog answered
        for it), and so does a permit its GRAB held."""
        if link.state is BUSY and link.job:
            self.process.unanswered.count(link.job)
            if not self.running.abandoned:
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

    def _drop(self, link: Link, reason: str | BaseException) -> None:
        was_listening = link.state is SLEEPING
        self._forget(link)
        self._leave_rest(link)
        link.dropped(time.monotonic())
        if was_listening:
            self.sleepers.wake_one(link.server)  # someone else listens when the server is back
        if self.outstanding is link:
            self.outstanding = None
        if link in self.wants:
            self.wants.remove(link)
        self.process.outage.failed(link.conn.address, self.index, str(reason),
                                   refusal=isinstance(reason, gp.TLSError))

    def close(self) -> None:
        now = time.monotonic()
        for link in self.links:
            self._forget(link)
            self._leave_rest(link)
            link.state, link.since, link.pending = DOWN, now, 0

    def shut_connections(self, keep: gp.Connection | None = None) -> None:
        """From another thread: end this thread's connections (all but ``keep``) without
        closing their sockets (it may be using them), so gearmand sees them gone."""
        for link in self.links:
            if link.conn is not keep:
                shut(link.conn)

    def retire(self, keep: gp.Connection | None) -> None:
        """From another thread (the watchdog, a stop): this thread's job was abandoned and it
        is being replaced. End its other connections (a late GRAB must not catch a job) and
        let another thread listen to each server in its place."""
        self.shut_connections(keep=keep)
        for link in self.links:
            self.sleepers.leave(link.server, self)
            self.sleepers.wake_one(link.server)

    # -- stop (from the control thread) ----------------------------------------------------
    def request_stop(self, job: Job) -> bool:
        """Cancel ``job`` if it is still this thread's (RunningJob.request_stop)."""
        return self.running.request_stop(job)

    # -- the loop --------------------------------------------------------------------
    def run(self) -> None:
        running = self.running
        try:
            while not self.stop.is_set() and not running.abandoned:
                try:
                    self._cycle()
                except Exception as e:  # a bug must not end the thread: log it, start clean
                    self._thread_error(e)
        finally:
            if running.abandoned:  # the watchdog still uses the stuck job's connection
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
        for down in self.links:
            if down.state is DOWN and now >= down.next_try:
                self._connect(down, now)
        if self.outstanding is None:
            self._grab_next()

        timeout = self._next_deadline(now)
        events = self.poller.poll(int(timeout * 1000 + 0.999))
        if self.stop.is_set():
            return
        running = self.running
        for fd, _ in events:
            link = self.by_fd.get(fd)
            if link is None:
                if fd == self._nudge_r:
                    self._unpark()
                continue
            try:
                packets = link.conn.read_packets()
            except ServerError as e:
                self._drop(link, e)
                continue
            for pkt in packets:
                try:
                    self._on_packet(link, pkt)
                except (ServerError, Abandoned) as e:
                    if running.abandoned:
                        return  # the watchdog answered and owns the connection now
                    self._drop(link, e)  # shutdown past grace: gearmand requeues the job
                    break
                if self.stop.is_set() or running.abandoned:
                    return
        now = time.monotonic()
        for link in self.links:
            act = link.tick(now)
            if act is GRAB_ACT:
                # Starvation cure: a link asleep for poll_timeout is asked again, NOOP or not.
                if link not in self.wants:
                    self.wants.append(link)
            elif act is HELLO_TIMEOUT:
                self._drop(link, f"connected, but no answer within {link.waited:g}s")
            elif act is LATE_ACT:
                self._late(link)

    def _late(self, link: Link) -> None:
        """No answer to GRAB in time: grab elsewhere, but keep the connection. Closing it would
        drop what may still be in its send buffer (the last job's result) and gain nothing:
        gearmand may still assign us a job on it, and the kernel ends it if the server is gone."""
        if self.outstanding is link:
            self.outstanding = None
        self.process.outage.failed(link.conn.address, self.index,
                                   f"no answer to GRAB_JOB within {link.waited:g}s",
                                   event="server slow to answer; connection kept, other servers served meanwhile")

    def _next_deadline(self, now: float) -> float:
        t = self.poll_timeout
        for link in self.links:
            t = link.deadline(now, t)
        return t

    def _permit(self) -> bool:
        """worker.max_jobs: may this thread send a GRAB now? (Always, without a limit.)"""
        return self.budget.take(self)

    def _grab_next(self, prefix: bytes = b"", after: Link | None = None) -> None:
        """Send GRAB_JOB_UNIQ on the next link that wants one (with ``prefix`` packets on ``after``)."""
        link: Link | None
        if (after is not None and self.outstanding is None and not self.wants and not self.stop.is_set()
                and self.budget.take(self)):
            link = after  # the fast path: result and next grab in one write
        else:
            if after is not None:
                if prefix:
                    after.conn.send_raw(prefix)
                    prefix = b""
                self._leave_rest(after)
                after.answered(time.monotonic())
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
        link.permit = True  # given back if no job comes of it (a no-op without worker.max_jobs)
        try:
            link.conn.send_raw(prefix + GRAB_PACKET if prefix else GRAB_PACKET)
        except ServerError as e:
            self._drop(link, e)  # a job it was busy with is counted unanswered: still BUSY here
            return
        self._leave_rest(link)
        link.grab(time.monotonic())
        self.outstanding = link

    def _park_after(self, link: Link, reply: bytes) -> bool:
        """A job that woke this link is answered: when another thread listens to this server,
        send the answer without a GRAB and park (True). Jobs come one at a time here, so that
        GRAB would mostly come back NO_JOB; one that waits is announced to the listener, whose
        JOB_ASSIGN wakes a parked thread (Sleepers). Else False: the caller grabs as usual."""
        if self.outstanding is not None or self.wants or self.stop.is_set():
            return False
        if not self.sleepers.park_if_listened(link.server, self):
            return False
        data = reply + self.process.held.take(link)  # nothing more is coming here: no reason to hold
        try:
            if data:
                link.conn.send_raw(data)
        except ServerError as e:
            self.sleepers.leave(link.server, self)
            self._drop(link, e)  # still BUSY: the job is counted unanswered
            return True
        now = time.monotonic()
        link.answered(now)
        link.rest(now, False)  # PARKED: nothing sent; it grabs again when unparked or after poll_timeout
        return True

    def _on_packet(self, link: Link, pkt: gp.Packet) -> None:
        cmd = pkt.cmd
        if cmd == gp.JOB_ASSIGN_UNIQ or cmd == gp.JOB_ASSIGN:
            if self.outstanding is link:
                self.outstanding = None
            link.permit = False  # used up by this job
            state: LinkState | None = link.assigned(time.monotonic())
            if state is LATE:
                self.process.outage.recovered(link.conn.address, self.index)
            elif state is SLEEPING or state is PARKED:  # unasked for; serve it all the same
                self.sleepers.leave(link.server, self)
            self.sleepers.wake_one(link.server)  # while we work, another thread listens
            handle = pkt.text("job_handle")
            link.job = (link.conn.address, handle, pkt.text("unique") if "unique" in pkt.args else "")
            self.running.outcome = None
            try:
                reply = self._serve(link, pkt, handle)
            except (ServerError, Abandoned):
                raise
            except Exception as e:  # a worker bug or a job it can't handle: fail the job, once
                reply = self._serve_failed(link.job, e)
            record, self.running.outcome = self.running.outcome, None
            if record is not None:  # the outcome goes before the answer, on this connection
                reply = self.process.held.now_or_later(link, record, reply,
                                                       hold=record.get("background") is True and not self.budget.limited)
            woken, link.woken = link.woken, False
            if not (woken and self._park_after(link, reply)):
                self._grab_next(reply, after=link)
            answered = link.state is not DOWN  # else the answer did not get out: see _forget
            link.job = ()
            if answered:
                self.budget.job_done()  # after the answer is out: the last one must not be lost
        elif cmd == gp.NO_JOB:
            link.woken = False
            if self.outstanding is link:
                self.outstanding = None
            if link.permit:
                link.permit = False
                self.budget.give_back()
            now = time.monotonic()
            state = link.no_job(now)
            if state is LATE:
                self.process.outage.recovered(link.conn.address, self.index)
            if state is GRABBING or state is LATE:  # an answer we asked for
                held = self.process.held.take(link)  # nothing more is coming: no reason to wait
                if held:
                    link.conn.send_raw(held)
                pre_sleep = link.rest(now, self.sleepers.sleep_or_park(link.server, self))
                if pre_sleep:
                    link.conn.send_raw(pre_sleep)
            if self.outstanding is None:
                self._grab_next()
        elif cmd == gp.NOOP:
            if link.noop(time.monotonic()):
                link.woken = True
                self.sleepers.leave(link.server, self)
                if link not in self.wants:
                    self.wants.append(link)
        elif cmd == gp.ECHO_RES:
            if link.hello_answered(time.monotonic()):
                self.process.outage.recovered(link.conn.address, self.index)
                self.wants.append(link)
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
        if "oversize" in pkt.args:  # the connection read past it (gearman.max_packet): fail it unrun
            size, cap = int(pkt.args["oversize"]), link.conn.max_packet
            return self.runner.fail_unrun(link.job, "?", {
                "error": f"job of {size} bytes exceeds gearman.max_packet ({cap} bytes) on this worker"})
        function = pkt.text("task")
        task = base_task(function)  # 'shell@label:db' runs shell; the signature covers the full name
        if task != function and function not in self.registered:  # a server's mistake: not ours to run
            return self.runner.fail_unrun(link.job, task, {
                "error": f"function {cap_text(function, 200)!r} is not registered by this worker"})
        if process.unanswered.refuses(link.job):
            self.counters.finished(task, 0.0, False)
            return self.runner.refuse(link.job, task)
        running = self.running
        job = Job(link.conn, handle, task, link.job[2], pkt["data"], process.config, running.cancel)
        job.function = function
        running.begin(job, time.monotonic())
        try:
            reply = self.runner.run(running, job)
        finally:
            abandoned = running.finish()
            self.jobs_done += 1
        if abandoned:
            raise Abandoned(handle)
        running.outcome = job.outcome  # reported before the answer (geartask.worker.outcomes)
        return reply

    def _serve_failed(self, job_key: tuple, e: BaseException) -> bytes:
        _, handle, unique = job_key
        what = cap_text(f"{type(e).__name__}: {e}", 500)
        log.error("worker error while serving a job; failing it", handle=handle, unique=unique, error=what,
                  traceback=traceback.format_exc(), thread=self.index)
        return self.runner.fail_unrun(job_key, "?", {"error": f"worker error: {what}"})
