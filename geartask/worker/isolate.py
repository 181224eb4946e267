"""Plugin tasks in a child process of their own (``worker.isolate``), killed at job_timeout.

Each attempt starts ``python isolate.py CONFIG PLUGIN TASK FD`` fresh: it loads the config
and that one plugin, reads one request from stdin and answers on the pipe ``FD``, in JSON
lines (never pickle: job data is hostile input). Progress (``job.status``, ``job.send_data``)
is relayed to the client as it comes. Both halves of that contract live here.
"""

from __future__ import annotations

import base64
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if __package__ in (None, ""):  # run as a file by the worker: python .../geartask/worker/isolate.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "geartask.worker"

from geartask import gearman as gp  # noqa: E402
from geartask.errors import ConfigError  # noqa: E402
from geartask.jobs import encode_payload  # noqa: E402

from .errors import AttemptFailed, JobRejected, task_traceback  # noqa: E402

if TYPE_CHECKING:
    from ..config import Config

TICK = 0.1  # seconds between looks at the job's cancel event while the child runs
MAX_MESSAGE = 64 * 1024 * 1024  # bytes of one message from the child (a result); more is a failure


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def isolated_tasks(plugin_tasks: dict[str, tuple[Any, str]], config: Config) -> dict[str, Any]:
    """Plugin tasks (name -> (callable, plugin)) as the worker serves them: the ones named in
    ``worker.isolate`` replaced by an IsolatedTask. ConfigError for a name that is no task."""
    tasks = {name: fn for name, (fn, _) in plugin_tasks.items()}
    for i, name in enumerate(config.worker.isolate):
        if name not in plugin_tasks:
            have = ", ".join(sorted(plugin_tasks)) or "none"
            raise ConfigError(f"{name!r} is not a task of the loaded plugins (tasks: {have})",
                              str(config.source) if config.source else None, f"worker.isolate[{i}]")
        tasks[name] = IsolatedTask(name, plugin_tasks[name][1], config)
    return tasks


class IsolatedTask:
    """A task callable that runs ``task`` of ``plugin`` in a fresh child per attempt.

    A child takes ~0.2 s to import and load the plugin, so one is started ahead (after the
    first call), loads, and waits for its one request: a spare, never a reused process.
    """

    def __init__(self, task: str, plugin: str, config: Config):
        self.task, self.plugin = task, plugin
        self.config_path = str(config.source) if config.source else ""
        self.timeout = config.worker.job_timeout
        self._lock = threading.Lock()
        self._spare: tuple[subprocess.Popen, int] | None = None
        self._closed = False

    def __call__(self, job: Any) -> bytes:
        request = json.dumps({"task": job.task, "handle": job.handle, "unique": job.unique,
                              "attempt": job.attempt, "retries": job.retries,
                              "raw": _b64(job.raw)}).encode()
        proc, r = self._take()
        try:
            return self._talk(proc, r, request, job)
        finally:
            _kill(proc)
            os.close(r)

    def _start(self) -> tuple[subprocess.Popen, int]:
        r, w = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), self.config_path, self.plugin,
                 self.task, str(w)],
                stdin=subprocess.PIPE, pass_fds=(w,), start_new_session=True)
        except OSError as e:
            os.close(r)
            raise AttemptFailed(f"cannot start the isolated task's process: {e.strerror or e}") from None
        finally:
            os.close(w)
        return proc, r

    def _take(self) -> tuple[subprocess.Popen, int]:
        """The spare child if it is alive, else a new one; and a new spare for the next call."""
        with self._lock:
            child, self._spare = self._spare, None
        if child is not None and child[0].poll() is not None:
            _kill(child[0])
            os.close(child[1])
            child = None
        if child is None:
            child = self._start()
        try:
            spare: tuple[subprocess.Popen, int] | None = self._start()
        except AttemptFailed:
            return child  # out of processes for a spare: this job still runs
        with self._lock:
            if self._spare is None and not self._closed:
                self._spare, spare = spare, None
        if spare is not None:
            _kill(spare[0])
            os.close(spare[1])
        return child

    def close(self) -> None:
        """End the spare child (a worker's exit ends it anyway: it dies with its parent)."""
        with self._lock:
            self._closed = True
            spare, self._spare = self._spare, None
        if spare is not None:
            _kill(spare[0])
            os.close(spare[1])

    def _talk(self, proc: subprocess.Popen, r: int, request: bytes, job: Any) -> bytes:
        deadline = time.monotonic() + self.timeout
        stdin = proc.stdin
        assert stdin is not None  # _start opens the child with stdin=PIPE
        os.set_blocking(stdin.fileno(), False)
        os.set_blocking(r, False)
        pending = memoryview(request)
        poller = select.poll()
        poller.register(stdin.fileno(), select.POLLOUT)
        poller.register(r, select.POLLIN)
        buf = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AttemptFailed(f"timed out after {self.timeout:g}s (worker.job_timeout); the isolated "
                                    f"task's process was killed", {"timed_out": True})
            if job.cancel.is_set():
                raise AttemptFailed("cancelled: the worker is stopping")
            for fd, _ in poller.poll(int(min(left, TICK) * 1000) + 1):
                if fd == r:
                    chunk = os.read(r, 65536)
                    if not chunk:
                        proc.wait()
                        raise AttemptFailed(f"the isolated task's process exited with status "
                                            f"{proc.returncode} without an answer")
                    buf += chunk
                    if len(buf) > MAX_MESSAGE and b"\n" not in buf:
                        raise AttemptFailed(f"the isolated task's answer is over {MAX_MESSAGE} bytes")
                    while b"\n" in buf:
                        line, _, rest = bytes(buf).partition(b"\n")
                        buf = bytearray(rest)
                        final = self._on_message(line, job)
                        if final is not None:
                            return final
                elif pending:
                    try:
                        n = os.write(fd, pending[:65536])
                    except BrokenPipeError:
                        n, pending = 0, memoryview(b"")
                    pending = pending[n:]
                    if not pending:
                        poller.unregister(fd)
                        stdin.close()
                else:
                    poller.unregister(fd)

    @staticmethod
    def _on_message(line: bytes, job: Any) -> bytes | None:
        """Relay progress; the result's payload when the child is done; raise its failure."""
        try:
            msg = json.loads(line)
            if not isinstance(msg, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError) as e:
            raise AttemptFailed(f"the isolated task's process sent something unreadable: {e}") from None
        if "status" in msg:
            numerator, denominator = msg["status"]
            job.status(numerator, denominator)
        elif "data" in msg:
            job.send_data(base64.b64decode(msg["data"]))
        elif "result" in msg:
            return base64.b64decode(msg["result"])
        elif "error" in msg:
            details = msg.get("details") if isinstance(msg.get("details"), dict) else {}
            cls = JobRejected if msg.get("kind") == "rejected" else AttemptFailed
            failure = cls(str(msg["error"]), details)
            if isinstance(msg.get("traceback"), str):  # the task raised in the child: its traceback
                failure.traceback = msg["traceback"]  # type: ignore[attr-defined]
            raise failure
        return None


