"""What the fleet-wide calls return: one ServerResult per server, the worker processes seen
across servers, and the reports of ``stop`` and ``shutdown``. Their fields are the JSON the
``manage`` command prints (``--json``): a contract."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from ..control import parse_control_function


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


@dataclass
class FleetProcess:
    """One worker process as the servers see it: its connections, addresses and control functions.

    Grouped by (name, pid): each server may see the process at another address. Two hosts
    running a process of the same name with the same pid (rare) show as one. (The running
    process itself is geartask.worker.process.WorkerProcess.)
    """

    name: str
    pid: int
    ips: list[str] = field(default_factory=list)  # every address some server sees it at
    servers: list[str] = field(default_factory=list)  # servers it has connections on
    control: dict[str, str] = field(default_factory=dict)  # server -> its control function there
    connections: int = 0
    silent_on: list[str] = field(default_factory=list)  # servers where it did not answer a ping
    fleet: str = ""  # the config's ``fleet`` it says it belongs to ("" none, or a worker before fleets)
    host: str = ""  # worker.host, as its TASK@host:HOST functions name it ("" none)
    labels: list[str] = field(default_factory=list)  # worker.labels, from its TASK@label:LABEL functions


def group_processes(results: Iterable[ServerResult]) -> list[FleetProcess]:
    """Worker processes by (name, pid) over every server, from ``workers`` results."""
    procs: dict[tuple[str, int], FleetProcess] = {}
    for r in results:
        if not r.ok:
            continue
        for w in r.value:
            keys: dict[tuple[str, int], str | None] = {}
            if w.name is not None and w.pid is not None:
                keys[(w.name, w.pid)] = w.worker_ip
                procs.setdefault((w.name, w.pid), FleetProcess(w.name, w.pid)).fleet = w.fleet or ""
            for fn in w.functions:
                ident = parse_control_function(fn)
                if ident is not None:
                    keys[(ident.name, ident.pid)] = ident.ip
                    procs.setdefault((ident.name, ident.pid), FleetProcess(ident.name, ident.pid)).control[
                        r.server] = fn
            for key, ip in keys.items():
                p = procs.setdefault(key, FleetProcess(*key))
                if ip and ip not in p.ips:
                    p.ips.append(ip)
                if r.server not in p.servers:
                    p.servers.append(r.server)
                p.connections += 1
                if w.host and not p.host:
                    p.host = w.host
                p.labels.extend(x for x in w.labels if x not in p.labels)
                if w.silent and r.server not in p.silent_on:
                    p.silent_on.append(r.server)
    for p in procs.values():
        p.ips.sort()
        p.labels.sort()
    return sorted(procs.values(), key=lambda p: (p.name, p.pid))


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
    # sent (not waited for) | stopped | still running | not sent | unknown (its servers went away)
    outcome: str = "not sent"
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
