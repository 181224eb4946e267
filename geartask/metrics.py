"""Prometheus metrics from the workers' own counters (their ping replies) and the servers' status.

Workers keep per-task counters in memory and say them in every ping reply; nothing is sent
per job. The dashboard pings every refresh and folds the counters into fleet totals that
only grow (``FleetCounters``), and a worker with ``worker.metrics_listen`` serves its own
(``start_worker_metrics``). Ping replies are peer input: anything malformed is skipped.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

OUTCOMES = ("complete", "failed", "retried")
MAX_TASKS = 200  # task names per process; a reply with more is cut (a hostile or broken peer)
MAX_FLEET_TASKS = 2000  # task names in the fleet totals; more are counted as dropped, not kept
TASK_EXPIRY = 3600.0  # seconds: a task no process has reported for this long leaves the totals
MAX_FUNCTION_SERIES = 2000  # functions per server in /metrics (the most queued first); the rest counted
MAX_BUCKETS = 64
MAX_LABEL = 512


def _count(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return None
    return float(value)


def _le(key: Any) -> float | None:
    try:
        le = float(key)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(le) else le


def clean_tasks(tasks: Any) -> dict[str, dict]:
    """A ping reply's ``tasks`` -> {task: {complete, failed, retried, seconds_sum, buckets: {le: n}}},
    keeping only well-formed numbers (``le`` as float, +Inf included)."""
    out: dict[str, dict] = {}
    if not isinstance(tasks, dict):
        return out
    for n, (task, c) in enumerate(tasks.items()):
        if n >= MAX_TASKS:
            break
        if not isinstance(task, str) or not isinstance(c, dict) or len(task) > MAX_LABEL:
            continue
        entry: dict[str, Any] = {k: _count(c.get(k)) or 0.0 for k in (*OUTCOMES, "seconds_sum")}
        buckets: dict[float, float] = {}
        if isinstance(c.get("buckets"), dict):
            for key, value in list(c["buckets"].items())[:MAX_BUCKETS]:
                le, count = _le(key), _count(value)
                if le is not None and count is not None:
                    buckets[le] = count
        entry["buckets"] = buckets
        out[task] = entry
    return out


def _zero() -> dict:
    return {**{k: 0.0 for k in (*OUTCOMES, "seconds_sum")}, "buckets": {}}


class FleetCounters:
    """Fleet totals that only grow, from the per-process counters in ping replies.

    Each process (name, pid, start time) is remembered with its last counters; what grew since
    is added to the totals, so a process that exits keeps its share and a new one adds all it
    did before it was first seen. Jobs a process finished between its last ping and its exit
    are not counted. Thread-safe.
    """

    def __init__(self, window: float = 60.0):
        self.window = window
        self.totals: dict[str, dict] = {}
        self._last: dict[tuple, dict[str, dict]] = {}
        self._seen: dict[tuple, float] = {}
        self._history: deque[tuple[float, float, float]] = deque()  # (t, complete, failed)
        self._lock = threading.Lock()
        self.reporting = False  # some worker's reply had counters at all
        self._task_seen: dict[str, float] = {}  # task -> when a process last reported it
        self.dropped = 0  # task names not kept: over MAX_FLEET_TASKS (anyone can invent names)

    def update(self, replies: Iterable[dict], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        latest: dict[tuple, dict[str, dict]] = {}
        for reply in replies:
            if not isinstance(reply, dict) or "tasks" not in reply:
                continue
            key = (str(reply.get("name"))[:MAX_LABEL], str(reply.get("pid"))[:64], str(reply.get("started"))[:64])
            raw, cut = reply.get("tasks"), reply.get("tasks_dropped")  # tasks_dropped: the dashboard's own cut
            if isinstance(cut, int) and not isinstance(cut, bool) and cut > 0:
                self.dropped += cut
            elif isinstance(raw, dict) and len(raw) > MAX_TASKS:
                self.dropped += len(raw) - MAX_TASKS
            tasks = clean_tasks(raw)
            merged = latest.setdefault(key, {})
            for task, c in tasks.items():  # the same process answers on every server: take the max
                m = merged.setdefault(task, _zero())
                for k in (*OUTCOMES, "seconds_sum"):
                    m[k] = max(m[k], c[k])
                for le, n in c["buckets"].items():
                    m["buckets"][le] = max(m["buckets"].get(le, 0.0), n)
        with self._lock:
            self.reporting = self.reporting or bool(latest)
            for task in [t for t, seen in self._task_seen.items() if now - seen > TASK_EXPIRY]:
                self._task_seen.pop(task, None)  # nobody reports it: its total goes (memory stays bounded)
                self.totals.pop(task, None)
            for key, tasks in latest.items():
                before = self._last.get(key, {})
                for task, c in tasks.items():
                    prev = before.get(task, _zero())
                    total = self.totals.get(task)
                    if total is None:
                        if len(self.totals) >= MAX_FLEET_TASKS:
                            self.dropped += 1
                            continue
                        total = self.totals[task] = _zero()
                    self._task_seen[task] = now
                    for k in (*OUTCOMES, "seconds_sum"):
                        total[k] += max(c[k] - prev[k], 0.0)
                    for le, n in c["buckets"].items():
                        total["buckets"][le] = total["buckets"].get(le, 0.0) + max(n - prev["buckets"].get(le, 0.0), 0.0)
                self._last[key] = tasks
                self._seen[key] = now
            for key in [k for k, t in self._seen.items() if now - t > TASK_EXPIRY]:  # gone for an hour
                self._last.pop(key, None)
                self._seen.pop(key, None)
            complete = sum(t["complete"] for t in self.totals.values())
            failed = sum(t["failed"] for t in self.totals.values())
            self._history.append((now, complete, failed))
            while len(self._history) > 2 and now - self._history[1][0] >= self.window:
                self._history.popleft()

    def rates(self) -> dict | None:
        """Jobs per second completed and failed over the last ``window`` (None: no counters yet)."""
        with self._lock:
            if not self.reporting or len(self._history) < 2:
                return None
            (t0, c0, f0), (t1, c1, f1) = self._history[0], self._history[-1]
        span = max(t1 - t0, 1e-9)
        return {"complete": (c1 - c0) / span, "failed": (f1 - f0) / span, "seconds": round(span, 1)}

    def snapshot(self) -> dict[str, dict]:
        with self._lock:
            return {task: {**c, "buckets": dict(c["buckets"])} for task, c in self.totals.items()}


def job_families(tasks: dict[str, dict]) -> list:
    """``geartask_jobs_total{task, outcome}`` and ``geartask_job_duration_seconds{task}``."""
    jobs = CounterMetricFamily("geartask_jobs", "Jobs finished by the workers, by task and outcome "
                               "(retried: attempts that failed and were tried again).", labels=["task", "outcome"])
    duration = HistogramMetricFamily("geartask_job_duration_seconds", "Time the workers spent running jobs, by task.",
                                     labels=["task"])
    for task in sorted(tasks):
        c = tasks[task]
        for outcome in OUTCOMES:
            jobs.add_metric([task, outcome], c[outcome])
        if c["buckets"]:
            les = sorted(c["buckets"])
            buckets, running = [], 0.0
            for le in les:  # cumulative, as Prometheus wants; a peer's dip is flattened
                running = max(running, c["buckets"][le])
                buckets.append(("+Inf" if le == math.inf else repr(le), running))
            if les[-1] != math.inf:
                buckets.append(("+Inf", running))
            duration.add_metric([task], buckets, sum_value=c["seconds_sum"])
    return [jobs, duration]


def worker_families(replies: Iterable[tuple[str, dict]]) -> list:
    """``geartask_worker_threads{host, name}`` and ``geartask_worker_busy_threads{host, name}``
    from (host IP, ping reply) pairs, one per process; processes of one name on one host add up."""
    sums: dict[tuple[str, str], list[float]] = {}
    for host, reply in replies:
        s = sums.setdefault((host, str(reply.get("name"))[:MAX_LABEL]), [0.0, 0.0])
        s[0] += _count(reply.get("threads")) or 0.0
        s[1] += _count(reply.get("busy")) or 0.0
    threads = GaugeMetricFamily("geartask_worker_threads", "Job threads of the worker processes.",
                                labels=["host", "name"])
    busy = GaugeMetricFamily("geartask_worker_busy_threads", "Job threads running a job now.", labels=["host", "name"])
    for (host, name), (n, b) in sorted(sums.items()):
        threads.add_metric([host, name], n)
        busy.add_metric([host, name], b)
    return [threads, busy]


def server_families(servers: Iterable[dict]) -> list:
    """From the dashboard's per-server view ({server, up, rtt_ms, functions: [FunctionStatus]})."""
    up = GaugeMetricFamily("geartask_server_up", "1 when the job server answered the last look.", labels=["server"])
    rtt = GaugeMetricFamily("geartask_server_rtt_seconds", "Round trip of an admin command to the job server.",
                            labels=["server"])
    fams = {k: GaugeMetricFamily(f"geartask_function_{k}", doc, labels=["server", "function"]) for k, doc in (
        ("queued", "Jobs waiting for a worker."), ("running", "Jobs a worker is running."),
        ("workers", "Worker connections able to run the function."))}
    dropped = GaugeMetricFamily("geartask_function_series_dropped", f"Functions left out of the geartask_function_* "
                                f"series: past {MAX_FUNCTION_SERIES} per server (the least queued).",
                                labels=["server"])
    for s in servers:
        up.add_metric([s["server"]], 1.0 if s["up"] else 0.0)
        if s["up"]:
            rtt.add_metric([s["server"]], s["rtt_ms"] / 1000)
            functions = [f for f in s["functions"] if not f.function.startswith("geartask.control:")]
            # (control functions: one per worker process, plumbing, and a new series at every restart)
            if len(functions) > MAX_FUNCTION_SERIES:  # anyone can register names: keep the busiest
                functions = sorted(functions, key=lambda f: (-f.queued, -f.running, -f.workers, f.function))
            for f in functions[:MAX_FUNCTION_SERIES]:
                for k, fam in fams.items():
                    fam.add_metric([s["server"], f.function], getattr(f, k))
            dropped.add_metric([s["server"]], max(len(functions) - MAX_FUNCTION_SERIES, 0))
    return [up, rtt, *fams.values(), dropped]


