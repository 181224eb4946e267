"""Run a command with a timeout, and kill everything it started when the time is up.

* ``shell_2_tty(cmd, cwd=None, timeout=600)``: output goes straight to our own stdout/stderr.
* ``shell_2_tempfile(cmd, cwd=None, timeout=10)``: output (stdout and stderr, interleaved)
  is captured through a temporary file (megabytes never block a pipe) and returned.

A list runs without a shell; a string only with ``shell=True``. The child leads its own
session; on timeout, ``cancel`` or an exception from ``on_tick`` its whole group is killed
(SIGTERM, then SIGKILL after ``kill_grace``), and when it exits whatever is left in its
group goes too. The child is always reaped. If this process dies (even by SIGKILL), the
reaper (``reaper.py``) kills every command it started. Failures to start are results with a
``reason``, never exceptions.
"""

from __future__ import annotations

import errno
import math
import os
import reprlib
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..logs import get_logger
from ..gearman import wait_readable

from . import spawn as _spawn
from .reaper import TOKEN_VAR as REAPER_TOKEN_VAR
from .reaper import VAR as TOKEN_VAR

log = get_logger("geartask.veryeasyprocess")
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL
_running: set[int] = set()  # process groups of commands running now, for kill_all()
_TICK = 0.05  # how often the wait loop looks at ``cancel``
_show = reprlib.Repr()
_show.maxstring = _show.maxother = 80
_show.maxlist = _show.maxdict = 4