def _kill(proc: subprocess.Popen) -> None:
    """End the child and anything it started (its own session), and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.stdin is not None:
        try:
            proc.stdin.close()
        except OSError:
            pass
    proc.wait()


# -- the child ---------------------------------------------------------------------------
class _PipeConn:
    """What a Job sends on (``send``), written to the worker as JSON lines instead."""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, msg: dict) -> None:
        data = memoryview((json.dumps(msg) + "\n").encode())
        while data:
            data = data[os.write(self.fd, data):]

    def send(self, cmd: int, **args: Any) -> None:
        if cmd == gp.WORK_STATUS:
            self.write({"status": [int(args["numerator"]), int(args["denominator"])]})
        elif cmd == gp.WORK_DATA:
            self.write({"data": _b64(args["data"])})


def _die_with_parent() -> None:
    """PR_SET_PDEATHSIG: a worker killed with SIGKILL takes its isolated tasks along."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the worker's own kill at timeout remains
        return
    if os.getppid() == 1:  # the worker died before prctl took effect
        os._exit(1)


def child_main(argv: Sequence[str]) -> int:
    config_path, plugin, task, fd = argv[0], argv[1], argv[2], int(argv[3])
    _die_with_parent()
    out = _PipeConn(fd)
    try:
        from geartask.config import load_config
        from geartask.logs import configure_logging
        from geartask.plugins import load_plugins
        from geartask.worker.job import Job

        config = load_config(config_path or None)
        configure_logging(config.log, "isolated", task, to_file=False)
        fn = load_plugins(config, only=[plugin]).tasks()[task][0]
        req = json.loads(sys.stdin.buffer.read())
        job = Job(out, req["handle"], req["task"], req["unique"], base64.b64decode(req["raw"]),
                  config, threading.Event())
        job.attempt, job.retries = req["attempt"], req["retries"]
    except BaseException as e:  # the worker started us with a config and plugin that worked
        out.write({"error": f"the isolated task could not start: {type(e).__name__}: {e}"[:4096]})
        return 1
    try:
        result = encode_payload(fn(job), task)
    except JobRejected as e:
        out.write({"error": e.reason, "kind": "rejected", "details": _plain(e.details)})
    except AttemptFailed as e:
        out.write({"error": e.reason, "details": _plain(e.details)})
    except BaseException as e:  # whatever a task raises fails the attempt, SystemExit included
        from geartask.outcomes.record import cap_traceback
        out.write({"error": f"{type(e).__name__}: {e}"[:4096], "details": {"type": type(e).__name__},
                   # cut generously: the worker cuts it to 16 KiB, and flags it, as an in-thread task's
                   "traceback": cap_traceback(task_traceback(e), 1024 * 1024)[0]})
    else:
        out.write({"result": _b64(result)})
    return 0


def _plain(details: dict) -> dict:
    try:
        json.dumps(details, allow_nan=False)
        return details
    except (TypeError, ValueError, RecursionError):
        return {k: str(v)[:4096] for k, v in details.items()}


if __name__ == "__main__":
    code = child_main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)  # not sys.exit: a plugin's leftover threads must not keep us alive
