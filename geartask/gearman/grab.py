"""The grab cycle of one connection to one server, as a pure state machine.

A ``LinkMachine`` knows where one link (one connection to one job server, as a worker of
some functions) is in Gearman's worker protocol and what to send next; it is told what
happened (connected, a packet came, time passed, the job was answered, the link broke) with
the current time, and answers with the bytes to send or what the caller must do. It owns no
socket, thread or clock, so every transition is unit-tested with a fake clock
(tests/test_grab_machine.py). The worker's job threads and control thread
(geartask.worker.grab) and the outcome collector's attachments drive it; so can any code that
grabs N jobs of one function and answers them::

    link = LinkMachine()
    conn.send_raw(link.adopted(now, [function]) + link.grab(now, n))
    for each answer: link.on_packet(pkt.cmd, now) -> JOB (answer it) / REST (the last was NO_JOB)
    conn.send_raw(answers); link.answered(now); then grab again or cant_do_packets([function])

The cycle:

    DOWN --connected--> HELLO --ECHO_RES--> IDLE --grab--> GRABBING --JOB_ASSIGN_UNIQ--> BUSY
      ^                   |                   ^               |  \\--NO_JOB--> SLEEPING (PRE_SLEEP sent)
      |      no answer in hello_timeout       |               |                or PARKED (another link listens)
      +---- dropped (backoff) <---------------+----answered---+--no answer in grab_timeout--> LATE

A link in SLEEPING wakes on NOOP; SLEEPING and PARKED links grab again after ``poll_timeout``
(a NOOP can be lost, or never sent with several servers). A LATE link is kept open (its send
buffer may hold the last job's answer) and a job that comes on it later is still served.
"""

from __future__ import annotations

import enum

from .codec import CAN_DO, CANT_DO, ECHO_REQ, GRAB_JOB_UNIQ, JOB_ASSIGN, JOB_ASSIGN_UNIQ, NO_JOB, NOOP, PRE_SLEEP, \
    RESET_ABILITIES, SET_CLIENT_ID, ECHO_RES, ERROR, JOB_CREATED, pack
from .connection import RECONNECT_MAX, RECONNECT_MIN
from .timing import ANSWER_FLOOR, RoundTrip, next_backoff


class LinkState(enum.Enum):
    """Where one connection to one server is in the grab cycle."""

    DOWN = "down"  # not connected; reconnect at next_try
    HELLO = "hello"  # connected, abilities sent, awaiting the ECHO_RES that proves the server answers
    IDLE = "idle"  # may be sent a GRAB
    GRABBING = "grabbing"  # GRABs outstanding here (``pending`` of them)
    LATE = "late"  # a GRAB unanswered for grab_timeout; kept open, its answer still served
    BUSY = "busy"  # running the job(s) that came on it
    SLEEPING = "sleeping"  # PRE_SLEEP sent: woken by NOOP
    PARKED = "parked"  # idle without PRE_SLEEP: another link of the group listens


# Module-level names: the per-job path compares states by identity, and a global is the
# fastest lookup (an Enum class attribute costs several times more).
DOWN, HELLO, IDLE, GRABBING, LATE, BUSY, SLEEPING, PARKED = LinkState
WANTS_GRAB = (IDLE, SLEEPING, PARKED)  # states in which a link may be sent a GRAB
RESTING = (SLEEPING, PARKED)


class Act(enum.Enum):
    """What ``tick`` and ``on_packet`` ask of the caller."""

    NOTHING = "nothing"
    GRAB = "grab"  # the link wants a GRAB (woken by NOOP, or rested poll_timeout)
    READY = "ready"  # the hello was answered: the server is reachable, the link may grab
    REST = "rest"  # the last outstanding grab found nothing: call rest() (sleep or park)
    JOB = "job"  # a job was assigned (JOB_ASSIGN[_UNIQ]): serve it, then answered() or grab()
    LATE = "late"  # a GRAB went unanswered for grab_timeout: grab elsewhere, keep the link
    HELLO_TIMEOUT = "hello_timeout"  # connected, but no answer: drop the connection (dropped())
    ERROR = "error"  # the server sent ERROR: log it (it may refuse a job we submitted)
    ACK = "ack"  # JOB_CREATED: a job we submitted on this link is in the server


NOTHING, GRAB, READY, REST, JOB, LATE_ACT, HELLO_TIMEOUT, ERROR_ACT, ACK = Act

GRAB_PACKET = pack(GRAB_JOB_UNIQ)
PRE_SLEEP_PACKET = pack(PRE_SLEEP)
HELLO_TOKEN = b"hello"


