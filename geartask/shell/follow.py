"""The followed path of the shell task (``"follow": true``): stdout and stderr through pipes,
read as the command runs and sent on as WORK_DATA chunks (geartask.shell.stream).

Used only for a job that asks for it: the plain path (veryeasyprocess's temporary file) is
untouched. A reader thread drains both pipes at once, so a command that writes fast is never
held up by the rate limit (what goes past it is dropped and counted); the job's own thread
sends the chunks from veryeasyprocess's tick, as it sends the heartbeat, so the job's
connection is written by one thread only.
"""

from __future__ import annotations

import fcntl
import os
import selectors
import threading
import time
from typing import Any, Callable

from . import veryeasyprocess
from .stream import INTERVAL, TAIL, LiveOutput, register, unregister
from .veryeasyprocess import Result

PIPE_SIZE = 1024 * 1024  # asked of the kernel per pipe: fewer wakeups for a command that writes fast
DRAIN = 2.0  # seconds to read what is left once the command ended (something it left may hold the pipe)
READ = 256 * 1024  # bytes per read


class _Reader(threading.Thread):
    """Reads the command's two pipes until both are closed (or ``stop``) into a LiveOutput."""

    def __init__(self, fds: dict[int, str], live: LiveOutput):
        super().__init__(name="shell-follow-reader", daemon=True)
        self.fds, self.live = fds, live
        self.stop = threading.Event()

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        try:
            for fd in self.fds:
                sel.register(fd, selectors.EVENT_READ)
            open_fds = set(self.fds)
            while open_fds and not self.stop.is_set():
                for key, _ in sel.select(0.1):
                    fd = key.fd
                    try:
                        data = os.read(fd, READ)
                    except OSError:
                        data = b""
                    if not data:
                        sel.unregister(fd)
                        open_fds.discard(fd)
                        continue
                    self.live.add(self.fds[fd], data)
        finally:
            sel.close()
            for fd in self.fds:
                os.close(fd)


def run_followed(job: Any, spec: dict, host: str, max_output: int, heartbeat: float,
                 send: Callable[[bytes], None] | None = None) -> tuple[Result, LiveOutput]:
    """Run the checked shell job ``spec`` for ``job``, streaming its output with ``send``
    (default: WORK_DATA to the waiting client); the result's output is the last
    min(TAIL, max_output) bytes, stdout and stderr as they came."""
    send = send or job.send_data
    live = LiveOutput(host, tail=min(TAIL, max_output))
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    for fd in (out_r, err_r):
        try:
            fcntl.fcntl(fd, 1031, PIPE_SIZE)  # F_SETPIPE_SZ; the default 64 KiB works too
        except OSError:
            pass
    reader = _Reader({out_r: "stdout", err_r: "stderr"}, live)
    reader.start()
    register(job, live)
    beat = [heartbeat]

    def tick(elapsed: float) -> None:
        if elapsed >= beat[0]:  # the heartbeat, as on the plain path
            beat[0] = elapsed + heartbeat
            job.status(int(elapsed), int(spec["timeout"]))
        chunk = live.take(time.monotonic())
        if chunk is not None:
            send(chunk)

    try:
        try:
            result = veryeasyprocess.shell_2_tempfile(
                spec["cmd"], executable=spec["executable"], cwd=spec["cwd"], timeout=spec["timeout"],
                env=spec["env"], cancel=job.cancel, on_tick=tick, tick_interval=INTERVAL,
                streams=(out_w, err_w))
        finally:
            os.close(out_w)
            os.close(err_w)
            reader.join(DRAIN)
            reader.stop.set()  # a process that left the group holds the pipe: stop reading it
            reader.join()
        # What is still held goes out now, paced like the rest (a few chunks at most).
        flushed = False
        for _ in range(16):
            chunk = live.take(time.monotonic(), last=not flushed)
            flushed = True
            if chunk is not None:
                send(chunk)
            elif not live.pending():
                break
            else:
                time.sleep(live.due(time.monotonic()))
    finally:
        unregister(job)
    result.output, result.cut = live.tail.text(), live.tail.cut
    return result, live
