"""The built-in ``shell`` task: run an allowlisted program through veryeasyprocess.

Job data is JSON ``{"cmd": [...], "cwd"?, "timeout"?, "env"?, "retries"?, "follow"?}``; the result
is JSON ``{returncode, output, cut, timed_out, attempts, duration, worker}`` (``"follow": true``:
output streamed as it comes, geartask.shell.follow, and ``dropped`` in the result). A program runs
only when ``cmd[0]`` is exactly an entry of ``worker.shell.allow``, by the absolute path
found for it at start; a job may set only the variables in ``worker.shell.env_allow``.
What that guarantees and what it doesn't: docs/shell.md.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..logs import get_logger
from ..errors import AttemptFailed, JobRejected
from ..shellenv import check_shell_config, never_passed

from . import veryeasyprocess
from .veryeasyprocess import finite, shown

if TYPE_CHECKING:
    from ..config import WorkerConfig

log = get_logger("geartask.shell")
KEYS = ("cmd", "cwd", "timeout", "env", "retries", "follow")


def find_program(name: str, search_path: str | None = None) -> str | None:
    """The absolute path of executable ``name`` on the absolute entries of ``search_path``
    (default: this process's PATH); relative entries ("", ".") would depend on a job's cwd."""
    if search_path is None:
        search_path = os.environ.get("PATH", os.defpath)
    for folder in search_path.split(os.pathsep):
        candidate = os.path.join(folder, name)
        if os.path.isabs(folder) and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.normpath(candidate)
    return None


def _text(value: Any, where: str) -> str:
    """``value`` as a string a program can be given, or JobRejected naming ``where``."""
    if not isinstance(value, str):
        raise JobRejected(f"{where} must be a string, got {shown(value)}")
    if "\0" in value:
        raise JobRejected(f"{where} contains a NUL byte: {shown(value)}")
    try:
        os.fsencode(value)
    except UnicodeEncodeError:
        raise JobRejected(f"{where} is not valid Unicode text: {shown(value)}") from None
    return value


def _finite(value: Any, where: str) -> float:
    if not finite(value):
        raise JobRejected(f"{where} must be a finite number, got {shown(value)}")
    return value


class ShellTask:
    def __init__(self, worker_config: WorkerConfig, worker_label: str):
        self.cfg = worker_config
        shell = worker_config.shell
        check_shell_config(shell.allow, shell.env_allow)  # again: a config may be built in code
        self.allow = list(shell.allow)
        self.env_allow = frozenset(shell.env_allow)
        self.worker_label = worker_label
        # Every allowed name is found once, now, on the worker's own PATH: a job's PATH, or a
        # job's cwd with a relative entry on ours, must never choose which file runs.
        self.programs: dict[str, str | None] = {}
        for entry in self.allow:
            if os.path.isabs(entry):
                found = entry if os.path.isfile(entry) and os.access(entry, os.X_OK) else None
            else:
                found = find_program(entry)
            self.programs[entry] = found
            if found is None:
                log.warning("allowed program not found at start; jobs that ask for it are refused",
                            program=entry, path=os.environ.get("PATH", os.defpath))
        if self.allow:
            log.info("shell programs", programs=self.programs, env_allow=sorted(self.env_allow))

    def check(self, data: Any) -> dict:
        """Validate the job data; JobRejected (never retried) names what is wrong."""
        if not isinstance(data, dict):
            raise JobRejected("shell job data must be a JSON object like {\"cmd\": [\"echo\", \"hi\"]}, "
                              f"got {type(data).__name__}")
        unknown = sorted(k for k in data if k not in KEYS)
        if unknown:
            raise JobRejected(f"shell job data has unknown keys: {shown(unknown)} (known: {', '.join(KEYS)})")
        cmd = data.get("cmd")
        if isinstance(cmd, str):
            raise JobRejected("'cmd' must be a list of arguments, not a string (no shell is used): "
                              f"e.g. {shown(cmd.split())}")
        if not isinstance(cmd, list) or not cmd:
            raise JobRejected(f"'cmd' must be a non-empty list of strings, got {shown(cmd)}")
        for i, arg in enumerate(cmd):
            _text(arg, f"'cmd' argument {i}")
        executable = self.programs.get(cmd[0])
        if cmd[0] not in self.programs:
            allowed = ", ".join(self.allow) if self.allow else "nothing (worker.shell.allow is empty)"
            raise JobRejected(f"program {shown(cmd[0])} is not on this worker's allowlist; allowed: "
                              f"{shown(allowed)[1:-1]}")
        if executable is None:
            raise JobRejected(f"program {cmd[0]!r} is allowed but this worker did not find it at start")
        cwd = data.get("cwd")
        if cwd is not None and not os.path.isabs(_text(cwd, "'cwd'")):
            raise JobRejected(f"'cwd' must be an absolute path, got {shown(cwd)}")
        limit = self.cfg.job_timeout
        timeout = _finite(data.get("timeout", min(self.cfg.shell.default_timeout, limit)), "'timeout'")
        if timeout <= 0:
            raise JobRejected(f"'timeout' must be a number of seconds > 0, got {shown(timeout)}")
        if timeout > limit:
            raise JobRejected(f"'timeout' {timeout:g}s is over this worker's job_timeout ({limit:g}s)")
        retries = data.get("retries", 0)
        if _finite(retries, "'retries'") < 0 or not isinstance(retries, int):
            raise JobRejected(f"'retries' must be a whole number >= 0, got {shown(retries)}")
        follow = data.get("follow", False)
        if not isinstance(follow, bool):
            raise JobRejected(f"'follow' must be true or false, got {shown(follow)}")
        return {"cmd": cmd, "executable": executable, "cwd": cwd, "timeout": float(timeout),
                "env": self._env(data.get("env")), "follow": follow}

    def _env(self, env: Any) -> dict[str, str] | None:
        if env is None:
            return None
        if not isinstance(env, dict):
            raise JobRejected(f"'env' must be an object of strings, got {shown(env)}")
        refused = [k for k in env if k not in self.env_allow or never_passed(k)]
        if refused:
            allowed = ", ".join(sorted(self.env_allow)) or "nothing"
            raise JobRejected(f"'env' sets {shown(refused[0])}, which this worker does not let a job set "
                              f"(worker.shell.env_allow: {shown(allowed)[1:-1]})")
        for key, value in env.items():
            _text(value, f"'env' value of {key}")
        return env

    def __call__(self, job) -> dict:
        spec = self.check(job.data)
        if spec["follow"]:
            return self._followed(job, spec)

        def heartbeat(elapsed: float) -> None:
            # Progress for the client, and traffic that keeps NAT and firewalls from
            # dropping the connection during a long command.
            job.status(int(elapsed), int(spec["timeout"]))

        result = veryeasyprocess.shell_2_tempfile(
            spec["cmd"], executable=spec["executable"], cwd=spec["cwd"], timeout=spec["timeout"],
            env=spec["env"], max_output=self.cfg.shell.max_output, cancel=job.cancel,
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

    def _followed(self, job, spec: dict) -> dict:
        """The job asked to follow its output: streamed as it runs (geartask.shell.follow, a
        path of its own), the result keeping the last 64 KiB and the count of bytes dropped."""
        from .follow import run_followed
        from .stream import worker_host
        result, live = run_followed(job, spec, worker_host(self.cfg), self.cfg.shell.max_output,
                                    self.cfg.shell.heartbeat)
        summary = {"returncode": result.returncode, "output": result.output, "cut": result.cut,
                   "timed_out": result.timed_out, "attempts": job.attempt,
                   "duration": round(result.duration, 6), "worker": self.worker_label,
                   "dropped": live.dropped}
        if result.returncode is None and not result.timed_out and not result.cancelled:
            raise JobRejected(result.reason or "command did not start", summary)
        if not result.ok:
            raise AttemptFailed(result.reason or "command failed", summary)
        return summary
