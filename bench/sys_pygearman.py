"""Bare pygearman 0.2.6: the smallest GearmanWorker / GearmanClient programs that do the workloads.

The floor for geartask's own overhead. Run as a program it is the worker:

    python -m bench.sys_pygearman HOST:PORT PURPOSE THREADS

(one GearmanWorker per thread; SIGTERM ends it).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from .common import PY, BenchError, Env, System, Workers, payloads, spawn, wait_gearman_drained, wait_gearman_workers

TASK = "bench.reverse"
SHELL = "bench.shell"


def _reverse(worker, job):
    return job.data[::-1]


def _shell(worker, job):
    return str(subprocess.run(["true"]).returncode).encode()


def worker_main(address: str, purpose: str, threads: int) -> None:
    import gearman
    # pygearman matches abilities by equality with the bytes the server sends: register bytes.
    task, fn = (SHELL, _shell) if purpose == "shell" else (TASK, _reverse)

    def serve():
        w = gearman.GearmanWorker([address])
        w.register_task(task.encode(), fn)
        w.work(poll_timeout=5.0)

    for _ in range(threads):
        threading.Thread(target=serve, daemon=True).start()
    while True:
        time.sleep(3600)


class PyGearman(System):
    key = "pygearman"
    label = "bare pygearman"
    note = "GearmanWorker per thread, GearmanClient.submit_multiple_jobs / submit_job"

    def __init__(self):
        self._client = None

    def version(self) -> str:
        from importlib.metadata import version
        return f"pygearman {version('pygearman')}"

    def client(self, env: Env):
        if self._client is None:
            import gearman
            self._client = gearman.GearmanClient([env.address])
        return self._client

    def start(self, env: Env, purpose: str, processes: int, threads: int) -> Workers:
        workers = Workers()
        try:
            for i in range(processes):
                workers.procs.append(spawn(f"{self.key}-{purpose}-{processes}x{threads}-{i}",
                                           [PY, "-m", "bench.sys_pygearman", env.address, purpose, str(threads)],
                                           env.run_dir))
            wait_gearman_workers(env, SHELL if purpose == "shell" else TASK, processes * threads, workers)
        except BaseException:
            workers.stop()
            raise
        return workers

    def _run(self, env: Env, task: str, data: list[bytes], timeout: float, background: bool = False):
        import gearman
        reqs = self.client(env).submit_multiple_jobs(
            [{"task": task, "data": d} for d in data], background=background,
            wait_until_complete=not background, poll_timeout=timeout)
        want = gearman.constants.JOB_CREATED if background else gearman.constants.JOB_COMPLETE
        bad = [r for r in reqs if r.state != want]
        if bad:
            raise BenchError(f"{len(bad)} of {len(reqs)} jobs not done (first: {bad[0].state})")
        return reqs

    def batch(self, env: Env, n: int, timeout: float) -> None:
        self._run(env, TASK, [p.encode() for p in payloads(n)], timeout)

    def sequential(self, env: Env, n: int, timeout: float) -> list[float]:
        client = self.client(env)
        out = []
        deadline = time.monotonic() + timeout
        for p in payloads(n):
            data = p.encode()
            t0 = time.perf_counter()
            r = client.submit_job(TASK, data, poll_timeout=10)
            out.append(time.perf_counter() - t0)
            if r.result != data[::-1]:
                raise BenchError(f"sequential job ended {r.state}: {r.result!r}")
            if time.monotonic() > deadline:
                raise BenchError(f"sequential run over {timeout:g}s")
        return out

    def background(self, env: Env, n: int, timeout: float) -> None:
        self._run(env, TASK, [p.encode() for p in payloads(n, "bg")], timeout, background=True)

    def drained(self, env: Env, timeout: float) -> float:
        return wait_gearman_drained(env, TASK, timeout)

    def shell_batch(self, env: Env, n: int, timeout: float) -> None:
        reqs = self._run(env, SHELL, [b"true"] * n, timeout)
        if any(r.result != b"0" for r in reqs):
            raise BenchError("shell jobs: a `true` did not exit 0")

    def close(self) -> None:
        if self._client is not None:
            self._client.shutdown()
            self._client = None


if __name__ == "__main__":
    worker_main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
