"""The manager's library: gearmand's admin protocol, asked of every configured server at once.

Every call runs against each server in its own thread with a deadline and returns one
``ServerResult`` per server, holding either the value or the error: a dead or slow server
is reported as such and never hides (or holds up) the others.

What gearmand 1.1 really does, found by trying it (tests/test_manager.py keeps it true):

* ``drop function`` only unlinks the function: its queued jobs stay in memory (``show jobs``)
  and in the sqlite queue, a worker can no longer grab them, and they come back at restart.
  Never used here.
* ``cancel job H`` marks a job ignored and deletes its sqlite row, but ``status`` keeps
  counting it until a worker's grab skips it. It does so for a *running* job too (deleting the
  row that would have saved it from a crash), so ``cancel`` first checks GET_STATUS says "not
  running". For a job orphaned by ``drop function`` it answers OK and deletes nothing.
* ``show jobs`` lines are ``handle \\t retries \\t ignore \\t queued``; the last column is 1 for
  running jobs as well, and no line names the function or unique key; ``show unique jobs``
  lists unique keys without handles. So ``jobs`` asks GET_STATUS for each handle.
* What truly clears: connect as a worker of the function, GRAB_JOB_UNIQ until NO_JOB and
  answer every job with WORK_FAIL. gearmand then frees the job and deletes its sqlite row,
  with or without other workers connected; running jobs are never handed out, so they stay.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

from ..control import (CONTROL_PREFIX, check_name, parse_client_id, parse_control_function,
                              ping_request, shutdown_request, stop_request)
from ..errors import GeartaskError, ServerError, UsageError
from ..gearman import (CAN_DO, CANT_DO, ECHO_REQ, ECHO_RES, ERROR, GET_STATUS, GRAB_JOB_UNIQ, JOB_ASSIGN_UNIQ,
                       JOB_CREATED, NO_JOB, SET_CLIENT_ID, STATUS_RES, WORK_COMPLETE, WORK_EXCEPTION, WORK_FAIL,
                       Connection, error_text, pack, submit_command)

DEFAULT_TIMEOUT = 3.0
MANAGER_CLIENT_ID = "geartask-manager"  # how the manager's own connections show in `workers`
_BATCH = 200  # GET_STATUS requests pipelined per round trip
# Grabs pipelined per round trip. Small on purpose: with the sqlite queue each WORK_FAIL costs
# gearmand a synchronous row delete (~2.5 ms here), and a batch must finish within the timeout.
_DRAIN_BATCH = 50
MAX_FUNCTION = 512  # gearmand's GEARMAN_FUNCTION_MAX_SIZE
MAX_HANDLE = 64  # gearmand's GEARMAND_JOB_HANDLE_SIZE
MAX_QUEUE = 2**31 - 1
PING_UNIQUE = f"{CONTROL_PREFIX}:ping"  # one unique for every ping: see _ping  # gearmand answers OK to anything; keep to what its counters hold


# -- what an operator may type (it goes into gearmand's line-based text protocol) ---------

def check_function(name: str) -> str:
    """A function name for ``clear``/``maxqueue``: a newline in it would be a second admin
    command to gearmand, a space would split ``maxqueue F N`` differently."""
    if not name or len(name) > MAX_FUNCTION or not name.isprintable() or any(c.isspace() for c in name):
        raise UsageError(f"bad function name {name[:80]!r}: 1-{MAX_FUNCTION} printable "
                         "characters without spaces")
    return name


def check_handle(handle: str) -> str:
    """A job handle as gearmand makes them ('H:host:42'): printable ASCII, at most 64 characters."""
    if not re.fullmatch(rf"[!-~]{{1,{MAX_HANDLE}}}", handle):
        raise UsageError(f"bad job handle {handle[:80]!r} ({len(handle)} characters): handles are "
                         f"1-{MAX_HANDLE} printable ASCII characters without spaces, like H:host:42")
    return handle


def check_host(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        raise UsageError(f"--host: expected an IP address, got {ip[:80]!r}") from None


def check_worker_name(name: str) -> str:
    if len(name) > 255 or not name.isprintable():
        raise UsageError(f"--name: bad worker name {name[:80]!r}")
    return check_name(name)


@dataclass
class ServerResult:
    """One server's answer to one call: ``value`` when ok, else ``error``."""

    server: str
    ok: bool
    value: Any = None
    error: str | None = None
    elapsed: float = 0.0

    def to_dict(self) -> dict:
        return {"server": self.server, "ok": self.ok, "error": self.error,
                "elapsed": round(self.elapsed, 4), "value": plain(self.value)}


