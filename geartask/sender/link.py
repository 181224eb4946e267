"""One job server as a JobSender sees it across calls: its connection and its health."""

from __future__ import annotations

import errno
import os
import socket
import time

from .. import gearman as p
from .routing import server_hash

RECONNECT_DELAY = 0.25  # seconds before a server is tried again, doubled, capped
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

    def __init__(self, host: str, port: int, keepalive: p.Keepalive | None = None):
        self.host, self.port = host, port
        self.address = f"{host}:{port}"
        self.hash_prefix = server_hash(self.address)
        self.keepalive = keepalive
        self.conn: p.Connection | None = None
        self.connecting: socket.socket | None = None
        self.connect_started = 0.0
        self.out = bytearray()
        self.option_owed = False  # the OPTION_REQ sent on connecting is unanswered
        self.probe_sent: float | None = None  # an unanswered ECHO_REQ
        self.last_rx = 0.0  # when we last heard from it, or started owing it nothing
        self.healthy = True
        self.retry_at = 0.0
        self.delay = RECONNECT_DELAY
        self.reason: str | None = None

    @property
    def live(self) -> bool:
        return self.conn is not None and self.conn.connected

    def start_connect(self, now: float) -> tuple[str, bool] | None:
        """Begin a non-blocking connect (a silent host must not stall the other servers).
        Returns (reason, refused) when it failed at once."""
        self.connect_started = now
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
        except OSError as e:
            return f"cannot connect: {e.strerror or e}", False
        sock.setblocking(False)
        err = sock.connect_ex(addr)
        if err in (0, errno.EINPROGRESS):
            self.connecting = sock
            return None
        sock.close()
        return f"cannot connect: {os.strerror(err)}", err == errno.ECONNREFUSED

    def connect_done(self) -> tuple[str, bool] | None:
        """The connect finished: adopt the socket and ask for exceptions, or return
        (reason, refused)."""
        sock, self.connecting = self.connecting, None
        assert sock is not None  # called only for a connect in progress
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            sock.close()
            return f"cannot connect: {os.strerror(err)}", err == errno.ECONNREFUSED
        self.conn = p.Connection(self.host, self.port, keepalive=self.keepalive).adopt(sock)
        self.out = bytearray(_OPTION)
        self.option_owed, self.probe_sent = True, None
        self.last_rx = time.monotonic()
        return None

    def flush(self) -> OSError | None:
        """Send what the socket takes now; the error if the connection failed."""
        sock = self.conn.sock if self.conn is not None else None
        assert sock is not None  # flushed only while connected
        try:
            while self.out:
                n = sock.send(self.out, socket.MSG_DONTWAIT)
                del self.out[:n]
        except (BlockingIOError, InterruptedError):
            pass  # the socket buffer is full: poll says when it drains
        except OSError as e:
            return e
        return None

    def echo(self, now: float) -> None:
        """Queue an ECHO_REQ: its answer proves the server (and our jobs there) still exist."""
        self.out += _ECHO
        self.probe_sent = self.last_rx = now

    def backoff(self, reason: str, now: float) -> None:
        """A failure: try again after the current delay, then wait twice as long."""
        self.reason = reason
        self.retry_at = now + self.delay
        self.delay = min(self.delay * 2, RECONNECT_DELAY_MAX)

    def answered(self) -> bool:
        """It answers: reset the backoff. True when it had been given up (now healthy again)."""
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
