"""W4's limit: the same `true` runs through veryeasyprocess in 4 threads, with no queue at all."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from .common import BenchError, Env, System, Workers


class NoQueue(System):
    key = "noqueue"
    label = "no queue (veryeasyprocess, 4 threads)"
    note = "W4 reference: shell_2_tempfile(['true']) in 4 threads, no server"

    def start(self, env: Env, purpose: str, processes: int, threads: int) -> Workers:
        self.threads = processes * threads
        return Workers()

    def shell_batch(self, env: Env, n: int, timeout: float) -> None:
        from geartask.shell.veryeasyprocess import shell_2_tempfile
        with ThreadPoolExecutor(self.threads) as pool:
            results = list(pool.map(lambda _: shell_2_tempfile(["true"], timeout=timeout), range(n)))
        bad = [r for r in results if not r.ok]
        if bad:
            raise BenchError(f"{len(bad)} of {n} `true` runs failed: {bad[0].reason}")