def plain(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def all_ok(results: Iterable[ServerResult]) -> bool:
    return all(r.ok for r in results)


# -- one server -------------------------------------------------------------------------

def _connect(host: str, port: int, timeout: float, client_id: str | None = None) -> Connection:
    conn = Connection(host, port, connect_timeout=timeout).connect()
    if client_id:
        conn.send(SET_CLIENT_ID, client_id=client_id)
    return conn


@dataclass
class FunctionStatus:
    function: str
    queued: int  # waiting for a worker (total minus running)
    running: int
    workers: int  # connected workers able to run it
    total: int


_STATUS_TAIL = re.compile(r"\t([0-9]{1,20})\t([0-9]{1,20})\t([0-9]{1,20})\Z")


def parse_status(lines: list[str]) -> list[FunctionStatus]:
    """'FUNCTION\\tTOTAL\\tRUNNING\\tAVAILABLE_WORKERS' lines -> FunctionStatus list.

    A function name may hold tabs and newlines (gearmand takes any bytes): the numbers are
    read from the end, and a line without them continues the name on the next line.
    """
    out, name_lines = [], []
    for line in lines:
        m = _STATUS_TAIL.search(line)
        if m is None:
            name_lines.append(line)
            continue
        name = "\n".join(name_lines + [line[:m.start()]])
        name_lines = []
        total, running, workers = (int(g) for g in m.groups())
        out.append(FunctionStatus(name, max(total - running, 0), running, workers, total))
    if name_lines:
        raise ServerError(f"malformed 'status' reply {name_lines[0][:80]!r}: not a gearmand?")
    return out


@dataclass
class WorkerConnection:
    fd: int | None
    ip: str  # the peer address gearmand sees
    client_id: str  # '-' when the connection set none
    functions: list[str]
    name: str | None = None  # parsed from a geartask client id NAME:IP:PID:THREAD
    worker_ip: str | None = None
    pid: int | None = None
    thread: int | None = None
    silent: bool | None = None  # its process did not answer a ping here; None: not asked


_WORKER_LINE = re.compile(r"(-1|[0-9]{1,10}) (\S+) ")  # fd -1: a connection gearmand is closing


def parse_workers(lines: list[str]) -> list[WorkerConnection]:
    """'FD IP CLIENT_ID : FUNC FUNC...' lines -> WorkerConnection list.

    A client id or function name may hold a newline: a line that does not start with
    'FD IP ' continues the one before.
    """
    records: list[str] = []
    for line in lines:
        if _WORKER_LINE.match(line) or not records:
            records.append(line)
        else:
            records[-1] += "\n" + line
    out = []
    for record in records:
        m = _WORKER_LINE.match(record)
        if m is None:
            raise ServerError(f"malformed 'workers' reply {record[:80]!r}: not a gearmand?")
        rest = record[m.end():]
        client_id, sep, funcs = rest.partition(" :")
        if not sep:
            raise ServerError(f"malformed 'workers' reply {record[:80]!r}: not a gearmand?")
        w = WorkerConnection(int(m.group(1)), m.group(2), client_id or "-", funcs.split(" ")[1:] if funcs else [])
        w.functions = [f for f in w.functions if f]
        ident = parse_client_id(client_id)
        if ident is not None:
            w.name, w.worker_ip, w.pid, w.thread = ident.name, ident.ip, ident.pid, ident.thread
        out.append(w)
    return out


_VERSION = re.compile(r"OK ([0-9]+\.[0-9]+[!-~]*)")


def _version(conn: Connection, timeout: float) -> str:
    """gearmand's version; a peer whose answer has another shape is not a gearmand."""
    reply = conn.text_command("version", timeout)[0]
    m = _VERSION.fullmatch(reply)
    if m is None:
        raise ServerError(f"not a gearmand: it answered {reply[:80]!r} to 'version'", conn.address)
    return m.group(1)


def _status_on(conn: Connection, timeout: float) -> dict:
    t0 = time.monotonic()
    version = _version(conn, timeout)
    rtt = time.monotonic() - t0
    functions = parse_status(conn.text_command("status", timeout))
    return {"version": version, "rtt_ms": round(rtt * 1000, 3), "functions": functions}


def server_status(host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Round trip, version and per-function counts of one server."""
    conn = _connect(host, port, timeout)
    try:
        return {"reachable": True, **_status_on(conn, timeout)}
    finally:
        conn.close()


def server_workers(host: str, port: int, ping: bool = False,
                   timeout: float = DEFAULT_TIMEOUT) -> list[WorkerConnection]:
    """Every connection gearmand lists; with ``ping``, each geartask process is pinged through
    its control function here and its connections are marked ``silent`` (True/False)."""
    conn = _connect(host, port, timeout)
    try:
        connections = parse_workers(conn.text_command("workers", timeout))
        if ping:
            _mark_silent(connections, _ping(conn, _control_functions(connections), timeout))
        return connections
    finally:
        conn.close()


def server_version(host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> str:
    conn = _connect(host, port, timeout)
    try:
        return _version(conn, timeout)
    finally:
        conn.close()


def server_ping(host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> float:
    """Round-trip time in milliseconds of a 'version' (checked: a gearmand answered)."""
    conn = _connect(host, port, timeout)
    try:
        t0 = time.monotonic()
        _version(conn, timeout)
        return round((time.monotonic() - t0) * 1000, 3)
    finally:
        conn.close()


# -- pinging worker processes -----------------------------------------------------------

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


def _control_functions(connections: list[WorkerConnection]) -> list[str]:
    # a NUL can't go into a SUBMIT_JOB's function name; such a name is no process of ours
    found = dict.fromkeys(f for w in connections for f in w.functions if parse_control_function(f) and "\0" not in f)
    return list(found)


def _ping(conn: Connection, functions: list[str], timeout: float) -> list[PingResult]:
    """Ping every control function at once: foreground high-priority jobs, pipelined, one deadline.

    A ping nobody answered stays in gearmand after we disconnect, marked "ignored": it is never
    handed out, and a process that comes back drops it with its next grab. Every ping has the
    same unique key, so gearmand coalesces the next one with it: one such job per silent
    process, however often anyone asks (``clear`` removes it, as it is never persisted).
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
                                data=payload) for r in results))
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


