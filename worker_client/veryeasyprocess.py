"""Run a command with a timeout, and kill everything it started when the time is up.

The two helpers of the original design, made safe:

* ``shell_2_tty(cmd, cwd=None, timeout=600)``: output goes straight to our own stdout/stderr.
* ``shell_2_tempfile(cmd, cwd=None, timeout=10)``: output (stdout and stderr, interleaved)
  is captured through a temporary file, so a command that prints megabytes never blocks on
  a full pipe, and returned.

For both: a list runs without a shell; a string runs through /bin/sh only with
``shell=True`` (otherwise it is an error result, not a guess). The child leads its own
process group; on timeout (or ``cancel``) the whole group gets SIGTERM and, after
``kill_grace`` seconds, SIGKILL, so ``sh -c 'sleep 100 & sleep 100'`` leaves nothing
behind. The child is always reaped, and whatever is left in its group when it exits is
ended too. A missing program, a bad cwd or a permission error comes back as a result with
a ``reason``; nothing escapes as an exception.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL
_running: set[int] = set()  # process groups of commands running now, for kill_all()
_TICK = 0.05  # how often the wait loop looks at ``cancel``


@dataclass
class Result:
    returncode: int | None  # None when the command never started; negative = killed by a signal
    output: str = ""  # captured output (shell_2_tempfile), cut at max_output bytes
    timed_out: bool = False
    duration: float = 0.0
    cut: bool = False  # output was longer than max_output
    reason: str | None = None  # why it did not run, or why it was stopped
    cancelled: bool = False
    pid: int | None = None  # the child's pid, which is also its process group id

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out and not self.cancelled

    def to_dict(self) -> dict:
        return asdict(self)


def _start_error(cmd, cwd, exc: OSError) -> str:
    program = cmd[0] if isinstance(cmd, (list, tuple)) and cmd else cmd
    if cwd is not None and not os.path.isdir(cwd):
        return f"working directory {str(cwd)!r} does not exist or is not a directory"
    if isinstance(exc, FileNotFoundError):
        return f"program not found: {program!r}"
    if isinstance(exc, PermissionError):
        return f"permission denied running {program!r}"
    return f"cannot start {program!r}: {exc.strerror or exc}"


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run(cmd: Sequence[str] | str, cwd: str | os.PathLike | None = None, timeout: float | None = 600,
        *, shell: bool = False, env: Mapping[str, str] | None = None, capture: bool = True,
        max_output: int = 1024 * 1024, cancel: threading.Event | None = None,
        on_tick: Callable[[float], None] | None = None, tick_interval: float = 30.0,
        kill_grace: float = KILL_GRACE) -> Result:
    """Run ``cmd``; see the module docstring. ``on_tick(elapsed)`` is called every
    ``tick_interval`` seconds while the command runs (the worker's heartbeat)."""
    t0 = time.monotonic()
    if isinstance(cmd, str) and not shell:
        return Result(None, reason="a command string needs shell=True; pass a list of arguments instead")
    if not isinstance(cmd, str):
        if not cmd or not all(isinstance(a, str) for a in cmd):
            return Result(None, reason="the command must be a non-empty list of strings")
        cmd = list(cmd)
    full_env = None
    if env is not None:
        full_env = dict(os.environ)
        full_env.update({str(k): str(v) for k, v in env.items()})

    out = tempfile.TemporaryFile() if capture else None
    try:
        try:
            proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, shell=shell, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT if capture else None,
                                    start_new_session=True, close_fds=True)
        except (OSError, ValueError) as e:
            reason = _start_error(cmd, cwd, e) if isinstance(e, OSError) else f"cannot start: {e}"
            return Result(None, reason=reason, duration=time.monotonic() - t0)

        _running.add(proc.pid)
        timed_out = cancelled = False
        next_tick = t0 + tick_interval
        deadline = None if timeout is None else t0 + timeout
        exited = _exit_waiter(proc)
        while True:
            now = time.monotonic()
            wait = _TICK if cancel is not None else tick_interval
            if deadline is not None:
                wait = min(wait, deadline - now)
            if on_tick is not None:
                wait = min(wait, next_tick - now)
            if exited(max(0.0, wait)):
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                timed_out = True
            elif cancel is not None and cancel.is_set():
                cancelled = True
            if timed_out or cancelled:
                _signal_group(proc.pid, signal.SIGTERM)
                exited(kill_grace)
                break
            if on_tick is not None and now >= next_tick:
                next_tick = now + tick_interval
                on_tick(now - t0)
        # The leader has exited (or is being killed) but is not reaped yet, so its pid, which
        # is the group id, cannot have been reused: whatever the command left running in its
        # group (a daemonised grandchild, the rest of a killed pipeline) goes now.
        _signal_group(proc.pid, signal.SIGKILL)
        exited.close()
        proc.wait()
        _running.discard(proc.pid)
        duration = time.monotonic() - t0

        output, cut = "", False
        if out is not None:
            size = out.seek(0, os.SEEK_END)
            out.seek(0)
            data = out.read(max_output)
            cut = size > max_output
            output = data.decode("utf-8", errors="replace")
        reason = None
        if timed_out:
            reason = f"timed out after {timeout:g}s; process group killed"
        elif cancelled:
            reason = "cancelled; process group killed"
        elif proc.returncode < 0:
            reason = f"killed by signal {signal.Signals(-proc.returncode).name}"
        elif proc.returncode != 0:
            reason = f"exit status {proc.returncode}"
        return Result(proc.returncode, output, timed_out, duration, cut, reason, cancelled, proc.pid)
    finally:
        if out is not None:
            out.close()


def kill_all() -> None:
    """SIGKILL every command still running (a process about to exit at once leaves none behind)."""
    for pgid in list(_running):
        _signal_group(pgid, signal.SIGKILL)


class _exit_waiter:
    """Wait for a child to exit *without reaping it* (pidfd on Linux >= 5.3, else polling)."""

    def __init__(self, proc: subprocess.Popen):
        self.pid = proc.pid
        self.fd = None
        try:
            self.fd = os.pidfd_open(proc.pid)
        except (AttributeError, OSError):
            pass

    def __call__(self, timeout: float) -> bool:
        if self.fd is not None:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            return bool(ready)
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return True
            if info is not None:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def shell_2_tty(cmd, cwd=None, timeout=600, **kwargs) -> Result:
    """Run ``cmd`` with its output going to our own stdout/stderr."""
    return run(cmd, cwd, timeout, capture=False, **kwargs)


def shell_2_tempfile(cmd, cwd=None, timeout=10, **kwargs) -> Result:
    """Run ``cmd`` and return its output, captured through a temporary file."""
    return run(cmd, cwd, timeout, capture=True, **kwargs)
