"""A worker process: its job threads, control thread and watchdog, from start to exit."""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from .. import gearman as gp
from ..address import format_host
from ..control import WorkerIdentity
from ..errors import PluginError
from ..logs import get_logger
from ..plugins import is_reserved_task
from ..shell.task import ShellTask

from .budget import UNLIMITED, JobBudget
from .control import ControlLoop, ping_reply
from .errors import WorkerFailed
from .grab import GrabLoop, Outage, RoundTrips
from .groups import ThreadGroup, plan_groups
from .isolate import IsolatedTask
from .job import Job
from .outcomes import HeldAnswers
from .runner import JobRunner, UnansweredJobs
from .stats import TaskCounters
from .watchdog import Watchdog

if TYPE_CHECKING:
    from ..config import Config

log = get_logger("geartask.worker")

BUILTIN_TASKS = ("shell",)


def worker_targets(config: Config) -> tuple[str, tuple[str, ...]]:
    """The host and labels a worker announces (worker.host, default the machine's FQDN; an FQDN
    that is 'localhost' (an /etc/hosts that maps the name to 127.0.0.1 first) or outside the
    targets' charset falls back to the host name, else to none)."""
    from ..targets import machine_host
    labels = tuple(dict.fromkeys(config.worker.labels))
    if config.worker.host:
        return config.worker.host, labels
    host = machine_host()
    if not host:
        log.warning("no usable host name for targeted jobs; set worker.host", fqdn=socket.getfqdn()[:80])
    return host, labels


