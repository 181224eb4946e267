"""Celery with a Redis broker and result backend, threads pool: what a user would pick instead.

The module is also the Celery app the workers load (``celery -A bench.sys_celery worker``);
the Redis URL comes from $BENCH_REDIS_URL.
"""

from __future__ import annotations

import os
import subprocess
import time

from .common import PY, BenchError, Env, Skip, System, Workers, payloads, spawn, wait_until

QUEUE = "celery"

try:
    from celery import Celery as _CeleryApp, group
except ImportError:  # bench extras not installed: the system is skipped
    _CeleryApp = None

app = None
if _CeleryApp is not None:
    _url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
    app = _CeleryApp("bench", broker=_url, backend=_url)
    app.conf.update(task_serializer="json", result_serializer="json", accept_content=["json"],
                    broker_connection_retry_on_startup=True, worker_hijack_root_logger=False)

    @app.task(name="bench.reverse")
    def reverse(s):
        return s[::-1]

    @app.task(name="bench.reverse_bg", ignore_result=True)
    def reverse_bg(s):
        return s[::-1]

    @app.task(name="bench.shell")
    def shell():
        return subprocess.run(["true"]).returncode


class Celery(System):
    key = "celery"
    label = "Celery (Redis, threads pool)"
    note = ("`celery worker --pool threads --concurrency N` (default settings, prefetch 4); client "
            "`group(...).apply_async().get()` (W1), `.delay().get()` (W2), `apply_async` of an "
            "ignore_result task (W3); Redis broker and result backend")

    def check(self, env: Env) -> None:
        if app is None:
            raise Skip("celery is not installed (pip install -e '.[bench]')")
        if env.redis_url is None:
            raise Skip(env.redis_reason or "no redis-server")
        app.conf.update(broker_url=env.redis_url, result_backend=env.redis_url)

    def version(self) -> str:
        import celery
        import kombu
        return f"celery {celery.__version__}, kombu {kombu.__version__}"

    def start(self, env: Env, purpose: str, processes: int, threads: int) -> Workers:
        workers = Workers()
        try:
            for i in range(processes):
                workers.procs.append(spawn(
                    f"celery-{purpose}-{processes}x{threads}-{i}",
                    [PY, "-m", "celery", "-A", "bench.sys_celery", "worker", "--pool", "threads",
                     "--concurrency", str(threads), "--loglevel", "WARNING",
                     "--hostname", f"bench{i}-{purpose}-{os.getpid()}@%h"],
                    env.run_dir, env={"BENCH_REDIS_URL": env.redis_url}))

            def up():
                workers.check_alive()
                return len(app.control.ping(timeout=0.5) or []) >= processes
            wait_until(up, 60, f"{processes} celery worker(s)", 0.1)
        except BaseException:
            workers.stop()
            raise
        return workers

    def batch(self, env: Env, n: int, timeout: float) -> None:
        data = payloads(n)
        got = group(reverse.s(p) for p in data).apply_async().get(timeout=timeout)
        if got != [p[::-1] for p in data]:
            raise BenchError("celery batch: wrong results")

    def sequential(self, env: Env, n: int, timeout: float) -> list[float]:
        out = []
        deadline = time.monotonic() + timeout
        for p in payloads(n):
            t0 = time.perf_counter()
            r = reverse.delay(p).get(timeout=10)
            out.append(time.perf_counter() - t0)
            if r != p[::-1]:
                raise BenchError(f"celery sequential job returned {r!r}")
            if time.monotonic() > deadline:
                raise BenchError(f"sequential run over {timeout:g}s")
        return out

    def background(self, env: Env, n: int, timeout: float) -> None:
        for p in payloads(n, "bg"):
            reverse_bg.apply_async((p,))

    def drained(self, env: Env, timeout: float) -> float:
        import redis
        r = redis.Redis.from_url(env.redis_url)
        t0 = time.perf_counter()
        # Empty queue and no message delivered but unacknowledged (prefetched or running).
        wait_until(lambda: r.llen(QUEUE) == 0 and r.hlen("unacked") == 0, timeout, "celery queue to drain", 0.005)
        r.close()
        return time.perf_counter() - t0

    def shell_batch(self, env: Env, n: int, timeout: float) -> None:
        got = group(shell.s() for _ in range(n)).apply_async().get(timeout=timeout)
        if got != [0] * n:
            raise BenchError("celery shell jobs: a `true` did not exit 0")