def hello_packets(client_id: str, abilities: list[str] | tuple[str, ...], token: bytes = HELLO_TOKEN) -> bytes:
    """What a new connection sends: its client id, its abilities, and an ECHO whose answer
    proves the server answers (one that accepts connections but never replies must not hold
    a grab)."""
    packets = [pack(SET_CLIENT_ID, client_id=client_id)]
    packets += [pack(CAN_DO, task=a) for a in abilities]
    packets.append(pack(ECHO_REQ, data=token))
    return b"".join(packets)


def abilities_packets(abilities: list[str] | tuple[str, ...]) -> bytes:
    """Replace a live connection's abilities: RESET_ABILITIES, then one CAN_DO each."""
    return pack(RESET_ABILITIES) + b"".join(pack(CAN_DO, task=a) for a in abilities)


def cant_do_packets(abilities: list[str] | tuple[str, ...]) -> bytes:
    """Withdraw abilities from a live connection (one CANT_DO each)."""
    return b"".join(pack(CANT_DO, task=a) for a in abilities)


class LinkMachine:
    """One link's state in the grab cycle, and the decisions that depend only on it and time.

    ``rtt`` is the server's RoundTrip (share one per server among a process's links);
    ``poll_timeout`` is how long a resting link waits before it grabs again. Counters:
    ``reconnects`` (drops since the server last answered a hello), ``hello_misses`` (hellos
    unanswered in a row), ``no_jobs`` (NO_JOB answers).
    """

    __slots__ = ("state", "since", "next_try", "backoff", "pending", "rtt", "poll_timeout",
                 "hello_misses", "reconnects", "no_jobs", "floor", "server", "waited")

    def __init__(self, rtt: RoundTrip | None = None, poll_timeout: float = 60.0, server: int = 0,
                 floor: float = ANSWER_FLOOR):
        self.state = DOWN
        self.since = 0.0  # when it entered its state (when the outstanding GRABs were sent, in GRABBING)
        self.next_try = 0.0  # when to reconnect (state DOWN)
        self.backoff = RECONNECT_MIN
        self.pending = 0  # GRABs sent and not yet answered
        self.rtt = rtt if rtt is not None else RoundTrip()
        self.poll_timeout = poll_timeout
        self.floor = floor
        self.server = server  # the caller's index of the server
        self.hello_misses = 0
        self.reconnects = 0
        self.no_jobs = 0
        self.waited = 0.0  # the deadline the last HELLO_TIMEOUT or LATE missed (for its message)

    def __repr__(self) -> str:
        return f"<LinkMachine {self.state.value} pending={self.pending}>"

    # -- deadlines ----------------------------------------------------------------------
    @property
    def hello_timeout(self) -> float:
        """Seconds a new connection may take to answer its hello: adapted to the round trip,
        doubled for each hello missed in a row (geartask.gearman.timing)."""
        return self.rtt.deadline(self.hello_misses, self.floor)

    @property
    def grab_timeout(self) -> float:
        """Seconds a GRAB may go unanswered before the link is LATE."""
        return self.rtt.deadline(0, self.floor)

    def due(self, now: float) -> bool:
        """A DOWN link whose reconnect time has come."""
        return self.state is DOWN and now >= self.next_try

    def deadline(self, now: float, horizon: float) -> float:
        """Seconds (at most ``horizon``, at least 0) until ``tick`` may have something to do."""
        state = self.state
        if state is DOWN:
            t = self.next_try - now
        elif state is SLEEPING or state is PARKED:
            t = self.since + self.poll_timeout - now
        elif state is HELLO:
            t = self.since + self.hello_timeout - now
        elif state is GRABBING:
            t = self.since + self.grab_timeout - now
        else:
            return horizon if horizon > 0 else 0.0
        t = t if t < horizon else horizon
        return t if t > 0 else 0.0

    # -- events -------------------------------------------------------------------------
    def connected(self, now: float, client_id: str = "", abilities: list[str] | tuple[str, ...] = ()) -> bytes:
        """The socket is connected: the hello to send (client id, CAN_DOs, ECHO)."""
        self.state, self.since, self.pending = HELLO, now, 0
        return hello_packets(client_id, abilities) if client_id else \
            b"".join(pack(CAN_DO, task=a) for a in abilities) + pack(ECHO_REQ, data=HELLO_TOKEN)

    def adopted(self, now: float, abilities: list[str] | tuple[str, ...] = ()) -> bytes:
        """A connection opened and proven elsewhere (an admin connection that drains a
        function) becomes a link: IDLE at once; the CAN_DOs to send are returned."""
        self.state, self.since, self.pending = IDLE, now, 0
        return b"".join(pack(CAN_DO, task=a) for a in abilities)

    def hello_answered(self, now: float) -> bool:
        """ECHO_RES: True when it answered our hello (the link is IDLE and may grab)."""
        if self.state is not HELLO:
            return False
        self.rtt.sample(now - self.since)
        self.state, self.since, self.backoff = IDLE, now, RECONNECT_MIN
        self.hello_misses = 0
        return True

    def dropped(self, now: float) -> None:
        """The connection is gone (closed, broken, or given up on): DOWN, retry after backoff."""
        self.state, self.since, self.pending = DOWN, now, 0
        self.next_try = now + self.backoff
        self.backoff = next_backoff(self.backoff, RECONNECT_MIN, RECONNECT_MAX)  # reset only when answered
        self.reconnects += 1

    def grab(self, now: float, n: int = 1) -> bytes:
        """Send ``n`` GRAB_JOB_UNIQ (the bytes returned); the link is GRABBING."""
        if self.state is not GRABBING:
            self.since = now
        self.state = GRABBING
        self.pending += n
        return GRAB_PACKET if n == 1 else GRAB_PACKET * n

    def assigned(self, now: float) -> LinkState:
        """JOB_ASSIGN[_UNIQ]: the link is BUSY; returns the state it was in (LATE: the server
        answered after all; SLEEPING/PARKED: a job it did not ask for, served all the same)."""
        was = self.state
        if self.pending:
            if was is GRABBING:
                self.rtt.sample(now - self.since)
            self.pending -= 1
        self.state, self.since = BUSY, now
        return was

    def no_job(self, now: float) -> LinkState | None:
        """NO_JOB: the state it was in when this answered the last outstanding GRAB (call
        ``rest`` if that was GRABBING or LATE), else None (more answers are coming, or it
        answered nothing we asked)."""
        self.no_jobs += 1
        if not self.pending:
            return None
        was = self.state
        if was is GRABBING:
            self.rtt.sample(now - self.since)
        self.pending -= 1
        return None if self.pending else was

    def rest(self, now: float, sleep: bool) -> bytes:
        """Nothing to grab: SLEEPING (send the PRE_SLEEP returned; a NOOP wakes it) or, when
        another link listens for this server, PARKED (nothing sent)."""
        self.since = now
        if sleep:
            self.state = SLEEPING
            return PRE_SLEEP_PACKET
        self.state = PARKED
        return b""

    def noop(self, now: float) -> bool:
        """NOOP: True when it woke a sleeping link (now IDLE: it wants a GRAB)."""
        if self.state is SLEEPING:
            self.state, self.since = IDLE, now
            return True
        return False

    def unpark(self, now: float) -> bool:
        """Another link stopped listening: a PARKED link becomes IDLE (True) and wants a GRAB."""
        if self.state is PARKED:
            self.state, self.since = IDLE, now
            return True
        return False

    def answered(self, now: float) -> None:
        """The job(s) it was busy with are answered (or it is otherwise ready): IDLE."""
        self.state, self.since = IDLE, now

    def late(self, now: float) -> None:
        """A GRAB went unanswered for grab_timeout: LATE (kept open, its answer still served)."""
        self.state, self.since = LATE, now

    def on_packet(self, cmd: int, now: float) -> Act:
        """Any packet from the server: what it means for the caller (the transitions above)."""
        if cmd == JOB_ASSIGN_UNIQ or cmd == JOB_ASSIGN:
            self.assigned(now)
            return JOB
        if cmd == NO_JOB:
            was = self.no_job(now)
            return REST if was is GRABBING or was is LATE else NOTHING
        if cmd == NOOP:
            return GRAB if self.noop(now) else NOTHING
        if cmd == ECHO_RES:
            return READY if self.hello_answered(now) else NOTHING
        if cmd == ERROR:
            return ERROR_ACT
        if cmd == JOB_CREATED:
            return ACK
        return NOTHING  # anything else needs no answer

    def tick(self, now: float) -> Act:
        """Time passed: HELLO_TIMEOUT (the hello missed its deadline; counted, so the next
        one waits longer), LATE (state now LATE), GRAB (rested poll_timeout), or NOTHING."""
        state = self.state
        if state is SLEEPING or state is PARKED:
            if now - self.since >= self.poll_timeout:
                return GRAB
        elif state is HELLO:
            waited = self.hello_timeout
            if now - self.since >= waited:
                self.waited = waited
                self.hello_misses += 1
                return HELLO_TIMEOUT
        elif state is GRABBING:
            waited = self.grab_timeout
            if now - self.since >= waited:
                self.waited = waited
                self.late(now)
                return LATE_ACT
        return NOTHING
