"""The admin operations on one server, each over one connection that ``connected`` opens and
always closes. Each takes ``(host, port, ..., timeout=)``, the shape ``Admin.each`` calls."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from typing import Any, Iterator

from ..address import format_address
from ..errors import ServerError
from ..gearman import (CAN_DO, CANT_DO, ECHO_REQ, ECHO_RES, ERROR, GET_STATUS, JOB_CREATED, SET_CLIENT_ID, STATUS_RES,
                       WORK_COMPLETE, WORK_EXCEPTION, WORK_FAIL, Connection, error_text, pack, submit_command)
from .drain import drain
from .ping import MAX_PING_REPLY, CappedReader, Oversize, PingResult, control_functions, mark_silent, ping_processes
from .replies import (WorkerConnection, parse_show_jobs, parse_show_unique_jobs, parse_status, parse_version,
                      parse_workers)

DEFAULT_TIMEOUT = 3.0
MANAGER_CLIENT_ID = "geartask-manager"  # how the manager's own connections show in `workers`
_BATCH = 200  # GET_STATUS requests pipelined per round trip


@contextmanager
def connected(host: str, port: int, timeout: float, client_id: str | None = None) -> Iterator[Connection]:
    """A connection to one server (named ``client_id`` in its ``workers`` list), closed on leaving."""
    conn = Connection(host, port, connect_timeout=timeout).connect()
    try:
        if client_id:
            conn.send(SET_CLIENT_ID, client_id=client_id)
        yield conn
    finally:
        conn.close()


def _version(conn: Connection, timeout: float) -> str:
    return parse_version(conn.text_command("version", timeout)[0], conn.address)


def _status_on(conn: Connection, timeout: float) -> dict:
    t0 = time.monotonic()
    version = _version(conn, timeout)
    rtt = time.monotonic() - t0
    functions = parse_status(conn.text_command("status", timeout))
    return {"version": version, "rtt_ms": round(rtt * 1000, 3), "functions": functions}


def server_status(host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Round trip, version and per-function counts of one server."""
    with connected(host, port, timeout) as conn:
        return {"reachable": True, **_status_on(conn, timeout)}


def server_workers(host: str, port: int, ping: bool = False, key: Any = None,
                   timeout: float = DEFAULT_TIMEOUT) -> list[WorkerConnection]:
    """Every connection gearmand lists; with ``ping``, each geartask process is pinged through
    its control function here and its connections are marked ``silent`` (True/False)."""
    with connected(host, port, timeout) as conn:
        connections = parse_workers(conn.text_command("workers", timeout))
        if ping:
            mark_silent(connections, ping_processes(conn, control_functions(connections), timeout, key))
        return connections