class WorkerProcess:
    """N job threads, one control thread and a watchdog, with a shutdown that loses nothing.

    ``tasks`` maps task names to callables ``fn(job)``; the built-in ``shell`` task is added.
    Every job thread holds a connection to every server (GrabLoop); the tasks of
    ``worker.tasks`` get threads of their own, the other tasks share the rest (plan_groups).
    The control thread serves only this process's control function (ControlLoop), so
    shutdown, ping and stop are answered at once even when every job thread is busy.

    ``start()`` starts the threads; ``wait()`` blocks until a shutdown (request_shutdown:
    a control job, a signal, ``max_jobs`` jobs done) and returns 0 once in-flight jobs have
    finished within ``worker.grace`` (past it, their commands are killed and their connections
    closed, so gearmand gives them to another worker); ``close()`` frees what is left.
    """

    def __init__(self, config: Config, name: str, threads: int, tasks: dict[str, Callable], max_jobs: int | None = None,
                 sinks: Any = None):
        self.config = config
        self.name = name
        self.threads_wanted = threads
        reserved = [t for t in tasks if is_reserved_task(t)]
        if reserved:
            raise PluginError(f"task name {reserved[0]!r} is geartask's own (the shell task or a control function)")
        self.groups: list[ThreadGroup] = self.plan(config, threads, tasks)
        # The IP part is per connection (see GrabLoop._connect); ips collects them for the label.
        self.identity = WorkerIdentity(name, "", os.getpid(), fleet=getattr(config, "fleet", ""))
        self.ips: frozenset[str] = frozenset()
        self.label = f"{name}::{self.identity.pid}"
        self.targets = worker_targets(config)  # (host, labels): TASK@host:/TASK@label: functions too
        self.keepalive = gp.keepalive_for(config.worker.keepalive)
        self.tasks = dict(tasks)
        self.shell_task = self.tasks["shell"] = ShellTask(config.worker, self.label)
        # Tasks that end themselves at their timeout: the watchdog leaves them alone.
        self.own_timeout = {"shell"} | {t for t, fn in self.tasks.items() if isinstance(fn, IsolatedTask)}
        self.outage = Outage()
        self.round_trips = RoundTrips()  # each server's measured round trip, shared by the threads' links
        self.unanswered = UnansweredJobs()
        self.runner = JobRunner(config, self.tasks, self.label, self.unanswered, sinks)
        self.max_jobs = config.worker.max_jobs if max_jobs is None else max_jobs
        self.budget = JobBudget(self.max_jobs, self._max_jobs_done) if self.max_jobs else UNLIMITED
        self.stopping = threading.Event()  # job threads: take no new jobs
        self.finished = threading.Event()  # control thread and watchdog: the process is done
        self.cancel_jobs = threading.Event()  # running jobs: cancelled (their job.cancel is set too)
        self.now_requested = threading.Event()
        self._stop_r, self._stop_w = os.pipe()
        self._fin_r, self._fin_w = os.pipe()
        self.job_threads: list[GrabLoop] = []
        self.counters: list[TaskCounters] = []  # every job thread's, replaced ones too (for ping)
        self._side_counters = TaskCounters(self.tasks)  # failures the watchdog answered (under _lock)
        self.counters.append(self._side_counters)
        self._group_of: dict[int, ThreadGroup] = {}
        self.control: GrabLoop | None = None
        self.watchdog = Watchdog(self)
        self.shutdown_reason = ""
        self.metrics_server = None  # worker.metrics_listen's HTTP server
        trust = self.runner.trust  # outcome jobs are signed for "report" with security.key
        self.held = HeldAnswers(sign=trust.sign_report if trust.key is not None else None)  # background
        # jobs' answers waiting to share an outcome job
        self.fatal_reason: str | None = None
        self.started_at = time.time()
        self._lock = threading.Lock()

    @staticmethod
    def plan(config: Config, threads: int, tasks: dict[str, Callable] | list[str]) -> list[ThreadGroup]:
        """Which threads serve which tasks (the built-in ones included). ConfigError for a
        ``worker.tasks`` the worker can't follow: check it before starting anything."""
        return plan_groups(config, threads, sorted({*tasks, *BUILTIN_TASKS}))

    # -- identity --------------------------------------------------------------------
    def saw_ip(self, ip: str, server: str) -> None:
        """A connection's local address: the label (in results and logs) shows every one."""
        if ip in self.ips:
            return
        with self._lock:
            if ip in self.ips:
                return
            self.ips = self.ips | {ip}
            self.label = f"{self.name}:{','.join(format_host(i) for i in sorted(self.ips))}:{self.identity.pid}"
            self.runner.label = self.label
            self.shell_task.worker_label = self.label
        log.info("connected from a new local address", ip=ip, server=server)

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        if self.config.worker.metrics_listen:  # before the threads: a port it can't take fails the start
            from ..metrics import start_worker_metrics
            self.metrics_server = start_worker_metrics(self.config.worker.metrics_listen, lambda: ping_reply(self))
        index = 0
        for group in self.groups:
            for _ in range(group.threads):
                index += 1
                self._group_of[index] = group
                self.job_threads.append(self._job_thread(index))
        # Thread index 0 is the control connection: it serves only this process's control function.
        self.control = ControlLoop(self, 0, [], self.finished, self._fin_r, name="control",
                                   round_trips=self.round_trips)
        for t in self.job_threads:
            t.start()
        self.control.start()
        self.watchdog.start()
        dedicated = {g.tasks[0]: g.threads for g in self.groups if g.dedicated}
        log.info("worker started", worker=self.name, pid=self.identity.pid, threads=self.threads_wanted,
                 servers=self.config.servers, tasks=sorted(self.tasks), isolated=sorted(self.own_timeout - {"shell"}),
                 keepalive=self.keepalive.bound, control=self.identity.at("<ip>").control_function,
                 **({"dedicated": dedicated} if dedicated else {}),
                 **({"max_jobs": self.max_jobs} if self.max_jobs else {}))

    def _job_thread(self, index: int) -> GrabLoop:
        group = self._group_of[index]
        t = GrabLoop(self, index, group.tasks, self.stopping, self._stop_r, name=f"job-{index}",
                     sleepers=group.sleepers, round_trips=self.round_trips)
        self.counters.append(t.counters)
        return t

    def replace_thread(self, old: GrabLoop) -> GrabLoop:
        """Start a new thread in the place of ``old`` (abandoned by the watchdog or a stop)."""
        new = self._job_thread(old.index)
        with self._lock:
            self.job_threads[self.job_threads.index(old)] = new
        new.start()
        return new

    def count_finished(self, task: str, seconds: float) -> None:
        """A failure answered for a thread by the watchdog (the thread itself counts nothing)."""
        with self._lock:
            self._side_counters.finished(task, seconds, False)

    def running(self) -> list[tuple[GrabLoop, Job]]:
        """(thread, job) for every job running now."""
        return [(t, job) for t in list(self.job_threads) if (job := t.current) is not None]

    def _max_jobs_done(self) -> None:
        self.request_shutdown(reason=f"worker.max_jobs: {self.max_jobs} jobs done")

    def request_shutdown(self, now: bool = False, reason: str = "request") -> None:
        with self._lock:
            first = not self.stopping.is_set()
            if now:
                self.now_requested.set()
            if first:
                self.shutdown_reason = reason
                self.stopping.set()
                os.write(self._stop_w, b"x")  # wakes every sleeping job thread
        if first or now:
            log.info("shutdown requested", reason=reason, now=now, grace=0 if now else self.config.worker.grace)

    def fatal(self, reason: str) -> None:
        """Something keeps failing that retrying will not cure: stop, and exit 1 (wait raises)."""
        with self._lock:
            if self.fatal_reason is not None:
                return
            self.fatal_reason = reason
        log.error("worker cannot go on; stopping", reason=reason)
        self.request_shutdown(reason=reason)

    def wait(self) -> int:
        """Block until shutdown is requested and done; return the exit status (0).

        Raises WorkerFailed (exit 1) after the shutdown when the process stopped on ``fatal``.
        """
        while not self.stopping.wait(0.5):
            pass
        grace = self.config.worker.grace
        deadline = time.monotonic() + grace
        for t in list(self.job_threads):
            while t.is_alive():
                left = 0 if self.now_requested.is_set() else deadline - time.monotonic()
                if left <= 0:
                    break
                t.join(min(left, 0.1))
        busy = [t for t in self.job_threads if t.is_alive()]
        if busy:
            # In-flight jobs past the grace: kill their commands and close their connections,
            # so gearmand gives those jobs to another worker.
            log.warning("grace over; stopping in-flight jobs, gearmand will requeue them",
                        jobs=[job.handle for t in busy if (job := t.current) is not None])
            # Connections first: a killed command must not be reported as a failure.
            for t in busy:
                t.shut_connections()
            self.cancel_jobs.set()
            for t in list(self.job_threads):
                t.running.cancel_now()
            for t in busy:
                t.join(2.0)
        self.finished.set()
        os.write(self._fin_w, b"x")
        if self.control is not None:
            self.control.join(2.0)
        done = sum(t.jobs_done for t in self.job_threads)
        log.info("worker stopped", reason=self.shutdown_reason, jobs_done=done)
        if self.fatal_reason is not None:
            raise WorkerFailed(self.fatal_reason)
        return 0

    def close(self) -> None:
        self.held.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
        for fn in self.tasks.values():
            if isinstance(fn, IsolatedTask):
                fn.close()
        for fd in (self._stop_r, self._stop_w, self._fin_r, self._fin_w):
            try:
                os.close(fd)
            except OSError:
                pass
