"""Start real worker processes (runworkers.py) for tests, and wait until they are attached."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

from geartask import gearman as gp
from geartask.address import split_address

from helpers import REPO, wait_until

RUNWORKERS = REPO / "worker_client" / "runworkers.py"


def worker_connections(address: str) -> list[str]:
    host, port = split_address(address)
    try:
        return gp.admin_command(host, port, "workers", timeout=5)
    except Exception:
        return []


def attached(address: str, name: str, pid: int, threads: int,
             connections: Callable[[str], list[str]] = worker_connections) -> bool:
    """All ``threads`` job connections and the control connection of that process are up."""
    mine = [line for line in connections(address) if f" {name}:" in line and f":{pid}:" in line]
    return len(mine) >= threads + 1


class WorkerProc:
    """``prefix`` goes before the command, e.g. ``ip netns exec NS`` to run it on a test-network host;
    ``env`` is the worker's whole environment (default: the test process's)."""

    def __init__(self, config: Path, name: str, threads: int, *extra: str, prefix: Sequence[str] = (),
                 env: dict | None = None):
        self.name, self.threads = name, threads
        self.config = config
        # Output to a file, never an unread pipe: a worker that logs a lot would block on it.
        self.output = config.parent / f"worker-{name}-{len(list(config.parent.glob('worker-*.out')))}.out"
        with open(self.output, "w") as out:
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, str(RUNWORKERS), "--config", str(config), "--name", name,
                 "--threads", str(threads), *extra],
                stdout=out, stderr=subprocess.STDOUT, cwd=config.parent, env=env)
        self.pid = self.proc.pid

    def wait_attached(self, addresses: list[str], timeout: float = 15) -> "WorkerProc":
        for address in addresses:
            wait_until(lambda: attached(address, self.name, self.pid, self.threads, self.connections)
                       or self.proc.poll() is not None,
                       timeout, message=f"worker {self.name} attached to {address}")
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}: {self.text()[-2000:]}")
        return self

    def connections(self, address: str) -> list[str]:
        """The server's worker connections (a subclass asks from where the server is reachable)."""
        return worker_connections(address)

    def signal(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Teardown: end the process we started, by its pid."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def log_lines(self) -> list[dict]:
        import json
        path = self.config.parent / "logs" / f"worker-{self.name}.log"
        if not path.exists():
            return []
        text = path.read_text()
        complete = text[:text.rfind("\n") + 1]  # a line still being written is not read yet
        return [json.loads(l) for l in complete.splitlines() if l.strip()]


@contextlib.contextmanager
def in_process_worker(config, address: str, name: str, threads: int, plugins: tuple = ("eg",)):
    """A WorkerProcess in this test's own process (to look at its threads), attached to
    ``address`` with every thread and its control thread; stopped at the end."""
    from geartask.plugins import load_plugins
    from geartask.worker.process import WorkerProcess
    tasks = {task: fn for task, (fn, _) in load_plugins(config, only=list(plugins)).tasks().items()}
    process = WorkerProcess(config, name, threads, tasks)
    process.start()
    try:
        wait_until(lambda: len([l for l in worker_connections(address) if f" {name}:" in l]) == threads + 1, 10,
                   message=f"{threads} job threads and the control thread attached")
        yield process
    finally:
        process.request_shutdown(now=True)
        process.wait()
        process.close()