def server_version(host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> str:
    with connected(host, port, timeout) as conn:
        return _version(conn, timeout)


def server_ping(host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> float:
    """Round-trip time in milliseconds of a 'version' (checked: a gearmand answered)."""
    with connected(host, port, timeout) as conn:
        t0 = time.monotonic()
        _version(conn, timeout)
        return round((time.monotonic() - t0) * 1000, 3)


def server_ping_workers(host: str, port: int, key: Any = None, timeout: float = DEFAULT_TIMEOUT) -> list[PingResult]:
    """Ping every worker process registered on one server (its control function there)."""
    with connected(host, port, timeout) as conn:
        return ping_processes(conn, control_functions(parse_workers(conn.text_command("workers", timeout))), timeout,
                              key)


def server_snapshot(host: str, port: int, ping: bool = True, key: Any = None, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Everything a dashboard shows of one server, over one connection: version, round trip,
    per-function counts, every connection and (with ``ping``) every worker process's ping."""
    with connected(host, port, timeout) as conn:
        status = _status_on(conn, timeout)
        connections = parse_workers(conn.text_command("workers", timeout))
        pings = ping_processes(conn, control_functions(connections), timeout, key) if ping else []
        mark_silent(connections, pings)
    return {**status, "connections": connections, "pings": pings}


def server_control_call(host: str, port: int, function: str, payload: bytes, unique: str,
                        timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Send one foreground high-priority control job and return the worker's JSON answer.

    Raises ServerError when it fails or nobody answers within ``timeout`` (being a foreground
    job, an unanswered one leaves gearmand's queue when this connection closes).
    """
    with connected(host, port, timeout, f"{MANAGER_CLIENT_ID}:control") as conn:
        conn.send(submit_command("high", False), task=function, unique=unique, data=payload)
        handle = conn.expect(JOB_CREATED, timeout).text("job_handle")
        deadline = time.monotonic() + timeout
        reader = CappedReader(conn)  # a worker's answer is small: a rogue's huge one is read past
        while True:
            pkt = reader.recv(max(deadline - time.monotonic(), 0.001))
            if pkt is None:
                raise ServerError(f"no answer within {timeout:g}s", conn.address)
            if isinstance(pkt, Oversize):
                if pkt.handle.decode("utf-8", "replace") == handle:
                    raise ServerError(f"{function} answered {pkt.size} bytes, over {MAX_PING_REPLY} "
                                      "(a rogue's answer: read past, not kept)", conn.address)
                continue
            if pkt.cmd == ERROR:
                raise ServerError(error_text(pkt), conn.address)
            if pkt.cmd in (WORK_COMPLETE, WORK_FAIL, WORK_EXCEPTION) and pkt.text("job_handle") == handle:
                break
    if pkt.cmd != WORK_COMPLETE:
        raise ServerError(f"the control job to {function} failed", format_address(host, port))
    try:
        reply = json.loads(pkt["data"])
    except (UnicodeDecodeError, ValueError, RecursionError):
        reply = None
    if not isinstance(reply, dict):
        raise ServerError(f"{function} answered something that is not a JSON object: {pkt['data'][:80]!r}",
                          format_address(host, port))
    return reply


def job_states(conn: Connection, handles: list[str], timeout: float) -> dict[str, tuple[bool, bool]]:
    """handle -> (known, running) by GET_STATUS, pipelined: answers come back in order."""
    states: dict[str, tuple[bool, bool]] = {}
    for i in range(0, len(handles), _BATCH):
        chunk = handles[i:i + _BATCH]
        conn.send_raw(b"".join(pack(GET_STATUS, job_handle=h) for h in chunk))
        for _ in chunk:
            p = conn.expect(STATUS_RES, timeout)
            states[p.text("job_handle")] = (p["known"] == b"1", p["running"] == b"1")
    return states


def server_job_status(host: str, port: int, handle: str, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """GET_STATUS of one handle: known, running, and the job's last WORK_STATUS (numerator,
    denominator; 0/0 when it sent none)."""
    with connected(host, port, timeout) as conn:
        conn.send(GET_STATUS, job_handle=handle)
        p = conn.expect(STATUS_RES, timeout)
    nums = [p["numerator"] or b"0", p["denominator"] or b"0"]
    if not all(n.isdigit() and len(n) <= 18 for n in nums):  # a count, not whatever the server sent
        raise ServerError("malformed STATUS_RES", format_address(host, port))
    return {"known": p["known"] == b"1", "running": p["running"] == b"1", "numerator": int(nums[0]),
            "denominator": int(nums[1])}


def server_jobs(host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Every job gearmand holds (handle, retries, cancelled, running) and every unique key.

    gearmand's admin protocol never relates a handle to its unique key or function.
    """
    with connected(host, port, timeout) as conn:
        listed = parse_show_jobs(conn.text_command("show jobs", timeout))
        uniques = parse_show_unique_jobs(conn.text_command("show unique jobs", timeout))
        states = job_states(conn, [j.handle for j in listed], timeout)
    jobs = []
    for j in listed:
        known, running = states.get(j.handle, (False, False))
        state = "cancelled" if j.cancelled else ("running" if running else ("queued" if known else "gone"))
        jobs.append({"handle": j.handle, "retries": j.retries, "cancelled": j.cancelled, "state": state})
    return {"jobs": jobs, "unique_keys": uniques}


class PartialError(ServerError):
    """A server failed half way through a change: ``partial`` is what was done before it did."""

    def __init__(self, message: str, partial: dict):
        self.partial = partial
        super().__init__(message)


def server_clear(host: str, port: int, functions: list[str] | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Remove the queued jobs of ``functions`` (None: all) from one server.

    Returns {"cleared": {function: count}, "stranded": n}. ``stranded`` (clearing all only)
    counts queued jobs still listed afterwards that no grab can reach: those left behind by
    ``drop function``. No admin command removes them (``cancel job`` on them answers OK but
    keeps their sqlite rows); after a gearmand restart they are back under their function
    and the next clear removes them for good.
    """
    with connected(host, port, timeout, f"{MANAGER_CLIENT_ID}:clear") as conn:
        status = {f.function: f for f in parse_status(conn.text_command("status", timeout))}
        names = list(status) if functions is None else list(dict.fromkeys(functions))
        counts: dict[str, int] = {}
        try:
            for name in names:
                st = status.get(name)
                counts[name] = 0

                def count(n: int, name: str = name) -> None:
                    counts[name] += n
                # total counts running and cancelled jobs too: an upper bound, so a queue that
                # senders keep filling can't keep us here forever.
                if st and st.total:
                    drain(conn, name, st.total, timeout, count)
            # An echo answered means every WORK_FAIL before it was processed (and its row deleted).
            conn.send(ECHO_REQ, data=b"clear")
            conn.expect(ECHO_RES, timeout)
        except ServerError as e:  # say how many went before the server did, not "0 cleared"
            raise PartialError(str(e), {"cleared": {k: v for k, v in counts.items() if v}, "stranded": 0,
                                        "interrupted": True}) from None
        stranded = _count_stranded(conn, timeout) if functions is None else 0
    return {"cleared": counts, "stranded": stranded}


def _count_stranded(conn: Connection, timeout: float) -> int:
    """Jobs still known, neither running nor cancelled, after every function was drained."""
    handles = [j.handle for j in parse_show_jobs(conn.text_command("show jobs", timeout)) if not j.cancelled]
    return sum(1 for known, running in job_states(conn, handles, timeout).values() if known and not running)


def server_cancel(host: str, port: int, handle: str, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Cancel one queued job: 'cancelled', 'already cancelled', 'unknown' or 'running' (refused)."""
    with connected(host, port, timeout) as conn:
        known, running = job_states(conn, [handle], timeout).get(handle, (False, False))
        if not known:
            return "unknown"
        if running:
            return "running"
        if any(j.handle == handle and j.cancelled for j in parse_show_jobs(conn.text_command("show jobs", timeout))):
            return "already cancelled"
        reply = conn.text_command(f"cancel job {handle}", timeout)[0]
        if not reply.startswith("OK"):
            raise ServerError(f"cancel job {handle}: {reply}", conn.address)
        return "cancelled"


def server_maxqueue(host: str, port: int, function: str, size: int, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Limit the queue of ``function`` (0: no limit) until gearmand restarts.

    gearmand answers OK to ``maxqueue`` for a function it doesn't know yet and keeps no limit,
    so the function is created first the one way that works: a CAN_DO (then CANT_DO).
    (``create function`` drops the name's last character in gearmand 1.1.20.)
    """
    with connected(host, port, timeout, f"{MANAGER_CLIENT_ID}:maxqueue") as conn:
        conn.send(CAN_DO, task=function)
        conn.send(CANT_DO, task=function)
        conn.echo(timeout)
        reply = conn.text_command(f"maxqueue {function} {size}", timeout)[0]
    if not reply.startswith("OK"):
        raise ServerError(f"maxqueue: {reply}", format_address(host, port))
    return "OK"


def submit_control(host: str, port: int, function: str, payload: bytes, unique: str,
                   timeout: float = DEFAULT_TIMEOUT) -> str:
    """Queue a high-priority background control job; returns its handle."""
    with connected(host, port, timeout, f"{MANAGER_CLIENT_ID}:shutdown") as conn:
        conn.send(submit_command("high", True), task=function, unique=unique, data=payload)
        return conn.expect(JOB_CREATED, timeout).text("job_handle")


def probe_job(host: str, port: int, handle: str, timeout: float = DEFAULT_TIMEOUT) -> tuple[bool, bool]:
    """(known, running) of one handle on one server."""
    with connected(host, port, timeout) as conn:
        return job_states(conn, [handle], timeout)[handle]
