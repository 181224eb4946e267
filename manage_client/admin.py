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

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

from geartask.control import (CONTROL_PREFIX, WorkerIdentity, parse_client_id, parse_control_function,
                              shutdown_request)
from geartask.errors import GeartaskError, ServerError, UsageError
from geartask.protocol import (CAN_DO, CANT_DO, ECHO_REQ, ECHO_RES, GET_STATUS, GRAB_JOB_UNIQ, JOB_ASSIGN_UNIQ,
                               JOB_CREATED, NO_JOB, SET_CLIENT_ID, STATUS_RES, WORK_FAIL, Connection, pack,
                               submit_command)

DEFAULT_TIMEOUT = 3.0
MANAGER_CLIENT_ID = "geartask-manager"  # how the manager's own connections show in `workers`
_BATCH = 200  # GET_STATUS requests pipelined per round trip
# Grabs pipelined per round trip. Small on purpose: with the sqlite queue each WORK_FAIL costs
# gearmand a synchronous row delete (~2.5 ms here), and a batch must finish within the timeout.
_DRAIN_BATCH = 50


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


def parse_status(lines: list[str]) -> list[FunctionStatus]:
    """'FUNCTION\\tTOTAL\\tRUNNING\\tAVAILABLE_WORKERS' lines -> FunctionStatus list."""
    out = []
    for line in lines:
        parts = line.split("\t")
        if len(parts) != 4 or not all(p.strip().isdigit() for p in parts[1:]):
            continue  # gearmand never sends such a line; skip rather than fail the whole server
        total, running, workers = (int(p) for p in parts[1:])
        out.append(FunctionStatus(parts[0], max(total - running, 0), running, workers, total))
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


def parse_workers(lines: list[str]) -> list[WorkerConnection]:
    """'FD IP CLIENT_ID : FUNC FUNC...' lines -> WorkerConnection list."""
    out = []
    for line in lines:
        head, _, funcs = line.partition(" : ")
        if not _:
            head, funcs = line.rstrip(" :"), ""
        parts = head.split()
        fd = int(parts[0]) if parts and parts[0].isdigit() else None
        ip = parts[1] if len(parts) > 1 else ""
        client_id = " ".join(parts[2:]) if len(parts) > 2 else "-"
        w = WorkerConnection(fd, ip, client_id, funcs.split())
        ident = parse_client_id(client_id)
        if ident is not None:
            w.name, w.worker_ip, w.pid, w.thread = ident.name, ident.ip, ident.pid, ident.thread
        out.append(w)
    return out