def shown(value) -> str:
    """``repr(value)`` cut short: a caller's (or a job's) value quoted in a reason stays small."""
    return _show.repr(value)


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
    program = shown(cmd[0] if isinstance(cmd, (list, tuple)) and cmd else cmd)
    if exc.errno == errno.E2BIG:
        size = sum(len(os.fsencode(a)) + 1 for a in cmd) if isinstance(cmd, list) else len(cmd)
        return (f"argument list too long for the kernel ({len(cmd) if isinstance(cmd, list) else 1} arguments, "
                f"{size} bytes; the limit is about {os.sysconf('SC_ARG_MAX')} bytes with the environment, "
                f"{32 * os.sysconf('SC_PAGE_SIZE')} per argument)")
    if cwd is not None and not os.path.isdir(cwd):
        return f"working directory {shown(str(cwd))} does not exist or is not a directory"
    if isinstance(exc, FileNotFoundError):
        return f"program not found: {program}"
    if isinstance(exc, PermissionError):
        return f"permission denied running {program}"
    return f"cannot start {program}: {exc.strerror or exc}"


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def finite(value) -> bool:
    """A number (not a bool) that is neither NaN nor infinite, nor an int too large for a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _seconds(value, name: str, zero_ok: bool = False) -> str | None:
    """Why ``value`` is not a usable number of seconds, or None."""
    if not finite(value) or value < 0 or (value == 0 and not zero_ok):
        return f"{name} must be a finite number of seconds {'>=' if zero_ok else '>'} 0, got {shown(value)}"
    return None


def run(cmd: Sequence[str] | str, cwd: str | os.PathLike | None = None, timeout: float | None = 600,
        *, shell: bool = False, env: Mapping[str, str] | None = None, executable: str | None = None,
        capture: bool = True, max_output: int = 1024 * 1024, cancel: threading.Event | None = None,
        on_tick: Callable[[float], None] | None = None, tick_interval: float = 30.0,
        kill_grace: float = KILL_GRACE, streams: tuple[int, int] | None = None) -> Result:
    """Run ``cmd``; see the module docstring. ``env`` is added to our own environment;
    ``executable`` is the file to run (``cmd[0]`` stays the program's argv[0]).
    ``on_tick(elapsed)`` is called every ``tick_interval`` seconds while the command runs
    (the worker's heartbeat); if it raises, the command is killed and reaped first.
    ``streams``: file descriptors for the command's stdout and stderr instead of the
    temporary file (the followed path, geartask.shell.follow, reads them as it runs)."""
    t0 = time.monotonic()
    if isinstance(cmd, str) and not shell:
        return Result(None, reason="a command string needs shell=True; pass a list of arguments instead")
    if not isinstance(cmd, str):
        if not cmd or not all(isinstance(a, str) for a in cmd):
            return Result(None, reason="the command must be a non-empty list of strings")
        cmd = list(cmd)
    bad = ((timeout is not None and _seconds(timeout, "timeout")) or _seconds(tick_interval, "tick_interval")
           or _seconds(kill_grace, "kill_grace", zero_ok=True))
    if bad:
        return Result(None, reason=bad)
    try:
        full_env = _child_env(env)
    except (TypeError, ValueError) as e:
        return Result(None, reason=f"bad environment: {shown(str(e))}")

    # Unbuffered: the command writes to it, we read it once (no buffer, no isatty check).
    out = tempfile.TemporaryFile(buffering=0) if capture and streams is None else None
    try:
        proc: subprocess.Popen | None = None
        stdout: int | None
        stderr: int | None
        try:
            if streams is not None:
                stdout, stderr = streams
            elif out is not None:
                stdout = stderr = out.fileno()
            else:
                stdout = stderr = None
            fast = _fast_start(cmd, executable, shell, full_env, stdout, stderr)
            if fast is not None:
                pid = _spawn.spawn(fast[0], fast[1], full_env, stdout, None if cwd is None else os.fsencode(cwd),
                                   cache_env=not env, stderr=stderr)
            else:
                proc = subprocess.Popen(cmd, executable=executable, cwd=cwd, env=full_env, shell=shell,
                                        stdin=subprocess.DEVNULL, stdout=out if streams is None else streams[0],
                                        stderr=(subprocess.STDOUT if capture else None) if streams is None
                                        else streams[1],
                                        start_new_session=True, close_fds=True)
                pid = proc.pid
        except (OSError, ValueError) as e:
            failed = _start_error(cmd, cwd, e) if isinstance(e, OSError) else f"cannot start: {shown(str(e))}"
            return Result(None, reason=failed, duration=time.monotonic() - t0)

        _running.add(pid)
        exited = _exit_waiter(pid)
        timed_out = cancelled = False
        try:
            timed_out, cancelled = _wait(pid, exited, t0, timeout, cancel, on_tick, tick_interval, kill_grace)
        finally:
            # Whatever happened (an exception from on_tick included), the command ends here.
            # The leader has exited or is being killed but is not reaped yet, so its pid, which
            # is the group id, cannot have been reused: whatever the command left running in
            # its group (a daemonised grandchild, the rest of a killed pipeline) goes now.
            _signal_group(pid, signal.SIGKILL)
            exited.close()
            returncode = proc.wait() if proc is not None else _reap(pid)
            _running.discard(pid)
        duration = time.monotonic() - t0

        output, cut = "", False
        if out is not None:
            size = os.fstat(out.fileno()).st_size
            if size:
                # never a max_output-sized buffer for nothing
                data = os.pread(out.fileno(), min(size, max_output), 0)
                cut = size > max_output
                output = data.decode("utf-8", errors="replace")
        reason = None
        if timed_out:
            reason = f"timed out after {timeout:g}s; process group killed"
        elif cancelled:
            reason = "cancelled; process group killed"
        elif returncode < 0:
            reason = f"killed by signal {signal.Signals(-returncode).name}"
        elif returncode != 0:
            reason = f"exit status {returncode}"
        return Result(returncode, output, timed_out, duration, cut, reason, cancelled, pid)
    finally:
        if out is not None:
            out.close()


def _fast_start(cmd, executable, shell, env, stdout, stderr) -> tuple[bytes, list[bytes]] | None:
    """(the file to exec, argv) for spawn.spawn(), or None where Popen must start the command
    (no usable posix_spawn, a program name to look up that is not found: Popen says why, or
    an output descriptor below 3, which Popen's careful dup2 order handles)."""
    if not _spawn.available() or any(fd is not None and fd < 3 for fd in (stdout, stderr)):
        return None
    if shell:
        if executable is not None:
            return None
        return b"/bin/sh", [b"/bin/sh", b"-c", os.fsencode(cmd)]
    argv = [os.fsencode(a) for a in cmd]
    program = os.fsencode(executable) if executable is not None else argv[0]
    if b"/" in program:
        return program, argv
    path = env.get(b"PATH")
    for folder in (os.fsdecode(path) if path is not None else os.defpath).split(os.pathsep):
        if not os.path.isabs(folder):
            return None  # relative to the child's cwd: Popen looks it up there
        candidate = os.path.join(os.fsencode(folder), program)  # as Popen looks it up: the child's PATH
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate, argv
    return None


def _reap(pid: int) -> int:
    """Reap our child ``pid``; its returncode as Popen gives it (-N: killed by signal N)."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:  # reaped elsewhere (SIGCHLD ignored): as Popen, call it 0
        return 0
    return os.waitstatus_to_exitcode(status)


def _wait(pid, exited, t0, timeout, cancel, on_tick, tick_interval, kill_grace) -> tuple[bool, bool]:
    """Wait for the command to exit, time out or be cancelled; return (timed_out, cancelled)."""
    next_tick = t0 + tick_interval
    deadline = None if timeout is None else t0 + timeout
    while True:
        now = time.monotonic()
        wait = _TICK if cancel is not None else tick_interval
        if deadline is not None:
            wait = min(wait, deadline - now)
        if on_tick is not None:
            wait = min(wait, next_tick - now)
        if exited(max(0.0, wait)):
            return False, False
        now = time.monotonic()
        timed_out = deadline is not None and now >= deadline
        cancelled = not timed_out and cancel is not None and cancel.is_set()
        if timed_out or cancelled:
            _signal_group(pid, signal.SIGTERM)
            exited(kill_grace)
            return timed_out, cancelled
        if on_tick is not None and now >= next_tick:
            next_tick = now + tick_interval
            on_tick(now - t0)


def _child_env(env: Mapping[str, str] | None) -> dict[bytes, bytes]:
    """Our environment, the reaper's token, then ``env`` on top (as bytes: no decoding per command)."""
    data = getattr(os.environ, "_data", None)  # CPython's bytes dict behind os.environ: 1 µs, not 20
    full = dict(data) if isinstance(data, dict) else dict(os.environb)
    full[TOKEN_VAR.encode()] = _reaper.token().encode()
    for key, value in (env or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError("environment keys and values must be strings")
        full[os.fsencode(key)] = os.fsencode(value)
    return full


def kill_all() -> None:
    """SIGKILL every command still running (a process about to exit at once leaves none behind)."""
    for pgid in list(_running):
        _signal_group(pgid, signal.SIGKILL)


class _Reaper:
    """One reaper process per process that runs commands; started with the first command."""

    script = str(Path(__file__).with_name("reaper.py"))

    def __init__(self):
        self.lock = threading.Lock()
        self.pid = None  # ours: a forked child needs its own token and reaper
        self.proc: subprocess.Popen | None = None
        self.pipe: int | None = None  # the write end, never written: its closing is the signal
        self._token = ""
        self.retry_at = 0.0
        self.watched_by = None  # the pid whose watchdog thread runs (one per process)
        self.restarts = 0

    def token(self) -> str:
        if self.pid != os.getpid() or not self._alive():
            with self.lock:
                if self.pid != os.getpid() or not self._alive():
                    self._start()
        return self._token

    def _alive(self) -> bool:
        if self.proc is None:
            return time.monotonic() < self.retry_at  # it could not start: try again later, not per command
        return self.proc.poll() is None

    def _start(self) -> None:
        if self.pid != os.getpid():  # first use, or a forked child: its commands are its own
            self.pid, self._token, self.proc = os.getpid(), f"{os.getpid()}.{secrets.token_hex(8)}", None
        if self.pipe is not None:
            os.close(self.pipe)
            self.pipe = None
        read, write = os.pipe()  # not inheritable: no command holds it open
        try:
            # The same token as before: a new reaper also covers commands started under the old one.
            self.proc = subprocess.Popen([sys.executable, "-I", "-S", self.script, str(os.getpid())],
                                         env={REAPER_TOKEN_VAR: self._token}, stdin=read,
                                         stdout=subprocess.DEVNULL, start_new_session=True, close_fds=True)
            self.pipe = write
            if self.watched_by != os.getpid():
                self.watched_by = os.getpid()
                threading.Thread(target=self._watch, name="reaper-watchdog", daemon=True).start()
        except OSError as e:
            os.close(write)
            self.proc, self.retry_at = None, time.monotonic() + 10
            log.warning("cannot start the reaper: commands may outlive this process if it is killed",
                        error=str(e))
        finally:
            os.close(read)

    def _watch(self) -> None:
        """A command may kill the reaper (same user); then a kill -9 of this process would leave
        its commands running. Start a new one (same token) as soon as it dies, not at the next
        command: the window is the time a restart takes (docs/shell.md)."""
        me = os.getpid()
        while self.pid == me:
            proc = self.proc
            if proc is None:
                time.sleep(1.0)
                continue
            try:
                proc.wait()
            except Exception:  # pragma: no cover - wait() on our own child
                time.sleep(0.1)
            if self.pid != me or self.proc is not proc:
                continue
            time.sleep(0.05)  # at most 20 restarts a second, whatever kills it
            with self.lock:
                if self.pid == me and self.proc is proc:
                    self.restarts += 1
                    log.warning("the reaper died; starting a new one", pid=proc.pid, restarts=self.restarts)
                    self._start()

    def forget(self) -> None:
        """In a forked child: let go of the parent's pipe, or the parent's reaper would wait for us."""
        if self.pipe is not None:
            os.close(self.pipe)
        self.pipe, self.proc, self.pid = None, None, None


_reaper = _Reaper()
os.register_at_fork(after_in_child=_reaper.forget)


class _exit_waiter:
    """Wait for a child to exit *without reaping it* (pidfd on Linux >= 5.3, else polling)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.fd = None
        try:
            self.fd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pass

    def __call__(self, timeout: float) -> bool:
        if self.fd is not None:
            return wait_readable(self.fd, timeout)
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
