"""The dashboard's view of the fleet: one look at every server and worker each refresh.

A background thread asks every server (status, connections, a ping of each worker process;
one connection per server, with the manager's per-server deadline) and keeps the last look,
an hour of queue depths per function, and the workers' counters folded into fleet totals.
Pages and /metrics read the last look, so a slow or dead server never holds up a page.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from ..address import format_address
from ..fleet import Admin, PingResult, WorkerConnection, group_processes
from ..control import CONTROL_PREFIX, parse_control_function
from ..logs import get_logger
from ..targets import parse as parse_target
from ..metrics import MAX_LABEL, MAX_TASKS, FleetCounters, clean_tasks

HISTORY_SECONDS = 3600  # queue depth kept per function
HISTORY_STEP = 10.0  # seconds between kept points (an hour is 360 of them)
MAX_CHARTED = 200  # functions with a history; anyone can register names, memory must stay bounded

log = get_logger("geartask.dashboard")


def _number(value: Any, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) > 1e15:
        return None
    return kind(value)


def _running(job: dict) -> dict:
    """One entry of a ping's "running" list, as strings and a number."""
    out = {k: str(job[k])[:1024] if job.get(k) is not None else None for k in ("handle", "task", "unique", "server")}
    out["seconds"] = _number(job.get("seconds"), float)
    return out


REPLY_FIELDS = ("ok", "command", "worker", "name", "pid", "threads", "busy", "jobs_done", "started", "version")


def kept_reply(reply: dict) -> dict:
    """What a look keeps of a peer's ping reply: the documented scalar fields (text cut), its
    first MAX_TASKS task counters, cleaned, and its addresses; never the reply itself, which
    may be as big as the connection lets a peer send."""
    out: dict[str, Any] = {}
    for k in REPLY_FIELDS:
        v = reply.get(k)
        if isinstance(v, str):
            out[k] = v[:MAX_LABEL]
        elif v is None or isinstance(v, (bool, int, float)):
            out[k] = v
    ips = reply.get("ips")
    if isinstance(ips, list):
        out["ips"] = [str(i)[:64] for i in ips[:16]]
    if "tasks" in reply:
        tasks = reply.get("tasks")
        out["tasks"] = clean_tasks(tasks)
        if isinstance(tasks, dict) and len(tasks) > MAX_TASKS:
            out["tasks_dropped"] = len(tasks) - MAX_TASKS
    return out


def is_control(function: str) -> bool:
    return function.startswith(CONTROL_PREFIX + ":")


@dataclass
class Process:
    """One worker process as the dashboard shows it."""

    name: str
    pid: int
    host: str  # the address it is grouped under (the first a server sees it at)
    ips: list[str]
    servers: list[str]
    control: dict[str, str]  # server -> its control function there
    functions: list[str]  # job functions it registered (control functions left out)
    silent: bool  # registered, but answered no ping for two refreshes (or ever)
    last_seen: float | None  # wall time of its last answer
    threads: int | None = None
    busy: int | None = None
    jobs_done: int | None = None
    started: float | None = None
    running: list[dict] = field(default_factory=list)
    hostname: str = ""  # worker.host, from its TASK@host:HOST functions ("" none)
    labels: list[str] = field(default_factory=list)  # worker.labels, from its TASK@label:LABEL functions
    fleet: str = ""  # the config ``fleet`` its client id names ("" none)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Look:
    """Everything one refresh found."""

    taken_at: float  # wall time
    servers: list[dict]  # {server, up, error, version, rtt_ms, functions: [FunctionStatus]}
    processes: list[Process]
    others: list[dict]  # worker connections without a geartask identity (other Gearman workers)
    replies: list[tuple[str, dict]]  # (host, ping reply), one per answering process
    duration: float = 0.0  # seconds the look took

    def functions(self) -> list[dict]:
        """Per function: totals and per-server counts (control functions left out)."""
        out: dict[str, dict] = {}
        for s in self.servers:
            for f in s["functions"]:
                if is_control(f.function):
                    continue
                t = out.setdefault(f.function, {"function": f.function, "queued": 0, "running": 0, "workers": 0,
                                                "servers": {}})
                t["queued"] += f.queued
                t["running"] += f.running
                t["workers"] += f.workers
                t["servers"][s["server"]] = {"queued": f.queued, "running": f.running, "workers": f.workers}
        return list(out.values())

    def hidden_control_functions(self) -> int:
        return len({f.function for s in self.servers for f in s["functions"] if is_control(f.function)})