def server_status(host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Round trip, version and per-function counts of one server."""
    conn = _connect(host, port, timeout)
    try:
        rtt = conn.echo(timeout)
        version = conn.text_command("version", timeout)[0]
        functions = parse_status(conn.text_command("status", timeout))
    finally:
        conn.close()
    return {"reachable": True, "version": version.removeprefix("OK ").strip(), "rtt_ms": round(rtt * 1000, 3),
            "functions": functions}


def server_workers(host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> list[WorkerConnection]:
    conn = _connect(host, port, timeout)
    try:
        return parse_workers(conn.text_command("workers", timeout))
    finally:
        conn.close()


def server_version(host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> str:
    conn = _connect(host, port, timeout)
    try:
        return conn.text_command("version", timeout)[0].removeprefix("OK ").strip()
    finally:
        conn.close()


def server_ping(host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> float:
    """Round-trip time of one ECHO in milliseconds."""
    conn = _connect(host, port, timeout)
    try:
        return round(conn.echo(timeout) * 1000, 3)
    finally:
        conn.close()


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


def server_jobs(host: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> dict:
    """Every job gearmand holds (handle, retries, cancelled, running) and every unique key.

    gearmand's admin protocol never relates a handle to its unique key or function.
    """
    conn = _connect(host, port, timeout)
    try:
        jobs = []
        for line in conn.text_command("show jobs", timeout):
            parts = line.split("\t")
            if len(parts) < 4:
                continue
            jobs.append({"handle": parts[0], "retries": int(parts[1]) if parts[1].isdigit() else parts[1],
                         "cancelled": parts[2] == "1"})
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

    def workers(self) -> list[ServerResult]:
        return self.each(server_workers)

    def jobs(self) -> list[ServerResult]:
        return self.each(server_jobs)

    def version(self) -> list[ServerResult]:
        return self.each(server_version)

    def ping(self) -> list[ServerResult]:
        return self.each(server_ping)

    # changes
    def clear(self, functions: list[str] | None = None) -> list[ServerResult]:
        return self.each(server_clear, functions or None)

    def maxqueue(self, function: str, size: int) -> list[ServerResult]:
        if not function or any(c.isspace() for c in function):
            raise UsageError(f"bad function name {function!r}")
        if size < 0:
            raise UsageError(f"maxqueue size must not be negative, got {size}")
        return self.each(server_maxqueue, function, size)

    def cancel(self, handle: str) -> list[ServerResult]:
        """Cancel a queued job by handle. Handles are only unique per server ('H:host:N'), so a
        handle queued on two of the servers is refused: pick one with --servers."""
        if not handle or any(c.isspace() for c in handle):
            raise UsageError(f"bad job handle {handle!r}")
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

    # shutdown
    def control_functions(self) -> tuple[dict[WorkerIdentity, list[str]], list[ServerResult]]:
        """Worker processes (identity, thread None) -> servers where their control function has a worker."""
        results = self.status()
        found: dict[WorkerIdentity, list[str]] = {}
        for r in results:
            if not r.ok:
                continue
            for f in r.value["functions"]:
                ident = parse_control_function(f.function)
                if ident is not None and f.workers > 0:
                    found.setdefault(ident, []).append(r.server)
        return found, results

    def connected_processes(self) -> tuple[set[WorkerIdentity], list[ServerResult]]:
        """Every worker process with at least one connection (by client id or control function)."""
        results = self.workers()
        alive: set[WorkerIdentity] = set()
        for r in results:
            if not r.ok:
                continue
            for w in r.value:
                if w.name is not None:
                    alive.add(WorkerIdentity(w.name, w.worker_ip, w.pid))
                for fn in w.functions:
                    ident = parse_control_function(fn)
                    if ident is not None:
                        alive.add(ident)
        return alive, results

    def shutdown(self, name: str | None = None, host: str | None = None, now: bool = False,
                 wait: float = 30.0, poll: float = 0.1) -> "ShutdownReport":
        """Send each matching worker process one high-priority shutdown job; wait for it to leave.

        One job per process, on the first server where its control function is registered: a
        copy on another server would stay queued (and persisted) after the process is gone.
        """
        if wait < 0:
            raise UsageError(f"--wait must not be negative, got {wait:g}")
        found, status_results = self.control_functions()
        report = ShutdownReport(errors={r.server: r.error for r in status_results if not r.ok})
        payload = shutdown_request(now)
        unique = f"{CONTROL_PREFIX}:shutdown" + (":now" if now else "")
        for ident, servers in sorted(found.items(), key=lambda kv: (kv[0].name, kv[0].ip, kv[0].pid)):
            if (name and ident.name != name) or (host and ident.ip != host):
                continue
            proc = ProcessShutdown(ident.name, ident.ip, ident.pid, servers)
            for server in servers:  # first server that takes the job
                h, _, p = server.rpartition(":")
                try:
                    submit_control(h, int(p), ident.control_function, payload, unique, self.timeout)
                except GeartaskError as e:
                    proc.errors.append(str(e))
                    continue
                proc.sent_to, proc.outcome = server, "sent"
                break
            else:
                proc.outcome = "not sent"
            report.processes.append(proc)

        pending = {(p.name, p.ip, p.pid): p for p in report.processes if p.outcome == "sent"}
        if wait > 0 and pending:
            deadline = time.monotonic() + wait
            while pending:
                alive, results = self.connected_processes()
                for r in results:
                    if not r.ok:
                        report.errors[r.server] = r.error
                for key in [k for k in pending if WorkerIdentity(*k) not in alive]:
                    pending.pop(key).outcome = "stopped"
                if not pending or time.monotonic() >= deadline:
                    break
                time.sleep(poll)
            for p in pending.values():
                p.outcome = "still running"
        return report


def _probe_job(host: str, port: int, handle: str, timeout: float = DEFAULT_TIMEOUT) -> tuple[bool, bool]:
    conn = _connect(host, port, timeout)
    try:
        return _job_states(conn, [handle], timeout)[handle]
    finally:
        conn.close()


@dataclass
class ProcessShutdown:
    name: str
    ip: str
    pid: int
    servers: list[str]  # where its control function is registered
    sent_to: str | None = None
    outcome: str = "not sent"  # sent (not waited for) | stopped | still running | not sent
    errors: list[str] = field(default_factory=list)


@dataclass
class ShutdownReport:
    processes: list[ProcessShutdown] = field(default_factory=list)
    errors: dict[str, str | None] = field(default_factory=dict)  # server -> why it was unreachable

    @property
    def ok(self) -> bool:
        return not self.errors and all(p.outcome in ("stopped", "sent") for p in self.processes)

    def to_dict(self) -> dict:
        return {"processes": [asdict(p) for p in self.processes], "server_errors": self.errors}
