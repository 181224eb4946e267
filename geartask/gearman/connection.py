"""One blocking connection to one gearmand, its socket options and the admin text protocol."""

from __future__ import annotations

import errno
import os
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

import structlog
from gearman.errors import ProtocolError

from ..address import format_address
from ..errors import ServerError
from .backoff import RECONNECT_MAX, RECONNECT_MIN  # noqa: F401  (one set of constants, re-exported)
from .codec import (ECHO_REQ, ECHO_RES, ERROR, HEADER, HEADER_SIZE, JOB_ASSIGN, JOB_ASSIGN_UNIQ, WORK_COMPLETE,
                    WORK_DATA, WORK_EXCEPTION, WORK_STATUS, WORK_WARNING, Packet, command_name, error_text, pack,
                    parse_response, response_bytes)
from .dial import TLSError, dial, tls_error, tls_reason

CONNECT_TIMEOUT = 2.0  # seconds; refused connections fail at once, only blackholed hosts wait
# The cap on one packet from a server (gearman.max_packet): a sender's biggest job (64 MiB of
# data) plus room for its handle, function name, unique key and envelope.
MAX_PACKET = 64 * 1024 * 1024 + 64 * 1024
MAX_HANDLE = 64  # bytes; gearmand's handles are "H:host:number"
# Packets that begin with a job handle: one over the cap is skipped and handed out with the
# handle and an ``oversize`` argument (its body's length), so only that job fails.
HANDLE_FIRST = frozenset((WORK_COMPLETE, WORK_DATA, WORK_WARNING, WORK_EXCEPTION, WORK_STATUS,
                          JOB_ASSIGN, JOB_ASSIGN_UNIQ))
_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)


