"""The built-in ``shell`` task: run an allowlisted program through veryeasyprocess.

Job data is JSON ``{"cmd": [...], "cwd"?, "timeout"?, "env"?, "retries"?}``; the result is
JSON ``{returncode, output, cut, timed_out, attempts, duration, worker}``.

Running a command that a job names is remote code execution for whoever can reach the job
server (gearmand has no authentication). ``worker.shell.allow`` is the guard: a program
runs only when ``cmd[0]`` is exactly one of its entries — a bare name (looked up on PATH)
or an absolute path. An empty list refuses everything. There is no shell: a list is run as
it is, so ``;``, ``|`` and ``$(...)`` are just characters.
"""

from __future__ import annotations

import os
from typing import Any

from . import veryeasyprocess

from .errors import AttemptFailed, JobRejected


class ShellTask:
    def __init__(self, worker_config, worker_label: str):
        self.cfg = worker_config
        self.allow = list(worker_config.shell.allow)
        self.worker_label = worker_label

    def check(self, data: Any) -> dict:
        """Validate the job data; JobRejected (never retried) names what is wrong."""
        if not isinstance(data, dict):
            raise JobRejected("shell job data must be a JSON object like {\"cmd\": [\"echo\", \"hi\"]}, "
                              f"got {type(data).__name__}")
        unknown = set(data) - {"cmd", "cwd", "timeout", "env", "retries"}
        if unknown:
            raise JobRejected(f"shell job data has unknown keys: {', '.join(sorted(unknown))}")
        cmd = data.get("cmd")
        if isinstance(cmd, str):
            raise JobRejected("'cmd' must be a list of arguments, not a string (no shell is used): "
                              f"e.g. {cmd.split()!r}")
        if not isinstance(cmd, list) or not cmd or not all(isinstance(a, str) for a in cmd):
            raise JobRejected(f"'cmd' must be a non-empty list of strings, got {cmd!r}")
        if not self.allowed(cmd[0]):
            allowed = ", ".join(self.allow) if self.allow else "nothing (worker.shell.allow is empty)"
            raise JobRejected(f"program {cmd[0]!r} is not on this worker's allowlist; allowed: {allowed}")
        cwd = data.get("cwd")
        if cwd is not None and not isinstance(cwd, str):
            raise JobRejected(f"'cwd' must be a string, got {cwd!r}")
        timeout = data.get("timeout", min(self.cfg.shell.default_timeout, self.cfg.job_timeout))
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise JobRejected(f"'timeout' must be a number of seconds > 0, got {timeout!r}")
        if timeout > self.cfg.job_timeout:
            raise JobRejected(f"'timeout' {timeout:g}s is over this worker's job_timeout "
                              f"({self.cfg.job_timeout:g}s)")
        env = data.get("env")
        if env is not None and (not isinstance(env, dict)
                                or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
            raise JobRejected(f"'env' must be an object of strings, got {env!r}")
        return {"cmd": cmd, "cwd": cwd, "timeout": float(timeout), "env": env}

    def allowed(self, program: str) -> bool:
        if "\0" in program:
            return False
        if "/" in program:
            return os.path.isabs(program) and os.path.normpath(program) == program and program in self.allow
        return program in self.allow

    def __call__(self, job) -> dict:
        spec = self.check(job.data)

        def heartbeat(elapsed: float) -> None:
            # Progress for the client, and traffic that keeps NAT and firewalls from
            # dropping the connection during a long command.
            job.status(int(elapsed), int(spec["timeout"]))

        result = veryeasyprocess.shell_2_tempfile(
            spec["cmd"], cwd=spec["cwd"], timeout=spec["timeout"], env=spec["env"],
            max_output=self.cfg.shell.max_output, cancel=job.cancel,
            on_tick=heartbeat, tick_interval=self.cfg.shell.heartbeat)
        summary = {"returncode": result.returncode, "output": result.output, "cut": result.cut,
                   "timed_out": result.timed_out, "attempts": job.attempt,
                   "duration": round(result.duration, 6), "worker": self.worker_label}
        if result.returncode is None and not result.timed_out and not result.cancelled:
            # It could not start (missing program, bad cwd): trying again will not help.
            raise JobRejected(result.reason or "command did not start", summary)
        if not result.ok:
            raise AttemptFailed(result.reason or "command failed", summary)
        return summary