class FleetMonitor:
    """Looks at the fleet every ``refresh`` seconds in a thread; ``latest`` is the last look."""

    def __init__(self, admin: Admin, refresh: float, outcome_counts: Callable[[float], dict] | None = None):
        self.admin = admin
        self.refresh = refresh
        self.outcome_counts = outcome_counts  # since -> {(task, state): n}, from the outcome store
        self.counters = FleetCounters()
        self.history: dict[str, deque] = {}
        self._last_seen: dict[tuple[str, int], float] = {}
        self._missed: dict[tuple[str, int], int] = {}
        self._latest: Look | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poke = threading.Event()
        self._new = threading.Condition()
        self._thread: threading.Thread | None = None
        self.looks = 0

    # -- the thread -----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="fleet-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._poke.set()
        if self._thread is not None:
            self._thread.join(timeout=self.admin.timeout * 2 + 5)

    def poke(self) -> None:
        """Look again now (after an action changed something)."""
        self._poke.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.look()
            except Exception as e:  # a bug must not leave the dashboard showing a frozen look
                log.error("fleet look failed", error=repr(e))
            self._poke.wait(max(self.refresh - (time.monotonic() - t0), 0.05))
            self._poke.clear()

    def wait_for_look(self, after: int, timeout: float) -> bool:
        """Until a look newer than number ``after`` is done (tests, and actions that want fresh data)."""
        with self._new:
            return self._new.wait_for(lambda: self.looks > after, timeout)

    # -- one look -------------------------------------------------------------------------
    def look(self) -> Look:
        t0 = time.monotonic()
        results = self.admin.snapshot(ping=True)
        now = time.time()
        servers, listings = [], []
        pings: list[tuple[str, PingResult]] = []
        for r in results:
            entry: dict[str, Any] = {"server": r.server, "up": r.ok, "error": r.error, "version": None,
                                     "rtt_ms": None, "functions": []}
            if r.ok:
                entry.update(version=r.value["version"], rtt_ms=r.value["rtt_ms"], functions=r.value["functions"])
                pings.extend((r.server, p) for p in r.value["pings"])
            servers.append(entry)
            listings.append(r if not r.ok else type(r)(r.server, True, r.value["connections"]))
        processes, replies = self._processes(listings, pings, now)
        others = [{"server": r.server, "ip": w.ip, "client_id": w.client_id, "functions": w.functions}
                  for r in listings if r.ok for w in r.value
                  if w.name is None and w.functions and not any(parse_control_function(f) for f in w.functions)]
        self.counters.update([reply for _, reply in replies])
        look = Look(now, servers, processes, others, replies, duration=time.monotonic() - t0)
        self._record_history(look)
        with self._lock:
            self._latest = look
        with self._new:
            self.looks += 1
            self._new.notify_all()
        return look

    def _processes(self, listings: list, pings: list[tuple[str, PingResult]], now: float
                   ) -> tuple[list[Process], list[tuple[str, dict]]]:
        answers: dict[tuple[str, int], dict] = {}
        for _server, ping in pings:
            if ping.answered and ping.reply is not None:
                answers.setdefault((ping.name, ping.pid), ping.reply)
        functions: dict[tuple[str, int], set[str]] = {}
        for r in listings:
            if not r.ok:
                continue
            w: WorkerConnection
            for w in r.value:
                if w.name is not None and w.pid is not None:
                    functions.setdefault((w.name, w.pid), set()).update(f for f in w.functions if not is_control(f)
                                                                     and parse_target(f) is None)
        out: list[Process] = []
        replies: list[tuple[str, dict]] = []
        for proc in group_processes(listings):
            key = (proc.name, proc.pid)
            reply = answers.get(key)
            if reply is not None:
                self._last_seen[key] = now
                self._missed[key] = 0
            elif proc.control:  # registered a control function but did not answer it
                self._missed[key] = self._missed.get(key, 0) + 1
            host = proc.ips[0] if proc.ips else "?"
            p = Process(proc.name, proc.pid, host, proc.ips, proc.servers, proc.control,
                        sorted(functions.get(key, ())), silent=bool(proc.control) and (
                            key not in self._last_seen or self._missed.get(key, 0) >= 2),
                        last_seen=self._last_seen.get(key), hostname=proc.host, labels=proc.labels,
                        fleet=proc.fleet)
            if reply is not None:  # a peer's answer: only what has the documented shape is kept
                p.threads, p.busy, p.jobs_done = (_number(reply.get(k), int) for k in ("threads", "busy", "jobs_done"))
                p.started = _number(reply.get("started"), float)
                running = reply.get("running")
                p.running = [_running(j) for j in running[:1000] if isinstance(j, dict)] \
                    if isinstance(running, list) else []
                replies.append((host, kept_reply(reply)))
            out.append(p)
        live = {(p.name, p.pid) for p in out}
        for key in [k for k in self._last_seen if k not in live]:
            self._last_seen.pop(key, None)
            self._missed.pop(key, None)
        return out, replies

    def _record_history(self, look: Look) -> None:
        t = look.taken_at
        depth: dict[str, int] = {}
        for f in look.functions():
            depth[f["function"]] = f["queued"]
        with self._lock:
            for name in list(self.history) + [n for n in depth if n not in self.history]:
                points = self.history.get(name)
                if points is None:
                    if len(self.history) >= MAX_CHARTED:
                        continue
                    points = self.history[name] = deque(maxlen=int(HISTORY_SECONDS / HISTORY_STEP) + 1)
                value = depth.get(name, 0)
                if points and t - points[-1][0] < HISTORY_STEP:
                    # within one step keep the deepest queue seen, so a short spike still shows
                    points[-1] = (points[-1][0], max(points[-1][1], value))
                else:
                    points.append((t, value))
                while points and t - points[0][0] > HISTORY_SECONDS:
                    points.popleft()
                if name not in depth and all(v == 0 for _, v in points) and len(points) > 1:
                    del self.history[name]  # gone, and nothing to show

    # -- reading ----------------------------------------------------------------------------
    def latest(self, timeout: float | None = None) -> Look:
        """The last look; before the first one is done, wait for it (at most the deadline)."""
        with self._lock:
            look = self._latest
        if look is None:
            self.wait_for_look(0, self.admin.timeout * 2 + 1 if timeout is None else timeout)
            with self._lock:
                look = self._latest
        if look is None:  # still none: show every server as not answered yet
            look = Look(time.time(), [{"server": format_address(h, p), "up": False, "error": "no answer yet", "version": None,
                                       "rtt_ms": None, "functions": []} for h, p in self.admin.servers], [], [], [])
        return look

    def charts(self) -> dict[str, list[tuple[float, int]]]:
        with self._lock:
            return {name: list(points) for name, points in self.history.items()}

    def rates(self) -> dict:
        """Jobs per second over the last minute: from the workers' counters, and from the outcomes."""
        out: dict[str, Any] = {"workers": self.counters.rates(), "outcomes": None}
        if self.outcome_counts is not None:
            try:
                counts = self.outcome_counts(time.time() - 60)
            except Exception as e:  # the store may be busy or gone; the page still shows
                log.warning("outcome counts unavailable", error=str(e))
                counts = None
            if counts is not None:
                out["outcomes"] = {state: sum(n for (_, s), n in counts.items() if s == state) / 60.0
                                   for state in ("complete", "failed")}
        return out