class Connection:
    """One blocking TCP connection to one gearmand: send packets, receive packets with deadlines.

    Not thread-safe: each worker thread and each sender owns its own connections.
    Any socket failure closes the connection and raises ServerError naming the server.

    ``tls``: an ssl.SSLContext; the connection is then TLS (server_hostname, default ``host``,
    is the name its certificate must carry). TLS sockets are kept non-blocking and every read
    drains OpenSSL's buffer, so loops that poll the descriptor never miss decrypted bytes.

    ``max_packet``: no packet from the server is buffered past this many body bytes. One that
    starts with a job handle (HANDLE_FIRST) is skipped as it streams in and returned as a
    Packet of its command with only ``job_handle`` and ``oversize`` (its length, as bytes);
    any other closes the connection with a ServerError.
    """

    def __init__(self, host: str, port: int, connect_timeout: float = 5.0,
                 keepalive: "Keepalive | None" = None, *, tls: ssl.SSLContext | None = None,
                 server_hostname: str | None = None, max_packet: int | None = None):
        self.host, self.port = host, port
        self.address = format_address(host, port)
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive or Keepalive()
        self.tls, self.server_hostname = tls, server_hostname
        self.max_packet = MAX_PACKET if max_packet is None else max_packet
        self._max_size = HEADER_SIZE + self.max_packet
        self.sock: socket.socket | None = None
        self.local_address: str | None = None  # our end's IP, as this server sees it
        self._buf = bytearray()
        self._tls = False  # the socket is an SSLSocket
        self._skip_left = 0  # body bytes of an oversize packet still to be read past
        self.send_lock = threading.Lock()  # one packet's bytes are never interleaved with another's
        # OpenSSL's SSL object may not be read and written from two threads at once (a worker's
        # watchdog sends on a connection its thread reads): every TLS read and write holds this.
        self._ssl_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Connection {self.address} {'open' if self.sock else 'closed'}>"

    @property
    def connected(self) -> bool:
        return self.sock is not None

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock else -1

    def connect(self) -> "Connection":
        if self.sock is not None:
            return self
        sock = dial(self.host, self.port, self.connect_timeout, self.keepalive, self.tls, self.server_hostname)
        return self.adopt(sock, tuned=True)

    def adopt(self, sock: socket.socket, tuned: bool = False) -> "Connection":
        """Use a socket connected elsewhere (the sender connects without blocking: dial.Dial)."""
        if not tuned:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.keepalive.apply(sock)
        self._tls = isinstance(sock, ssl.SSLSocket)
        if self._tls:
            sock.setblocking(False)
        else:
            sock.settimeout(None)
        try:
            self.local_address = sock.getsockname()[0]
        except OSError:
            self.local_address = None
        self.sock, self._buf, self._skip_left = sock, bytearray(), 0
        return self

    def close(self) -> None:
        sock, self.sock = self.sock, None
        self._buf = bytearray()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _fail(self, what: str) -> ServerError:
        self.close()
        return ServerError(what, self.address)

    # -- binary protocol ---------------------------------------------------------------
    def send(self, cmd: int, **args: Any) -> None:
        self.send_raw(pack(cmd, **args))

    def send_raw(self, data: bytes) -> None:
        if self.sock is None:
            raise ServerError("not connected", self.address)
        try:
            with self.send_lock:  # a worker's watchdog may answer for a thread stuck in a task
                if self._tls:
                    self._sendall_tls(data)
                else:
                    self.sock.sendall(data)
        except OSError as e:
            alert = self._tls_alert()
            if alert is not None:
                raise alert from None
            if isinstance(e, ssl.SSLError):
                raise self._fail_tls(e) from None
            raise self._fail(f"connection lost while sending: {e.strerror or e}") from None

    def _sendall_tls(self, data: bytes) -> None:
        sock = self.sock
        assert isinstance(sock, ssl.SSLSocket)  # called only for a TLS connection
        view = memoryview(data)
        while view:
            try:
                with self._ssl_lock:  # not held while waiting below: the reader must go on
                    n = sock.send(view)
            except ssl.SSLWantReadError:
                _wait(sock, select.POLLIN)
                continue
            except (ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
                _wait(sock, select.POLLOUT)
                continue
            view = view[n:]

    def send_some(self, data: bytes | bytearray) -> int:
        """Send what the socket takes now without blocking (the sender's lanes); the bytes
        sent, 0 when it is full. Raises OSError (ssl.SSLError for TLS) when the connection failed."""
        sock = self.sock
        if sock is None:
            raise ServerError("not connected", self.address)
        try:
            if self._tls:
                with self._ssl_lock:
                    return sock.send(data)
            return sock.send(data, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError, *_WANT):
            return 0
        except OSError:
            alert = self._tls_alert()
            if alert is not None:
                raise alert from None
            raise

    def _tls_alert(self) -> "TLSError | None":
        """After a failed send on TLS: the server's refusal, if it sent one. A TLS 1.3 server
        refuses a client's certificate after the handshake and closes, so our first send can
        fail (EOF) with its alert still unread; the alert says why, the EOF does not."""
        if not self._tls or self.sock is None:
            return None
        try:
            with self._ssl_lock:
                self.sock.recv(1)
        except ssl.SSLError as e:
            if not isinstance(e, _WANT):
                err = self._fail_tls(e)
                return err if isinstance(err, TLSError) else None
        except OSError:
            pass
        return None

    def _fail_tls(self, e: BaseException) -> ServerError:
        """An ssl error on an open connection: TLS 1.3 servers refuse a client's certificate
        only after the handshake, so "no client certificate" and "unknown CA" arrive here."""
        self.close()
        name = self.server_hostname or self.host
        refusal = tls_error(e, self.address, name)
        if refusal is None:
            return ServerError(f"connection lost: {tls_reason(e, name)}", self.address)
        return refusal

    def _take_packet(self) -> Packet | None:
        buf = self._buf
        try:
            parsed = parse_response(buf)
        except ProtocolError as e:
            raise self._fail(f"protocol error: {e}") from None
        if parsed is None:
            if len(buf) >= HEADER_SIZE and HEADER.unpack_from(buf)[2] > self.max_packet:
                return self._oversize()
            return None
        cmd, args, size = parsed
        if size > self._max_size:  # whole already (a cap below one read): still refused
            return self._oversize()
        del buf[:size]  # cheap: CPython's bytearray drops a prefix without copying the rest
        return Packet(cmd, args)

    def _oversize(self) -> Packet | None:
        """The packet at the head of the buffer is over max_packet: skip it, keep its handle."""
        buf = self._buf
        _, cmd, length = HEADER.unpack_from(buf)
        what = f"a {command_name(cmd)} packet of {length} bytes exceeds gearman.max_packet ({self.max_packet} bytes)"
        if cmd not in HANDLE_FIRST:
            _log().error("packet too large; closing the connection", server=self.address, command=command_name(cmd),
                      bytes=length, max_packet=self.max_packet)
            raise self._fail(what)
        end = buf.find(b"\0", HEADER_SIZE, HEADER_SIZE + MAX_HANDLE + 1)
        if end < 0:
            if len(buf) <= HEADER_SIZE + MAX_HANDLE:
                return None  # the handle is still on its way
            raise self._fail(f"protocol error: a job handle longer than {MAX_HANDLE} bytes")
        handle = bytes(buf[HEADER_SIZE:end])
        dropped = min(HEADER_SIZE + length, len(buf))
        del buf[:dropped]
        self._skip_left = HEADER_SIZE + length - dropped
        _log().error("packet too large; its job fails", server=self.address, command=command_name(cmd),
                  handle=handle.decode("utf-8", "replace"), bytes=length, max_packet=self.max_packet)
        return Packet(cmd, {"job_handle": handle, "oversize": str(length).encode()})

    def _read_some(self, timeout: float | None) -> bool:
        """Read what is there within ``timeout`` seconds; False on timeout, raise on EOF."""
        if self.sock is None:
            raise ServerError("not connected", self.address)
        if self._tls:
            return self._read_some_tls(timeout)
        if timeout is not None:
            try:
                ready = wait_readable(self.sock.fileno(), timeout)
            except (OSError, ValueError) as e:
                raise self._fail(f"connection lost: {e}") from None
            if not ready:
                return False
        try:
            chunk = self.sock.recv(65536)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EINTR):
                return True
            raise self._fail(f"connection lost: {e.strerror or e}") from None
        if not chunk:
            raise self._fail("connection closed by server")
        self._buf += chunk
        if self._skip_left:
            self._drop_skipped()
        return True

    def _drop_skipped(self) -> None:  # not _skip: collector._Guarded keeps a counter by that name
        n = min(self._skip_left, len(self._buf))
        del self._buf[:n]
        self._skip_left -= n

    def _read_some_tls(self, timeout: float | None) -> bool:
        sock = self.sock
        assert isinstance(sock, ssl.SSLSocket)  # called only for a TLS connection
        if timeout is not None and not sock.pending():
            try:
                ready = wait_readable(sock.fileno(), timeout)
            except (OSError, ValueError) as e:
                raise self._fail(f"connection lost: {e}") from None
            if not ready:
                return False
        try:
            with self._ssl_lock:
                chunk = sock.recv(65536)
                # Drain what OpenSSL decrypted already: the descriptor will not poll readable for it.
                while chunk and sock.pending():
                    chunk += sock.recv(65536)
            if not chunk:
                raise self._fail("connection closed by server")
            self._buf += chunk
        except _WANT:
            pass  # a record is still in flight: poll again
        except ssl.SSLZeroReturnError:
            raise self._fail("connection closed by server") from None
        except ssl.SSLError as e:
            raise self._fail_tls(e) from None
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EINTR):
                return True
            raise self._fail(f"connection lost: {e.strerror or e}") from None
        if self._skip_left:
            self._drop_skipped()
        return True

    def read_packets(self) -> list[Packet]:
        """Read once (call when select says the socket is readable); every complete packet.

        For loops that select over many connections themselves; raises ServerError on EOF.
        """
        self._read_some(None)
        return self.buffered_packets()

    def take_buffered(self) -> bytes:
        """The bytes read ahead and not yet parsed, handed over and cleared: for a reader
        that takes over the stream (geartask.fleet.ping's capped reader)."""
        data, self._buf = bytes(self._buf), bytearray()
        return data

    def buffered_packets(self) -> list[Packet]:
        packets = []
        while (pkt := self._take_packet()) is not None:
            packets.append(pkt)
        return packets

    def has_buffered_packet(self) -> bool:
        """A *whole* packet is buffered (a header alone is not: its body may still be in flight)."""
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            return False
        return len(buf) >= HEADER_SIZE + HEADER.unpack_from(buf)[2]

    def recv(self, timeout: float | None) -> Packet | None:
        """The next packet, or None when ``timeout`` seconds pass first (None waits forever).

        An ERROR packet from the server is returned like any other; the caller decides.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            pkt = self._take_packet()
            if pkt is not None:
                return pkt
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            if not self._read_some(left):
                return None

    def expect(self, wanted: set[int] | int, timeout: float) -> Packet:
        """recv() until one of ``wanted`` arrives; ERROR or timeout raise ServerError."""
        pkt = self.recv_until(wanted, time.monotonic() + timeout)
        if pkt is None:
            raise self._fail(f"no answer within {timeout:g}s")
        return pkt

    def recv_until(self, wanted: set[int] | frozenset[int] | int, deadline: float) -> Packet | None:
        """recv() until one of ``wanted`` arrives (others are skipped); None at ``deadline``
        (a time.monotonic() value). ERROR raises ServerError with its text, unless wanted."""
        wanted = {wanted} if isinstance(wanted, int) else wanted
        while True:
            pkt = self.recv(max(0.0, deadline - time.monotonic()))
            if pkt is None:
                return None
            if pkt.cmd in wanted:
                return pkt
            if pkt.cmd == ERROR:
                raise ServerError(error_text(pkt), self.address)

    def request(self, cmd: int, wanted: set[int] | int, timeout: float, **args: Any) -> Packet:
        """Send one request and return its answer (one of ``wanted``); ERROR or no answer
        within ``timeout`` seconds raise ServerError."""
        self.send(cmd, **args)
        return self.expect(wanted, timeout)

    def echo(self, timeout: float = 5.0) -> float:
        """Round trip of an ECHO_REQ in seconds: the cheapest proof the server is alive."""
        t0 = time.monotonic()
        self.send(ECHO_REQ, data=b"geartask")
        self.expect(ECHO_RES, timeout)
        return time.monotonic() - t0

    # -- text (admin) protocol ---------------------------------------------------------
    def text_command(self, line: str, timeout: float = 5.0, max_bytes: int | None = None) -> list[str]:
        """Send one admin text command; return its reply lines (without the closing '.').

        The reply is framed by an ECHO_REQ sent right behind the command: gearmand answers in
        order, so everything before our ECHO_RES is the reply, whatever it holds. Its own framing
        (a '.' line) can't be trusted: a function name, client id or unique key may contain a
        newline, even a '.' line, which would end the reply early and leave its rest to be read
        as the next answer. A peer that is not gearmand never sends the echo, and what it sent
        instead is quoted in the error. The reply may be ``max_bytes`` long (MAX_TEXT_REPLY).
        """
        line = line.strip()
        if not line or any(c in line for c in "\r\n\0"):
            raise ValueError(f"one admin command per line, got {line!r}")  # a caller's bug
        token = os.urandom(8).hex().encode()
        end = response_bytes(ECHO_RES, token)
        limit = MAX_TEXT_REPLY if max_bytes is None else max_bytes
        self.send_raw(line.encode("utf-8") + b"\n" + pack(ECHO_REQ, data=token))
        deadline = time.monotonic() + timeout
        start = 0
        while (at := self._buf.find(end, start)) < 0:
            start = max(0, len(self._buf) - len(end) + 1)  # rescan only what may hold the end
            if len(self._buf) > limit:
                raise self._fail(f"reply to {line!r} larger than {limit} bytes")
            seen = bytes(self._buf[:200])
            left = deadline - time.monotonic()
            try:
                if left <= 0 or not self._read_some(left):
                    raise self._fail(f"no answer to {line!r} within {timeout:g}s")
            except ServerError as e:
                if seen:  # say what came instead of gearmand's whole answer
                    first = seen.split(b"\n", 1)[0][:80].decode("utf-8", "replace")
                    why = str(e).removeprefix(self.address + ": ")
                    if "closed" in why:  # gearmand never closes an admin connection itself
                        why += f" after it sent {first!r}: not a gearmand?"
                    else:
                        why = f"no complete answer to {line!r} within {timeout:g}s (it began {first!r})"
                    raise ServerError(why, self.address) from None
                raise
        reply = bytes(self._buf[:at])
        del self._buf[:at + len(end)]
        lines = [ln.removesuffix("\r") for ln in reply.decode("utf-8", errors="replace").split("\n")]
        if lines[-1] != "":
            raise ServerError(f"reply to {line!r} does not end with a newline: not a gearmand?", self.address)
        lines.pop()
        if not _is_multiline(line) or (len(lines) == 1 and lines[0].startswith("ERR ")):
            if len(lines) != 1:
                raise ServerError(f"{len(lines)} lines in reply to {line!r}, expected one: not a gearmand?",
                                  self.address)
            return lines
        if not lines or lines[-1] != ".":
            raise ServerError(f"reply to {line!r} does not end with '.': not a gearmand?", self.address)
        return lines[:-1]


MAX_TEXT_REPLY = 256 * 1024 * 1024  # an admin reply past this is refused (a hostile or broken peer)


@dataclass(frozen=True)
class Keepalive:
    """TCP keepalive and user timeout for a connection, so a silent peer (a host that is cut
    off or frozen: no RST ever comes) is found in bounded time instead of the kernel's 2 h.

    ``idle`` seconds without traffic before the first probe, then a probe every ``interval``
    seconds, ``count`` unanswered probes end the connection. ``user_timeout``: seconds that
    sent data may stay unacknowledged before the connection is ended (TCP_USER_TIMEOUT; 0
    leaves the kernel's default of about 15 minutes).
    """

    idle: int = 30
    interval: int = 10
    count: int = 3
    user_timeout: float = 0.0

    @property
    def bound(self) -> float:
        """Seconds after which a silent idle peer is declared gone."""
        return self.idle + self.interval * self.count

    def apply(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, value in (("TCP_KEEPIDLE", self.idle), ("TCP_KEEPINTVL", self.interval),
                           ("TCP_KEEPCNT", self.count)):
            if hasattr(socket, opt):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), max(1, int(value)))
        if self.user_timeout > 0 and hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(self.user_timeout * 1000))


def _log() -> Any:
    # Looked up per event (they are rare), so it follows logging set up after import without
    # importing geartask.logs (and the config behind it) into the lowest layer.
    return structlog.get_logger("geartask.gearman")


def _wait(sock: socket.socket, events: int) -> None:
    poller = select.poll()
    poller.register(sock, events)
    poller.poll()


def wait_readable(fd: int, timeout: float | None) -> bool:
    """True when ``fd`` is readable within ``timeout`` seconds (None: wait forever).

    poll, not select: select fails for descriptor numbers past 1024 (a worker with many
    threads and servers has more than that).
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        # poll takes a C int of milliseconds: a longer wait is made of several
        ms = None if deadline is None else min(_MAX_POLL_MS, max(0, int((deadline - time.monotonic()) * 1000 + 0.999)))
        try:
            if poller.poll(ms):
                return True
        except InterruptedError:  # pragma: no cover - PEP 475 retries this already
            continue
        if ms is not None and ms < _MAX_POLL_MS:
            return False


_MAX_POLL_MS = 2**31 - 1


_MULTILINE = ("status", "workers", "show jobs", "show unique jobs", "prioritystatus")


def _is_multiline(line: str) -> bool:
    words = line.strip().lower()
    return any(words == m or words.startswith(m + " ") for m in _MULTILINE)


def admin_command(host: str, port: int, line: str, timeout: float = 5.0, **kw: Any) -> list[str]:
    """Open a connection, run one text command with a deadline, close. ``kw``: Connection's
    tls, server_hostname."""
    conn = Connection(host, port, connect_timeout=timeout, **kw)
    try:
        return conn.connect().text_command(line, timeout)
    finally:
        conn.close()


def keepalive_for(seconds: float) -> Keepalive:
    """worker.keepalive -> socket options: a silent peer is declared dead after about
    ``seconds`` (idle half of it, then 3 probes over the other half; unacknowledged data
    waits at most ``seconds``)."""
    half = max(1.0, seconds / 2)
    return Keepalive(idle=int(half), interval=max(1, int(half / 3)), count=3, user_timeout=seconds)
