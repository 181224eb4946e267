"""geartask itself: worker_client/runworkers.py processes and send_job_client's JobSender."""

from __future__ import annotations

import time
from pathlib import Path

from .common import (PY, REPO, BenchError, Env, Skip, System, Workers, payloads, spawn,
                     wait_gearman_drained, wait_gearman_workers)

TASK = "bench.reverse"
PURPOSE_FUNCTION = {"reverse": TASK, "idle": TASK, "shell": "shell"}


def write_config(env: Env, log_level: str = "info", *, path: Path | None = None, server: str | None = None,
                 log_dir: Path | None = None, extra: str = "") -> Path:
    """A geartask config for this run: the bench plugin, `true` allowed in the shell task;
    ``extra`` (YAML sections) is appended, e.g. tls and security for the signed system."""
    log_dir = log_dir or env.run_dir / f"geartask-logs-{log_level}"
    path = path or env.run_dir / f"geartask-{log_level}.yaml"
    path.write_text(f"""servers: ["{server or env.address}"]
log:
  dir: "{log_dir}"
  level: {log_level}
  format: json
plugins:
  paths: ["{REPO / 'bench' / 'plugins'}"]
  enabled: [benchtasks]
worker:
  grace: 5
  shell:
    allow: ["true"]
""" + extra)
    return path


class Geartask(System):
    key = "geartask"
    label = "geartask"
    note = "geartask worker processes (log level info: one JSON log line per job) + JobSender"

    def __init__(self, log_level: str = "info"):
        self.log_level = log_level
        if log_level != "info":
            self.key = f"geartask-log-{log_level}"
            self.label = f"geartask (log {log_level})"
            self.note = f"as geartask, with log.level {log_level}: no per-job log line"
        self._sender = None
        self._config = None

    def version(self) -> str:
        import geartask
        return f"geartask {geartask.__version__}"

    def check(self, env: Env) -> None:
        try:
            from geartask.sender.sender import JobSender  # noqa: F401
        except Exception as e:  # the sender is a separate part; report what is wrong with it
            raise Skip(f"geartask.sender.sender does not import: {type(e).__name__}: {e}") from None

    def _conf(self, env: Env):
        if self._config is None:
            from geartask.config import load_config
            self._config = load_config(write_config(env, self.log_level))
        return self._config

    def _config_path(self, env: Env) -> Path:
        return env.run_dir / f"geartask-{self.log_level}.yaml"

    def sender(self, env: Env):
        if self._sender is None:
            from geartask.logs import configure_logging
            from geartask.sender.sender import JobSender
            cfg = self._conf(env)
            # As the send_job_client command does: JSON log file plus console (here a file too).
            self._console = open(env.run_dir / f"sender-{self.log_level}.console", "a")
            configure_logging(cfg.log, "sender", "bench", to_file=True, stream=self._console)
            self._sender = JobSender(cfg)
        return self._sender

    def start(self, env: Env, purpose: str, processes: int, threads: int) -> Workers:
        cfg = self._conf(env)
        path = self._config_path(env)
        workers = Workers()
        try:
            for i in range(processes):
                workers.procs.append(spawn(
                    f"{self.key}-{purpose}-{processes}x{threads}-{i}",
                    [PY, str(REPO / "worker_client" / "runworkers.py"), "--config", str(path),
                     "--name", f"bench{i}", "--threads", str(threads)], env.run_dir))
            wait_gearman_workers(env, PURPOSE_FUNCTION[purpose], processes * threads, workers)
        except BaseException:
            workers.stop()
            raise
        del cfg
        return workers

    def _check(self, results, n: int, what: str) -> None:
        bad = [r for r in results if r.state not in ("complete", "queued")]
        if len(results) != n or bad:
            first = bad[0] if bad else None
            raise BenchError(f"{what}: {len(bad)} of {n} jobs not done"
                             + (f" (first: {first.state}: {first.error})" if first else ""))

    def batch(self, env: Env, n: int, timeout: float) -> None:
        jobs = [{"task": TASK, "data": p} for p in payloads(n)]
        self._check(self.sender(env).submit_many(jobs, wait=True, timeout=timeout), n, "batch")

    def sequential(self, env: Env, n: int, timeout: float) -> list[float]:
        sender = self.sender(env)
        out = []
        deadline = time.monotonic() + timeout
        for p in payloads(n):
            t0 = time.perf_counter()
            r = sender.submit(TASK, p, timeout=10)
            out.append(time.perf_counter() - t0)
            if r.state != "complete" or r.result != p[::-1]:
                raise BenchError(f"sequential job ended {r.state}: {r.error or r.result!r}")
            if time.monotonic() > deadline:
                raise BenchError(f"sequential run over {timeout:g}s")
        return out

    def background(self, env: Env, n: int, timeout: float) -> None:
        jobs = [{"task": TASK, "data": p, "background": True} for p in payloads(n, "bg")]
        self._check(self.sender(env).submit_many(jobs, wait=False, timeout=timeout), n, "background")

    def drained(self, env: Env, timeout: float) -> float:
        return wait_gearman_drained(env, TASK, timeout)

    def shell_batch(self, env: Env, n: int, timeout: float) -> None:
        jobs = [{"task": "shell", "data": {"cmd": ["true"]}} for _ in range(n)]
        results = self.sender(env).submit_many(jobs, wait=True, timeout=timeout)
        self._check(results, n, "shell batch")
        rc = [r.result.get("returncode") for r in results if isinstance(r.result, dict)]
        if rc != [0] * n:
            raise BenchError(f"shell jobs: unexpected results {results[0].result!r}")

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None
            self._console.close()
