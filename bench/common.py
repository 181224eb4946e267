"""What every system driver shares: the environment of one run, processes we start, timing.

Every process the benchmark starts is a ``Proc`` and is ended by its own pid (SIGTERM, then
SIGKILL after a deadline); every wait has a deadline.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable


class Skip(Exception):
    """A system or workload that cannot run here; the message is the reason shown."""


class BenchError(Exception):
    """A run that went wrong (a worker that never came up, jobs that never finished)."""


def wait_until(pred: Callable[[], object], timeout: float, what: str, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Proc:
    """A process we started (in its own session, so a terminal's ^C reaches only us)."""

    name: str
    popen: subprocess.Popen
    log: Path | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(5)

    def tail(self, n: int = 5) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-n:])


# Put before every command spawn() runs: bench/net.py sets it to run workers on another host
# of the test network (``ip netns exec NS``).
COMMAND_PREFIX: list[str] = []


def spawn(name: str, cmd: list[str], run_dir: Path, env: dict | None = None, cwd: Path = REPO) -> Proc:
    log = run_dir / f"{name}.out"
    cmd = [*COMMAND_PREFIX, *cmd]
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH", "")]))
    full_env.update(env or {})
    with open(log, "ab") as out:
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=str(cwd),
                                 env=full_env, start_new_session=True)
    return Proc(name, popen, log)


@dataclass
class Workers:
    """A set of worker processes of one system; ``stop`` ends each by pid."""

    procs: list[Proc] = field(default_factory=list)
    on_stop: list[Callable[[], None]] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def check_alive(self) -> None:
        dead = [p for p in self.procs if not p.alive()]
        if dead:
            p = dead[0]
            raise BenchError(f"worker {p.name} exited with status {p.popen.returncode}: {p.tail()}")

    def stop(self) -> None:
        for p in self.procs:
            if p.alive():
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            p.stop(10.0)
        for fn in self.on_stop:
            fn()

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class Env:
    """One run's shared state: the gearmand, the Redis (if any), a scratch folder, counts."""

    run_dir: Path
    gearmand: object  # geartask.server.LocalServer
    redis_url: str | None = None
    redis_reason: str = ""
    smoke: bool = False

    @property
    def host(self) -> str:
        return self.gearmand.host

    @property
    def port(self) -> int:
        return self.gearmand.port

    @property
    def address(self) -> str:
        return self.gearmand.address


# -- measuring processes -----------------------------------------------------------------------
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (its own threads, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[k]


def latency_summary(seconds: list[float]) -> dict:
    s = sorted(seconds)
    return {"jobs": len(s), "p50_ms": round(percentile(s, 0.5) * 1000, 4),
            "p99_ms": round(percentile(s, 0.99) * 1000, 4), "max_ms": round(s[-1] * 1000, 4) if s else None}


def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


def admin_status(env: Env) -> dict[str, tuple[int, int, int]]:
    """gearmand's 'status': function -> (queued+running, running, available workers)."""
    from geartask.gearman import admin_command
    out = {}
    for line in admin_command(env.host, env.port, "status", timeout=5):
        parts = line.split("\t")
        if len(parts) >= 4:
            out[parts[0]] = (int(parts[1]), int(parts[2]), int(parts[3]))
    return out


def wait_gearman_workers(env: Env, function: str, count: int, workers: Workers, timeout: float = 30) -> None:
    def ready():
        workers.check_alive()
        return admin_status(env).get(function, (0, 0, 0))[2] >= count
    wait_until(ready, timeout, f"{count} workers of {function} on {env.address}", 0.05)


def wait_gearman_drained(env: Env, function: str, timeout: float) -> float:
    """Seconds until gearmand holds no job of ``function`` (polled every 5 ms)."""
    t0 = time.perf_counter()
    wait_until(lambda: admin_status(env).get(function, (0, 0, 0))[0] == 0, timeout,
               f"{function} to drain", 0.005)
    return time.perf_counter() - t0


class System:
    """One system under test. Drivers implement what they can; the rest raises Skip.

    ``start(env, purpose, processes, threads)`` starts workers for ``purpose`` ("reverse",
    "shell" or "idle") and returns once they can take jobs. The client methods run in the
    benchmark's own process and raise BenchError when a job is lost or fails.
    """

    key = "system"
    label = "system"
    note = ""  # how this system maps the workload, shown under the table

    def check(self, env: Env) -> None:
        """Raise Skip(reason) when this system cannot run here."""

    def version(self) -> str:
        return ""

    def start(self, env: Env, purpose: str, processes: int, threads: int) -> Workers:
        raise Skip("not implemented")

    def batch(self, env: Env, n: int, timeout: float) -> None:
        raise Skip("not implemented")

    def sequential(self, env: Env, n: int, timeout: float) -> list[float]:
        raise Skip("not implemented")

    def background(self, env: Env, n: int, timeout: float) -> None:
        raise Skip("not implemented")

    def drained(self, env: Env, timeout: float) -> float:
        raise Skip("not implemented")

    def shell_batch(self, env: Env, n: int, timeout: float) -> None:
        raise Skip("not implemented")

    def close(self) -> None:
        pass


def payloads(n: int, prefix: str = "job") -> list[str]:
    return [f"{prefix}-{i:06d}" for i in range(n)]
