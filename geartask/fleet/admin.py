"""``Admin``: the admin API over every configured server, each call on all of them at once."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ..control import CONTROL_PREFIX, parse_control_function, shutdown_request, signed_request, stop_request
from ..address import format_address, split_address
from ..errors import GeartaskError, UsageError
from .checks import (MAX_FUNCTION, MAX_QUEUE, check_clear_function, check_function, check_handle, check_host,
                     check_worker_name)
from .reports import (FleetProcess, JobStop, ProcessShutdown, ServerResult, ShutdownReport, StopReport,
                      group_processes)
from .server import (DEFAULT_TIMEOUT, probe_job, server_cancel, server_clear, server_control_call, server_jobs,
                     server_maxqueue, server_ping, server_ping_workers, server_snapshot, server_status,
                     server_version, server_workers, submit_control)

if TYPE_CHECKING:
    from ..config import Config


class Admin:
    """The admin API over every configured server; each method returns one result per server."""

    def __init__(self, servers: Sequence[tuple[str, int]], timeout: float = DEFAULT_TIMEOUT, fleet: str | None = None,
                 key: Any = None):
        if not servers:
            raise UsageError("no job servers to manage")
        if timeout <= 0:
            raise UsageError(f"timeout must be greater than 0, got {timeout:g}")
        self.servers = list(servers)
        self.timeout = timeout
        # Only this fleet's workers are listed, counted and stopped; None: every worker. A
        # connection that is not a geartask worker's (no fleet to tell) is always listed.
        self.fleet = fleet
        self.key = key  # security.key: control jobs (ping, stop, shutdown) are signed with it

    def _control(self, payload: bytes, function: str) -> bytes:
        """A control job's payload for ``function``: addressed and signed when there is a key."""
        return payload if self.key is None else signed_request(payload, function, self.key)

    @classmethod
    def from_config(cls, config: Config, timeout: float = DEFAULT_TIMEOUT, any_fleet: bool = False) -> "Admin":
        """The config's servers; its ``fleet`` (when it names one, unless ``any_fleet``) filters
        workers; its ``security.key`` signs control jobs."""
        from ..trust.keys import signing_key
        fleet = getattr(config, "fleet", "")
        return cls(config.server_addresses, timeout, None if any_fleet or not fleet else fleet, key=signing_key(config))

    def mine(self, w: Any) -> bool:
        """Whether a WorkerConnection belongs to this Admin's fleet (always, without one)."""
        return self.fleet is None or w.fleet is None or w.fleet == self.fleet

    def _only_mine(self, results: list[ServerResult], key: str | None = None) -> list[ServerResult]:
        """Other fleets' connections (and their pings) out of workers/snapshot results; each
        function's worker count recounted from what is left."""
        if self.fleet is None:
            return results
        for r in results:
            if not r.ok:
                continue
            conns = r.value if key is None else r.value[key]
            kept = [w for w in conns if self.mine(w)]
            if key is None:
                r.value = kept
                continue
            r.value[key] = kept
            procs = {(w.name, w.pid) for w in kept}
            if "pings" in r.value:
                r.value["pings"] = [p for p in r.value["pings"] if (p.name, p.pid) in procs]
            for f in r.value.get("functions", []):
                f.workers = sum(1 for w in kept if f.function in w.functions)
        return results

    def each(self, call: Callable[..., Any], *args: Any) -> list[ServerResult]:
        """``call(host, port, *args, timeout=)`` on every server in parallel, in config order."""
        def one(addr: tuple[str, int]) -> ServerResult:
            host, port = addr
            t0 = time.monotonic()
            try:
                value = call(host, port, *args, timeout=self.timeout)
            except GeartaskError as e:
                msg = str(e).removeprefix(f"{format_address(host, port)}: ")
                return ServerResult(format_address(host, port), False, getattr(e, "partial", None), error=msg,
                                    elapsed=time.monotonic() - t0)
            except OSError as e:  # belt and braces: protocol.Connection wraps socket errors already
                return ServerResult(format_address(host, port), False, error=str(e), elapsed=time.monotonic() - t0)
            return ServerResult(format_address(host, port), True, value, elapsed=time.monotonic() - t0)

        if len(self.servers) == 1:
            return [one(self.servers[0])]
        with ThreadPoolExecutor(max_workers=min(len(self.servers), 16)) as pool:
            return list(pool.map(one, self.servers))

    # reads
    def status(self) -> list[ServerResult]:
        if self.fleet is not None:  # workers counted per fleet: gearmand's counts are everyone's
            results = self._only_mine(self.each(server_snapshot, False), "connections")
            for r in results:
                if r.ok:
                    r.value = {"reachable": True, **{k: v for k, v in r.value.items() if k not in
                                                     ("connections", "pings")}}
            return results
        return self.each(server_status)

    def workers(self, ping: bool = True) -> list[ServerResult]:
        """Every connection on every server; with ``ping``, each marked ``silent`` or not."""
        return self._only_mine(self.each(server_workers, ping, self.key))

    def ping_workers(self) -> list[ServerResult]:
        """Ping every worker process on every server: one PingResult per process and server.

        A process that does not answer within the timeout is silent there (its host is cut
        off, frozen or gone). The same probe as ``workers`` uses; for dashboards.
        """
        return self.each(server_ping_workers, self.key)

    def snapshot(self, ping: bool = True) -> list[ServerResult]:
        """Per server, over one connection: status, connections and worker pings (dashboards)."""
        return self._only_mine(self.each(server_snapshot, ping, self.key), "connections")

    def jobs(self) -> list[ServerResult]:
        return self.each(server_jobs)

    def version(self) -> list[ServerResult]:
        return self.each(server_version)

    def ping(self) -> list[ServerResult]:
        return self.each(server_ping)

    # changes
    def clear(self, functions: list[str] | None = None) -> list[ServerResult]:
        for f in functions or []:
            check_clear_function(f)
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
        probes = self.each(probe_job, handle)
        queued_on = [r.server for r in probes if r.ok and r.value == (True, False)]
        if len(queued_on) > 1:
            raise UsageError(f"job handle {handle} is queued on {', '.join(queued_on)}: "
                             "choose one with --servers HOST:PORT")
        results = []
        for r in probes:
            if not r.ok:
                results.append(r)
            elif r.server in queued_on:
                results.append(Admin([split_address(r.server)], self.timeout).each(server_cancel, handle)[0])
            else:
                results.append(ServerResult(r.server, True, "running" if r.value[1] else "unknown",
                                            elapsed=r.elapsed))
        return results

    def stop_job(self, target: str) -> StopReport:
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
        by_handle: dict[str, set[str]] = {}
        for key in found:
            if found[key][2].get("handle") == target:
                by_handle.setdefault(target, set()).add(key[2])
        if len(by_handle.get(target, ())) > 1:
            raise UsageError(f"job handle {target} runs on {', '.join(sorted(by_handle[target]))}: "
                             "choose one with --servers HOST:PORT or stop it by its unique key")
        for (name, pid, job_server, handle), (server, function, job) in found.items():
            stop = JobStop(handle, str(job.get("task")), str(job.get("unique")), job_server, name, pid, server)
            h, port = split_address(server)
            try:
                reply = server_control_call(h, port, function, self._control(stop_request(handle, job_server), function),
                                            f"{CONTROL_PREFIX}:stop:{handle}"[:MAX_FUNCTION], self.timeout)
                stop.outcome = "stopped" if reply.get("stopped") is True else "not running"
            except GeartaskError as e:
                stop.outcome, stop.error = "failed", str(e)
            report.jobs.append(stop)
        return report

    # worker processes
    def processes(self, results: list[ServerResult] | None = None) -> list[FleetProcess]:
        """Worker processes grouped by (name, pid) over every server, from ``workers`` results."""
        return group_processes(self.workers(ping=False) if results is None else results)

    def shutdown(self, name: str | list[str] | None = None, host: str | list[str] | None = None, now: bool = False,
                 wait: float = 30.0, poll: float = 0.1, pid: int | None = None,
                 fleet: str | None = None) -> ShutdownReport:
        """Send each matching worker process one high-priority shutdown job; wait for it to leave.

        ``host`` matches any of a process's addresses (each server may see another one). One
        job per process, on the first server where its control function is registered (one
        whose address is ``host``, when given): a copy on another server would stay queued
        (and persisted) after the process is gone.
        """
        if wait < 0:
            raise UsageError(f"--wait must not be negative, got {wait:g}")
        # each may be given several times (--name w1 --name w2): a process matching any of them
        names = [check_worker_name(n) for n in ([name] if isinstance(name, str) else name or [])]
        hosts = [check_host(h) for h in ([host] if isinstance(host, str) else host or [])]
        host = hosts[0] if len(hosts) == 1 else None  # where to send, when one address is named
        listing = self.workers(ping=False)
        report = ShutdownReport(errors={r.server: r.error for r in listing if not r.ok})
        payload = shutdown_request(now)
        unique = f"{CONTROL_PREFIX}:shutdown" + (":now" if now else "")
        for proc in group_processes(listing):
            if ((names and proc.name not in names) or (hosts and not set(hosts) & set(proc.ips)) or not proc.control
                    or (pid is not None and proc.pid != pid) or (fleet is not None and proc.fleet != fleet)):
                continue
            # where to send: servers that see it at ``host`` first
            servers = sorted(proc.control, key=lambda srv: host is not None and
                             getattr(parse_control_function(proc.control[srv]), "ip", None) != host)
            shut = ProcessShutdown(proc.name, None, proc.pid, servers, ips=proc.ips)
            for server in servers:  # the first server that takes the job
                h, p = split_address(server)
                try:
                    submit_control(h, p, proc.control[server], self._control(payload, proc.control[server]), unique,
                                   self.timeout)
                except GeartaskError as e:
                    shut.errors.append(str(e))
                    continue
                shut.sent_to, shut.outcome = server, "sent"
                identity = parse_control_function(proc.control[server])
                shut.ip = identity.ip if identity else None
                break
            else:
                shut.outcome = "not sent"
            report.processes.append(shut)

        pending = {(p.name, p.pid): p for p in report.processes if p.outcome == "sent"}
        seen_on = {(p.name, p.pid): set(p.servers) for p in group_processes(listing)}
        if wait > 0 and pending:
            deadline = time.monotonic() + wait
            gone: dict[str, str | None] = {}  # servers that could not be asked on the last round
            while pending:
                results = self.workers(ping=False)
                gone = {r.server: r.error for r in results if not r.ok}
                report.errors.update(gone)
                alive = {(p.name, p.pid) for p in group_processes(results)}
                # Gone from the listing counts only where a listing came: a server that died says
                # nothing about the workers it had (one may still be in its grace period).
                for key in [k for k in pending if k not in alive and seen_on.get(k, set()) - set(gone)]:
                    pending.pop(key).outcome = "stopped"
                if not pending or time.monotonic() >= deadline:
                    break
                time.sleep(poll)
            for key, left in pending.items():
                lost = sorted(seen_on.get(key, set()) & set(gone))
                if lost and not seen_on.get(key, set()) - set(gone):
                    left.outcome = "unknown"
                    left.errors.append(f"server gone: {', '.join(lost)} could not be asked whether it stopped")
                else:
                    left.outcome = "still running"
        return report