def _mark_silent(connections: list[WorkerConnection], pings: list[PingResult]) -> None:
    answered = {(p.name, p.pid): p.answered for p in pings}
    for w in connections:
        key = (w.name, w.pid) if w.name is not None else None
        if key is None:
            idents = [parse_control_function(f) for f in w.functions]
            key = next(((i.name, i.pid) for i in idents if i is not None), None)
        if key in answered:
            w.silent = not answered[key]


def server_ping_workers(host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> list[PingResult]:
    """Ping every worker process registered on one server (its control function there)."""
    conn = _connect(host, port, timeout)
    try:
        return _ping(conn, _control_functions(parse_workers(conn.text_command("workers", timeout))), timeout)
    finally:
        conn.close()


def server_snapshot(host: str, port: int, ping: bool = True, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Everything a dashboard shows of one server, over one connection: version, round trip,
    per-function counts, every connection and (with ``ping``) every worker process's ping."""
    conn = _connect(host, port, timeout)
    try:
        status = _status_on(conn, timeout)
        connections = parse_workers(conn.text_command("workers", timeout))
        pings = _ping(conn, _control_functions(connections), timeout) if ping else []
        _mark_silent(connections, pings)
    finally:
        conn.close()
    return {**status, "connections": connections, "pings": pings}


def server_control_call(host: str, port: int, function: str, payload: bytes, unique: str,
                        timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Send one foreground high-priority control job and return the worker's JSON answer.

    Raises ServerError when it fails or nobody answers within ``timeout`` (being a foreground
    job, an unanswered one leaves gearmand's queue when this connection closes).
    """
    conn = _connect(host, port, timeout, f"{MANAGER_CLIENT_ID}:control")
    try:
        conn.send(submit_command("high", False), task=function, unique=unique, data=payload)
        handle = conn.expect(JOB_CREATED, timeout).text("job_handle")
        deadline = time.monotonic() + timeout
        while True:
            pkt = conn.expect({WORK_COMPLETE, WORK_FAIL, WORK_EXCEPTION}, max(deadline - time.monotonic(), 0.001))
            if pkt.text("job_handle") == handle:
                break
    finally:
        conn.close()
    if pkt.cmd != WORK_COMPLETE:
        raise ServerError(f"the control job to {function} failed", f"{host}:{port}")
    try:
        reply = json.loads(pkt["data"])
    except (UnicodeDecodeError, ValueError, RecursionError):
        reply = None
    if not isinstance(reply, dict):
        raise ServerError(f"{function} answered something that is not a JSON object: {pkt['data'][:80]!r}",
                          f"{host}:{port}")
    return reply


def _job_states(conn: Connection, handles: list[str], timeout: float) -> dict[str, tuple[bool, bool]]:
    """handle -> (known, running) by GET_STATUS, pipelined: answers come back in order."""
    states: dict[str, tuple[bool, bool]] = {}
    for i in range(0, len(handles), _BATCH):
        chunk = handles[i:i + _BATCH]
        conn.send_raw(b"".join(pack(GET_STATUS, job_handle=h) for h in chunk))
        for _ in chunk:
            p = conn.expect(STATUS_RES, timeout)
            states[p.text("job_handle")] = (p["known"] == b"1", p["running"] == b"1")
    return states


_JOB_LINE = re.compile(r"([!-~]{1,64})\t([0-9]{1,20})\t([01])\t([0-9]{1,20})")  # handle retries ignore queued


def server_jobs(host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Every job gearmand holds (handle, retries, cancelled, running) and every unique key.

    gearmand's admin protocol never relates a handle to its unique key or function.
    """
    conn = _connect(host, port, timeout)
    try:
        jobs = []
        for line in conn.text_command("show jobs", timeout):
            m = _JOB_LINE.fullmatch(line)
            if m is None:
                raise ServerError(f"malformed 'show jobs' reply {line[:80]!r}: not a gearmand?")
            jobs.append({"handle": m.group(1), "retries": int(m.group(2)), "cancelled": m.group(3) == "1"})
        uniques = conn.text_command("show unique jobs", timeout)
        states = _job_states(conn, [j["handle"] for j in jobs], timeout)
    finally:
        conn.close()
    for j in jobs:
        known, running = states.get(j["handle"], (False, False))
        j["state"] = "cancelled" if j["cancelled"] else ("running" if running else ("queued" if known else "gone"))
    return {"jobs": jobs, "unique_keys": [u for u in uniques if u]}


def _drain(conn: Connection, function: str, limit: int, timeout: float) -> int:
    """Grab up to ``limit`` queued jobs of ``function`` and fail each; returns how many.

    gearmand hands out only queued jobs, so running ones are untouched; a grab that races a
    real worker just means that worker got the job first.
    """
    conn.send(CAN_DO, task=function)
    cleared = 0
    try:
        while cleared < limit:
            n = min(_DRAIN_BATCH, limit - cleared)
            conn.send_raw(pack(GRAB_JOB_UNIQ) * n)
            fails, empty = [], False
            for _ in range(n):
                p = conn.expect({JOB_ASSIGN_UNIQ, NO_JOB}, timeout)
                if p.cmd == NO_JOB:
                    empty = True
                else:
                    fails.append(pack(WORK_FAIL, job_handle=p["job_handle"]))
            if fails:
                conn.send_raw(b"".join(fails))
                cleared += len(fails)
            if empty:
                break
    finally:
        if conn.connected:
            conn.send(CANT_DO, task=function)
    return cleared


def server_clear(host: str, port: int, functions: list[str] | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Remove the queued jobs of ``functions`` (None: all) from one server.

    Returns {"cleared": {function: count}, "stranded": n}. ``stranded`` (clearing all only)
    counts queued jobs still listed afterwards that no grab can reach: those left behind by
    ``drop function``. No admin command removes them (``cancel job`` on them answers OK but
    keeps their sqlite rows); after a gearmand restart they are back under their function
    and the next clear removes them for good.
    """
    conn = _connect(host, port, timeout, f"{MANAGER_CLIENT_ID}:clear")
    try:
        status = {f.function: f for f in parse_status(conn.text_command("status", timeout))}
        names = list(status) if functions is None else list(dict.fromkeys(functions))
        counts: dict[str, int] = {}
        for name in names:
            st = status.get(name)
            # total counts running and cancelled jobs too: an upper bound, so a queue that
            # senders keep filling can't keep us here forever.
            counts[name] = _drain(conn, name, st.total, timeout) if st and st.total else 0
        # An echo answered means every WORK_FAIL before it was processed (and its row deleted).
        conn.send(ECHO_REQ, data=b"clear")
        conn.expect(ECHO_RES, timeout)
        stranded = _count_stranded(conn, timeout) if functions is None else 0
    finally:
        conn.close()
    return {"cleared": counts, "stranded": stranded}


def _count_stranded(conn: Connection, timeout: float) -> int:
    """Jobs still known, neither running nor cancelled, after every function was drained."""
    handles = []
    for line in conn.text_command("show jobs", timeout):
        parts = line.split("\t")
        if len(parts) >= 4 and parts[2] == "0":
            handles.append(parts[0])
    return sum(1 for known, running in _job_states(conn, handles, timeout).values() if known and not running)


def server_cancel(host: str, port: int, handle: str, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Cancel one queued job: 'cancelled', 'already cancelled', 'unknown' or 'running' (refused)."""
    conn = _connect(host, port, timeout)
    try:
        known, running = _job_states(conn, [handle], timeout).get(handle, (False, False))
        if not known:
            return "unknown"
        if running:
            return "running"
        if f"{handle}\t" in "\n".join(line for line in conn.text_command("show jobs", timeout)
                                      if line.split("\t")[2:3] == ["1"]) + "\n":
            return "already cancelled"
        reply = conn.text_command(f"cancel job {handle}", timeout)[0]
        if not reply.startswith("OK"):
            raise ServerError(f"cancel job {handle}: {reply}", conn.address)
        return "cancelled"
    finally:
        conn.close()


def server_maxqueue(host: str, port: int, function: str, size: int, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Limit the queue of ``function`` (0: no limit) until gearmand restarts.

    gearmand answers OK to ``maxqueue`` for a function it doesn't know yet and keeps no limit,
    so the function is created first the one way that works: a CAN_DO (then CANT_DO).
    (``create function`` drops the name's last character in gearmand 1.1.20.)
    """
    conn = _connect(host, port, timeout, f"{MANAGER_CLIENT_ID}:maxqueue")
    try:
        conn.send(CAN_DO, task=function)
        conn.send(CANT_DO, task=function)
        conn.echo(timeout)
        reply = conn.text_command(f"maxqueue {function} {size}", timeout)[0]
    finally:
        conn.close()
    if not reply.startswith("OK"):
        raise ServerError(f"maxqueue: {reply}", f"{host}:{port}")
    return "OK"


def submit_control(host: str, port: int, function: str, payload: bytes, unique: str,
                   timeout: float = DEFAULT_TIMEOUT) -> str:
    """Queue a high-priority background control job; returns its handle."""
    conn = _connect(host, port, timeout, f"{MANAGER_CLIENT_ID}:shutdown")
    try:
        conn.send(submit_command("high", True), task=function, unique=unique, data=payload)
        return conn.expect(JOB_CREATED, timeout).text("job_handle")
    finally:
        conn.close()


# -- every server -----------------------------------------------------------------------

class Admin:
    """The admin API over every configured server; each method returns one result per server."""

    def __init__(self, servers: list[tuple[str, int]], timeout: float = DEFAULT_TIMEOUT):
        if not servers:
            raise UsageError("no job servers to manage")
        if timeout <= 0:
            raise UsageError(f"timeout must be greater than 0, got {timeout:g}")
        self.servers = list(servers)
        self.timeout = timeout

    @classmethod
    def from_config(cls, config, timeout: float = DEFAULT_TIMEOUT) -> "Admin":
        return cls(config.server_addresses, timeout)

    def each(self, call: Callable[..., Any], *args: Any) -> list[ServerResult]:
        """``call(host, port, *args, timeout=)`` on every server in parallel, in config order."""
        def one(addr: tuple[str, int]) -> ServerResult:
            host, port = addr
            t0 = time.monotonic()
            try:
                value = call(host, port, *args, timeout=self.timeout)
            except GeartaskError as e:
                msg = str(e).removeprefix(f"{host}:{port}: ")
                return ServerResult(f"{host}:{port}", False, error=msg, elapsed=time.monotonic() - t0)
            except OSError as e:  # belt and braces: protocol.Connection wraps socket errors already
                return ServerResult(f"{host}:{port}", False, error=str(e), elapsed=time.monotonic() - t0)
            return ServerResult(f"{host}:{port}", True, value, elapsed=time.monotonic() - t0)

        if len(self.servers) == 1:
            return [one(self.servers[0])]
        with ThreadPoolExecutor(max_workers=min(len(self.servers), 16)) as pool:
            return list(pool.map(one, self.servers))

    # reads
    def status(self) -> list[ServerResult]:
        return self.each(server_status)

    def workers(self, ping: bool = True) -> list[ServerResult]:
        """Every connection on every server; with ``ping``, each marked ``silent`` or not."""
        return self.each(server_workers, ping)

    def ping_workers(self) -> list[ServerResult]:
        """Ping every worker process on every server: one PingResult per process and server.

        A process that does not answer within the timeout is silent there (its host is cut
        off, frozen or gone). The same probe as ``workers`` uses; for dashboards.
        """
        return self.each(server_ping_workers)

    def snapshot(self, ping: bool = True) -> list[ServerResult]:
        """Per server, over one connection: status, connections and worker pings (dashboards)."""
        return self.each(server_snapshot, ping)

    def jobs(self) -> list[ServerResult]:
        return self.each(server_jobs)

    def version(self) -> list[ServerResult]:
        return self.each(server_version)

    def ping(self) -> list[ServerResult]:
        return self.each(server_ping)

    # changes
    def clear(self, functions: list[str] | None = None) -> list[ServerResult]:
        for f in functions or []:
            check_function(f)
        return self.each(server_clear, functions or None)

    def maxqueue(self, function: str, size: int) -> list[ServerResult]:
        check_function(function)
        if not 0 <= size <= MAX_QUEUE:
            raise UsageError(f"maxqueue size must be 0-{MAX_QUEUE}, got {size}")
        return self.each(server_maxqueue, function, size)

    def cancel(self, handle: str) -> list[ServerResult]:
        """Cancel a queued job by handle. Handles are only unique per server ('H:host:N'), so a
        handle queued on two of the servers is refused: pick one with --servers."""
        check_handle(handle)
        probes = self.each(_probe_job, handle)
        queued_on = [r.server for r in probes if r.ok and r.value == (True, False)]
        if len(queued_on) > 1:
            raise UsageError(f"job handle {handle} is queued on {', '.join(queued_on)}: "
                             "choose one with --servers HOST:PORT")
        results = []
        for r in probes:
            if not r.ok:
                results.append(r)
            elif r.server in queued_on:
                host, _, port = r.server.rpartition(":")
                results.append(Admin([(host, int(port))], self.timeout).each(server_cancel, handle)[0])
            else:
                results.append(ServerResult(r.server, True, "running" if r.value[1] else "unknown",
                                            elapsed=r.elapsed))
        return results

    def stop_job(self, target: str) -> "StopReport":
        """Stop a running job, by handle or unique key, through the control function of the
        worker process whose ping lists it (the worker kills or abandons it and fails it with
        the reason ``stopped by operator``). Every running job with that unique key is stopped;
        a handle running on two servers (handles are per server) is refused."""
        if not target or len(target) > 1024 or not target.isprintable():
            raise UsageError(f"stop: bad handle or unique key {target[:80]!r}")
        pings = self.ping_workers()
        report = StopReport(target, errors={r.server: r.error for r in pings if not r.ok})
        found: dict[tuple, tuple[str, str, dict]] = {}  # (process, job server, handle) -> where to send
        for r in pings:
            for p in r.value if r.ok else []:
                for job in (p.reply or {}).get("running") or []:
                    if not isinstance(job, dict) or target not in (job.get("handle"), job.get("unique")):
                        continue
                    key = (p.name, p.pid, str(job.get("server")), str(job.get("handle")))
                    # the control function on the job's own server when pinged there, else the first
                    if key not in found or str(job.get("server")) == r.server:
                        found[key] = (r.server, p.function, job)
        by_handle = {}
        for key in found:
            if found[key][2].get("handle") == target:
                by_handle.setdefault(target, set()).add(key[2])
        if len(by_handle.get(target, ())) > 1:
            raise UsageError(f"job handle {target} runs on {', '.join(sorted(by_handle[target]))}: "
                             "choose one with --servers HOST:PORT or stop it by its unique key")
        for (name, pid, job_server, handle), (server, function, job) in found.items():
            stop = JobStop(handle, str(job.get("task")), str(job.get("unique")), job_server, name, pid, server)
            h, _, port = server.rpartition(":")
            try:
                reply = server_control_call(h, int(port), function, stop_request(handle, job_server),
                                            f"{CONTROL_PREFIX}:stop:{handle}"[:MAX_FUNCTION], self.timeout)
                stop.outcome = "stopped" if reply.get("stopped") is True else "not running"
            except GeartaskError as e:
                stop.outcome, stop.error = "failed", str(e)
            report.jobs.append(stop)
        return report

    # worker processes
    def processes(self, results: list[ServerResult] | None = None) -> list["WorkerProcess"]:
        """Worker processes grouped by (name, pid) over every server, from ``workers`` results."""
        return group_processes(self.workers(ping=False) if results is None else results)

    def shutdown(self, name: str | None = None, host: str | None = None, now: bool = False,
                 wait: float = 30.0, poll: float = 0.1, pid: int | None = None) -> "ShutdownReport":
        """Send each matching worker process one high-priority shutdown job; wait for it to leave.

        ``host`` matches any of a process's addresses (each server may see another one). One
        job per process, on the first server where its control function is registered (one
        whose address is ``host``, when given): a copy on another server would stay queued
        (and persisted) after the process is gone.
        """
        if wait < 0:
            raise UsageError(f"--wait must not be negative, got {wait:g}")
        if name is not None:
            check_worker_name(name)
        if host is not None:
            host = check_host(host)
        listing = self.workers(ping=False)
        report = ShutdownReport(errors={r.server: r.error for r in listing if not r.ok})
        payload = shutdown_request(now)
        unique = f"{CONTROL_PREFIX}:shutdown" + (":now" if now else "")
        for proc in group_processes(listing):
            if ((name and proc.name != name) or (host and host not in proc.ips) or not proc.control
                    or (pid is not None and proc.pid != pid)):
                continue
            # where to send: servers that see it at ``host`` first
            servers = sorted(proc.control, key=lambda srv: host is not None and
                             parse_control_function(proc.control[srv]).ip != host)
            shut = ProcessShutdown(proc.name, None, proc.pid, servers, ips=proc.ips)
            for server in servers:  # the first server that takes the job
                h, _, p = server.rpartition(":")
                try:
                    submit_control(h, int(p), proc.control[server], payload, unique, self.timeout)
                except GeartaskError as e:
                    shut.errors.append(str(e))
                    continue
                shut.sent_to, shut.outcome = server, "sent"
                shut.ip = parse_control_function(proc.control[server]).ip
                break
            else:
                shut.outcome = "not sent"
            report.processes.append(shut)

        pending = {(p.name, p.pid): p for p in report.processes if p.outcome == "sent"}
        if wait > 0 and pending:
            deadline = time.monotonic() + wait
            while pending:
                results = self.workers(ping=False)
                for r in results:
                    if not r.ok:
                        report.errors[r.server] = r.error
                alive = {(p.name, p.pid) for p in group_processes(results)}
                for key in [k for k in pending if k not in alive]:
                    pending.pop(key).outcome = "stopped"
                if not pending or time.monotonic() >= deadline:
                    break
                time.sleep(poll)
            for p in pending.values():
                p.outcome = "still running"
        return report


@dataclass
class WorkerProcess:
    """One worker process as the servers see it: its connections, addresses and control functions.

    Grouped by (name, pid): each server may see the process at another address. Two hosts
    running a process of the same name with the same pid (rare) show as one.
    """

    name: str
    pid: int
    ips: list[str] = field(default_factory=list)  # every address some server sees it at
    servers: list[str] = field(default_factory=list)  # servers it has connections on
    control: dict[str, str] = field(default_factory=dict)  # server -> its control function there
    connections: int = 0
    silent_on: list[str] = field(default_factory=list)  # servers where it did not answer a ping


def group_processes(results: Iterable[ServerResult]) -> list[WorkerProcess]:
    procs: dict[tuple[str, int], WorkerProcess] = {}
    for r in results:
        if not r.ok:
            continue
        for w in r.value:
            keys: dict[tuple[str, int], str | None] = {}
            if w.name is not None and w.pid is not None:
                keys[(w.name, w.pid)] = w.worker_ip
            for fn in w.functions:
                ident = parse_control_function(fn)
                if ident is not None:
                    keys[(ident.name, ident.pid)] = ident.ip
                    procs.setdefault((ident.name, ident.pid), WorkerProcess(ident.name, ident.pid)).control[
                        r.server] = fn
            for key, ip in keys.items():
                p = procs.setdefault(key, WorkerProcess(*key))
                if ip and ip not in p.ips:
                    p.ips.append(ip)
                if r.server not in p.servers:
                    p.servers.append(r.server)
                p.connections += 1
                if w.silent and r.server not in p.silent_on:
                    p.silent_on.append(r.server)
    for p in procs.values():
        p.ips.sort()
    return sorted(procs.values(), key=lambda p: (p.name, p.pid))


def _probe_job(host: str, port: int, handle: str, timeout: float = DEFAULT_TIMEOUT) -> tuple[bool, bool]:
    conn = _connect(host, port, timeout)
    try:
        return _job_states(conn, [handle], timeout)[handle]
    finally:
        conn.close()


@dataclass
class JobStop:
    handle: str
    task: str
    unique: str
    job_server: str  # where the job came from, as the worker names it
    name: str  # the worker process that ran it
    pid: int
    sent_to: str  # the server whose control function the stop went through
    outcome: str = "not sent"  # stopped | not running (finished before the stop came) | failed
    error: str | None = None


@dataclass
class StopReport:
    target: str
    jobs: list[JobStop] = field(default_factory=list)
    errors: dict[str, str | None] = field(default_factory=dict)  # server -> why it was unreachable

    @property
    def ok(self) -> bool:
        """Some worker ran it and every match was stopped."""
        return bool(self.jobs) and all(j.outcome == "stopped" for j in self.jobs)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "target": self.target, "jobs": [asdict(j) for j in self.jobs],
                "server_errors": self.errors}


@dataclass
class ProcessShutdown:
    name: str
    ip: str | None  # its address in the control function the job was sent to
    pid: int
    servers: list[str]  # where its control function is registered
    sent_to: str | None = None
    outcome: str = "not sent"  # sent (not waited for) | stopped | still running | not sent
    errors: list[str] = field(default_factory=list)
    ips: list[str] = field(default_factory=list)  # every address the servers see it at


@dataclass
class ShutdownReport:
    processes: list[ProcessShutdown] = field(default_factory=list)
    errors: dict[str, str | None] = field(default_factory=dict)  # server -> why it was unreachable

    @property
    def ok(self) -> bool:
        """Something matched, and every match stopped (or was sent to, without waiting)."""
        return (not self.errors and bool(self.processes)
                and all(p.outcome in ("stopped", "sent") for p in self.processes))

    def to_dict(self) -> dict:
        return {"processes": [asdict(p) for p in self.processes], "server_errors": self.errors}
