"""One job server as a JobSender sees it across calls: its connection and its health."""

from __future__ import annotations

import ssl
import time

from .. import gearman as p
from ..gearman.timing import RoundTrip
from ..address import format_address
from ..errors import ServerError
from .routing import server_hash

RECONNECT_DELAY = 0.25  # seconds before a server is tried again, doubled (with jitter), capped
RECONNECT_DELAY_MAX = 2.0
_OPTION = p.pack(p.OPTION_REQ, option_name=b"exceptions")  # else gearmand turns WORK_EXCEPTION into WORK_FAIL
_ECHO = p.pack(p.ECHO_REQ, data=b"geartask")


class ServerLink:
    """A job server's connection, opened without blocking and kept between calls while
    nothing is owed on it, and its health.

    ``healthy`` False: given up on (it refused connections, or stayed silent past
    sender.failover_after) until it answers again; no job is routed to it meanwhile.
    ``out`` holds bytes the socket has not taken yet (sends never block). The jobs routed to
    the server belong to the call in progress (batch.py), not to the link.
    """

    def __init__(self, host: str, port: int, keepalive: p.Keepalive | None = None, *,
                 tls: ssl.SSLContext | None = None, server_hostname: str | None = None,
                 max_packet: int | None = None):
        self.host, self.port = host, port
        self.address = format_address(host, port)
        self.hash_prefix = server_hash(self.address)
        self.keepalive = keepalive
        self.tls, self.server_hostname, self.max_packet = tls, server_hostname, max_packet
        self.conn: p.Connection | None = None
        self.connecting: p.Dial | None = None  # poll it for connecting.events
        self.connect_started = 0.0
        self.out = bytearray()
        self.option_owed = False  # the OPTION_REQ sent on connecting is unanswered
        self.option_sent = 0.0
        self.probe_sent: float | None = None  # an unanswered ECHO_REQ
        self.last_rx = 0.0  # when we last heard from it, or started owing it nothing
        self.healthy = True
        self.retry_at = 0.0
        self.backoff_policy = p.Backoff(RECONNECT_DELAY, RECONNECT_DELAY_MAX)
        self.hidden = 0
        self.delay = RECONNECT_DELAY
        self.reason: str | None = None
        # How long an answer may take before "server slow" (and how long a connect may take):
        # grows with the measured round trip and after each miss (batch.py: slow_after).
        self.rtt = RoundTrip()
        self.misses = 0  # deadlines missed in a row (reset by a measured answer)

    @property
    def live(self) -> bool:
        return self.conn is not None and self.conn.connected

    def start_connect(self, now: float) -> tuple[str, bool] | None:
        """Begin a non-blocking connect (a silent host must not stall the other servers).
        Returns (reason, refused) when it failed at once."""
        self.connect_started = now
        try:
            self.connecting = p.Dial(self.host, self.port, self.keepalive, self.tls, self.server_hostname)
        except p.ConnectError as e:
            return _reason(e, self.address), e.refused
        return None

    def connect_done(self) -> tuple[str, bool] | None:
        """poll saw the connect (or TLS handshake) move: adopt the socket when it is ready and
        ask for exceptions; None also while the handshake goes on; else (reason, refused).
        A TLS failure (certificates, CA, name) counts as refused: retrying cannot help."""
        dial = self.connecting
        assert dial is not None  # called only while a dial is in progress
        try:
            sock = dial.step()
        except p.TLSError as e:
            self.connecting = None
            return _reason(e, self.address), True
        except p.ConnectError as e:
            self.connecting = None
            return _reason(e, self.address), e.refused
        if sock is None:
            return None
        self.connecting = None
        self.conn = p.Connection(self.host, self.port, keepalive=self.keepalive, tls=self.tls,
                                 server_hostname=self.server_hostname,
                                 max_packet=self.max_packet).adopt(sock, tuned=True)
        self.out = bytearray(_OPTION)
        self.option_owed, self.probe_sent = True, None
        self.last_rx = self.option_sent = time.monotonic()
        self.measured(self.last_rx - self.connect_started)  # the connect's round trip(s)
        return None

    def flush(self) -> OSError | ServerError | None:
        """Send what the socket takes now; the error if the connection failed."""
        conn = self.conn
        assert conn is not None  # flushed only while connected
        try:
            while self.out:
                n = conn.send_some(self.out)
                if not n:
                    break  # the socket buffer is full: poll says when it drains
                del self.out[:n]
        except (OSError, p.TLSError) as e:  # TLSError: the server's refusal, read after the failed send
            return e
        return None

    def echo(self, now: float) -> None:
        """Queue an ECHO_REQ: its answer proves the server (and our jobs there) still exist."""
        self.out += _ECHO
        self.probe_sent = self.last_rx = now

    def backoff(self, reason: str, now: float) -> None:
        """A failure: try again after the current delay, then wait twice as long."""
        self.reason = reason
        self.retry_at = now + self.backoff_policy.next()
        self.delay = self.backoff_policy.base

    def slow_after(self, floor: float, ceiling: float) -> float:
        """Seconds an answer (or a connect) may take here before it is late: ``floor``
        (sender.submit_timeout) on a fast path, more on a slow one, at most ``ceiling``."""
        return max(floor, min(ceiling, self.rtt.deadline(self.misses, floor)))

    def measured(self, seconds: float) -> None:
        """An answer came ``seconds`` after its request."""
        self.rtt.sample(seconds)
        self.misses = 0

    def missed(self) -> None:
        """An answer (or a connect) was late: the next one is given twice as long."""
        self.misses += 1

    def answered(self) -> bool:
        """It answers: reset the backoff. True when it had been given up (now healthy again).
        ``hidden`` then holds the failed tries since the last answer (logs said the first)."""
        self.hidden = self.backoff_policy.reset()
        self.delay, self.reason = RECONNECT_DELAY, None
        was_down, self.healthy = not self.healthy, True
        return was_down

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        if self.connecting is not None:
            self.connecting.close()
        self.conn = self.connecting = None
        self.out = bytearray()
        self.option_owed, self.probe_sent = False, None


def _reason(e: ServerError, address: str) -> str:
    return str(e).removeprefix(address + ": ")
