"""Worker processes pinged through their control functions, over a connection to one server."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from ..control import CONTROL_PREFIX, parse_control_function, ping_request, signed_request
from ..errors import ServerError
from ..gearman import (ERROR, JOB_CREATED, WORK_COMPLETE, WORK_EXCEPTION, WORK_FAIL, Connection, error_text, pack,
                       submit_command)
from .replies import WorkerConnection

PING_UNIQUE = f"{CONTROL_PREFIX}:ping"  # one unique for every ping: see ping_processes


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
    created, by_handle, waiting = 0, {}, len(results)
    while waiting:
        pkt = conn.recv(deadline - time.monotonic())
        if pkt is None:
            break  # the rest are silent
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
