"""Worker processes pinged through their control functions, over a connection to one server."""

from __future__ import annotations

import json
import ssl
import time
from dataclasses import dataclass
from typing import Any

from ..control import CONTROL_PREFIX, parse_control_function, ping_request, signed_request
from ..errors import ServerError
from ..gearman import (ERROR, JOB_CREATED, WORK_COMPLETE, WORK_EXCEPTION, WORK_FAIL, Connection, Packet, error_text,
                       pack, submit_command)
from ..gearman import HEADER, HEADER_SIZE, parse_response
from ..gearman.codec import ProtocolError
from ..gearman.connection import wait_readable
from .replies import WorkerConnection

PING_UNIQUE = f"{CONTROL_PREFIX}:ping"  # one unique for every ping: see ping_processes
MAX_PING_REPLY = 1024 * 1024  # bytes of one ping answer read; a bigger one is a rogue's, read past unkept
_MAX_HANDLE = 128  # bytes of a job handle looked for at the start of an oversized packet


@dataclass
class PingResult:
    """One worker process's answer (or not) to a ping through its control function on one server."""

    function: str  # the control function pinged: geartask.control:NAME:IP:PID
    name: str
    ip: str  # the process's IP as this server sees it
    pid: int
    answered: bool = False  # False: silent (no answer within the deadline)
    seconds: float | None = None  # round trip, when answered
    reply: dict | None = None  # the worker's JSON answer (geartask.control.ping_request)
    error: str | None = None  # answered with a failure, or with something that is not a JSON object


class Oversize:
    """A packet bigger than the cap: only its command, job handle and size are kept."""

    def __init__(self, cmd: int, handle: bytes, size: int):
        self.cmd, self.handle, self.size = cmd, handle, size


class CappedReader:
    """Packets from a connection's socket, each at most ``cap`` bytes: a bigger one is read
    past in 64 KiB pieces and handed on as ``Oversize`` (its handle and size), never buffered
    whole. Two fake workers answering a ping with 256 MiB each must not cost the manager or
    the dashboard 512 MiB (issue 20, item 2)."""

    def __init__(self, conn: Connection, cap: int = MAX_PING_REPLY):
        self.conn, self.cap = conn, cap
        self.buf = bytearray(conn.take_buffered())  # what the connection read ahead, if anything
        self.skip = 0  # bytes of an oversized packet still to read past

    def _read(self, timeout: float) -> bool:
        sock = self.conn.sock
        if sock is None:
            raise ServerError("not connected", self.conn.address)
        pending = isinstance(sock, ssl.SSLSocket) and sock.pending()
        if not pending and not wait_readable(sock.fileno(), max(0.0, timeout)):
            return False
        try:
            chunk = sock.recv(65536)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
            return True
        except OSError as e:
            self.conn.close()
            raise ServerError(f"connection lost: {e.strerror or e}", self.conn.address) from None
        if not chunk:
            self.conn.close()
            raise ServerError("connection closed by server", self.conn.address)
        if self.skip:
            dropped = min(self.skip, len(chunk))
            self.skip -= dropped
            chunk = chunk[dropped:]
        self.buf += chunk
        return True

    def _take(self) -> Packet | Oversize | None:
        if self.skip or len(self.buf) < HEADER_SIZE:
            return None
        length = HEADER.unpack_from(self.buf)[2]
        if length > self.cap:
            cmd = HEADER.unpack_from(self.buf)[1]
            head = bytes(self.buf[HEADER_SIZE:HEADER_SIZE + _MAX_HANDLE])
            if b"\0" not in head and len(head) < min(length, _MAX_HANDLE):
                return None  # the handle is not all here yet
            handle = head.split(b"\0", 1)[0]
            have = len(self.buf) - HEADER_SIZE
            if have >= length:
                del self.buf[:HEADER_SIZE + length]
            else:
                self.skip = length - have
                self.buf.clear()
            return Oversize(cmd, handle, length)
        try:
            parsed = parse_response(self.buf)
        except ProtocolError as e:  # the stream can't be trusted past it
            self.conn.close()
            raise ServerError(f"protocol error: {e}", self.conn.address) from None
        if parsed is None:
            return None
        cmd, args, size = parsed
        del self.buf[:size]
        return Packet(cmd, args)

    def recv(self, timeout: float) -> Packet | Oversize | None:
        """The next packet (or Oversize), or None when ``timeout`` seconds pass first."""
        deadline = time.monotonic() + timeout
        while True:
            pkt = self._take()
            if pkt is not None:
                return pkt
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                return None