def dashboard_families(counters: "FleetCounters") -> list:
    """The dashboard's own limits at work: task names it did not keep."""
    fam = CounterMetricFamily("geartask_dashboard_task_names_dropped", f"Task names in ping replies not kept: past "
                              f"{MAX_TASKS} per process or {MAX_FLEET_TASKS} in the fleet.")
    fam.add_metric([], counters.dropped)
    return [fam]


class FamiliesCollector(Collector):
    """A prometheus_client collector that asks ``families()`` at every scrape."""

    def __init__(self, families: Callable[[], list]):
        self._families = families

    def collect(self):
        yield from self._families()


def registry_for(families: Callable[[], list]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FamiliesCollector(families))
    return registry


def start_worker_metrics(listen: str, ping_reply: Callable[[], dict]):
    """Serve one worker process's own /metrics on ``listen`` ('host:port', worker.metrics_listen),
    from its ping reply at each scrape; returns the HTTP server (``shutdown()`` stops it)."""
    from prometheus_client import start_http_server

    from .config import parse_hostport
    from .errors import UsageError

    host, port = parse_hostport(listen, "worker.metrics_listen")

    def families() -> list:
        reply = ping_reply()
        ips = reply.get("ips") or ["127.0.0.1"]
        return job_families(clean_tasks(reply.get("tasks"))) + worker_families([(str(ips[0]), reply)])

    try:
        server, _thread = start_http_server(port, addr=host, registry=registry_for(families))
    except OSError as e:
        raise UsageError(f"worker.metrics_listen {listen}: cannot listen there: {e.strerror or e}") from None
    return server
