"""RQ on the same Redis, SimpleWorker (no fork per job): the other queue a user would pick.

RQ workers are single-threaded, so "N threads" are N worker processes. Run as a program the
module is one worker:  python -m bench.sys_rq REDIS_URL
"""

from __future__ import annotations

import subprocess
import sys
import time

from .common import PY, BenchError, Env, Skip, System, Workers, payloads, spawn, wait_until

QUEUE = "bench"


def reverse(s):
    return s[::-1]


def shell():
    return subprocess.run(["true"]).returncode


def worker_main(url: str) -> None:
    import redis
    from rq import Queue, SimpleWorker
    conn = redis.Redis.from_url(url)
    SimpleWorker([Queue(QUEUE, connection=conn)], connection=conn).work(logging_level="WARNING")


class RQ(System):
    key = "rq"
    label = "RQ (Redis, SimpleWorker)"
    note = ("N `SimpleWorker` processes for N threads; client `enqueue_many` (W1, W3) or `enqueue` (W2), "
            "results by `job.latest_result(timeout)`")

    def __init__(self):
        self._conn = None

    def check(self, env: Env) -> None:
        try:
            import redis  # noqa: F401
            import rq  # noqa: F401
        except ImportError as e:
            raise Skip(f"{e.name} is not installed (pip install -e '.[bench]')") from None
        if env.redis_url is None:
            raise Skip(env.redis_reason or "no redis-server")

    def version(self) -> str:
        import redis
        import rq
        return f"rq {rq.__version__}, redis-py {redis.__version__}"

    def queue(self, env: Env):
        import redis
        from rq import Queue
        if self._conn is None:
            self._conn = redis.Redis.from_url(env.redis_url)
        return Queue(QUEUE, connection=self._conn)

    def start(self, env: Env, purpose: str, processes: int, threads: int) -> Workers:
        from rq import Worker
        q = self.queue(env)
        workers = Workers()
        try:
            for i in range(processes * threads):
                workers.procs.append(spawn(f"rq-{purpose}-{processes}x{threads}-{i}",
                                           [PY, "-m", "bench.sys_rq", env.redis_url], env.run_dir))

            def up():
                workers.check_alive()
                return len(Worker.all(queue=q)) >= processes * threads
            wait_until(up, 60, f"{processes * threads} rq workers", 0.1)
        except BaseException:
            workers.stop()
            raise
        return workers

    def _wait(self, jobs, timeout: float) -> list:
        from rq.results import Result
        deadline = time.monotonic() + timeout
        out = []
        for job in jobs:
            left = int(deadline - time.monotonic()) + 1
            if left <= 0:
                raise BenchError(f"rq: results not in within {timeout:g}s")
            res = job.latest_result(timeout=left)
            if res is None or res.type != Result.Type.SUCCESSFUL:
                raise BenchError(f"rq job {job.id} ended {res.type if res else 'without a result'}")
            out.append(res.return_value)
        return out

    def batch(self, env: Env, n: int, timeout: float) -> None:
        from rq import Queue
        q = self.queue(env)
        data = payloads(n)
        jobs = q.enqueue_many([Queue.prepare_data(reverse, args=(p,)) for p in data])
        if self._wait(jobs, timeout) != [p[::-1] for p in data]:
            raise BenchError("rq batch: wrong results")

    def sequential(self, env: Env, n: int, timeout: float) -> list[float]:
        q = self.queue(env)
        out = []
        deadline = time.monotonic() + timeout
        for p in payloads(n):
            t0 = time.perf_counter()
            job = q.enqueue(reverse, p)
            r = self._wait([job], 10)[0]
            out.append(time.perf_counter() - t0)
            if r != p[::-1]:
                raise BenchError(f"rq sequential job returned {r!r}")
            if time.monotonic() > deadline:
                raise BenchError(f"sequential run over {timeout:g}s")
        return out

    def background(self, env: Env, n: int, timeout: float) -> None:
        from rq import Queue
        q = self.queue(env)
        q.enqueue_many([Queue.prepare_data(reverse, args=(p,), result_ttl=0) for p in payloads(n, "bg")])

    def drained(self, env: Env, timeout: float) -> float:
        from rq.registry import StartedJobRegistry
        q = self.queue(env)
        started = StartedJobRegistry(queue=q)
        t0 = time.perf_counter()
        wait_until(lambda: q.count == 0 and started.count == 0, timeout, "rq queue to drain", 0.005)
        return time.perf_counter() - t0

    def shell_batch(self, env: Env, n: int, timeout: float) -> None:
        from rq import Queue
        q = self.queue(env)
        jobs = q.enqueue_many([Queue.prepare_data(shell) for _ in range(n)])
        if self._wait(jobs, timeout) != [0] * n:
            raise BenchError("rq shell jobs: a `true` did not exit 0")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


if __name__ == "__main__":
    worker_main(sys.argv[1])