def control_functions(connections: list[WorkerConnection]) -> list[str]:
    # a NUL can't go into a SUBMIT_JOB's function name; such a name is no process of ours
    found = dict.fromkeys(f for w in connections for f in w.functions if parse_control_function(f) and "\0" not in f)
    return list(found)


def ping_processes(conn: Connection, functions: list[str], timeout: float, key: Any = None) -> list[PingResult]:
    """Ping every control function at once: foreground high-priority jobs, pipelined, one deadline.

    A ping nobody answered stays in gearmand after we disconnect, marked "ignored": it is never
    handed out, and a process that comes back drops it with its next grab. Every ping has the
    same unique key, so gearmand coalesces the next one with it: one such job per silent
    process, however often anyone asks (``clear`` removes it, as it is never persisted).
    With ``key`` (``security.key``) each ping is addressed to its function and signed for
    ``control`` (a worker with ``require_signed`` answers nothing else).
    """
    results = []
    for f in functions:
        ident = parse_control_function(f)
        assert ident is not None
        results.append(PingResult(f, ident.name, ident.ip, ident.pid))
    if not results:
        return results
    payload, cmd = ping_request(), submit_command("high", False)
    t0 = time.monotonic()
    conn.send_raw(b"".join(pack(cmd, task=r.function, unique=PING_UNIQUE,
                                data=payload if key is None else signed_request(payload, r.function, key))
                           for r in results))
    deadline = t0 + timeout
    created, waiting = 0, len(results)
    by_handle: dict[bytes, Any] = {}
    reader = CappedReader(conn)
    while waiting:
        pkt = reader.recv(deadline - time.monotonic())
        if pkt is None:
            break  # the rest are silent
        if isinstance(pkt, Oversize):
            r = by_handle.pop(pkt.handle, None)
            if r is not None and not r.answered:
                r.answered, r.seconds, waiting = True, round(time.monotonic() - t0, 4), waiting - 1
                r.error = f"rogue answer: {pkt.size} bytes, over {MAX_PING_REPLY} (read past, not kept)"
            continue
        if pkt.cmd == JOB_CREATED and created < len(results):  # answered in submission order
            by_handle[pkt["job_handle"]] = results[created]
            created += 1
        elif pkt.cmd in (WORK_COMPLETE, WORK_FAIL, WORK_EXCEPTION):
            r = by_handle.pop(pkt["job_handle"], None)
            if r is None or r.answered:
                continue
            r.answered, r.seconds, waiting = True, round(time.monotonic() - t0, 4), waiting - 1
            if pkt.cmd != WORK_COMPLETE:
                r.error = "the ping failed" if pkt.cmd == WORK_FAIL else "the ping raised an exception"
                continue
            try:
                reply = json.loads(pkt["data"])
            except (UnicodeDecodeError, ValueError, RecursionError):
                reply = None
            if isinstance(reply, dict):
                r.reply = reply
            else:
                r.error = f"answer is not a JSON object: {pkt['data'][:80]!r}"
        elif pkt.cmd == ERROR:
            raise ServerError(error_text(pkt), conn.address)
    return results


def mark_silent(connections: list[WorkerConnection], pings: list[PingResult]) -> None:
    answered = {(p.name, p.pid): p.answered for p in pings}
    for w in connections:
        key = (w.name, w.pid) if w.name is not None else None
        if key is None:
            idents = [parse_control_function(f) for f in w.functions]
            key = next(((i.name, i.pid) for i in idents if i is not None), None)
        if key in answered:
            w.silent = not answered[key]
