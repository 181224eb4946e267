"""Printing followed jobs' live output as it comes, one line per output line, pdsh style::

    web3.example.com | a line the command wrote to stdout
    web3.example.com |! a line it wrote to stderr
    web3.example.com |# 1048576 bytes of output dropped so far (over the stream's rate)

``FollowPrinter`` takes the WORK_DATA chunks (geartask.shell.stream) of any number of jobs,
interleaved, as ``JobSender.stream(..., on_data=printer.on_data)`` hands them over; a line
cut between two chunks waits, per job and stream, for its end (or the job's end:
``printer.end(result)``). Every chunk is checked before use (it comes from whoever answered
the job) and every line is escaped for the terminal (geartask.display.printable).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

from ..display import printable
from ..shell.stream import STREAMS, TAIL, parse_chunk

MARKS = {"stdout": "|", "stderr": "|!"}  # what follows the host name on a line of each stream
NOTICE = "|#"  # the printer's own notes (output dropped, malformed chunks)
MAX_LINE = 64 * 1024  # characters of a line held while its end has not come; longer ones are split
NOTICE_EVERY = 1.0  # seconds between two "dropped so far" notes of one job
MAX_HOST_SHOWN = 80  # characters of a host name printed


class _Followed:
    __slots__ = ("host", "partial", "dropped", "noted_at", "bad")

    def __init__(self) -> None:
        self.host = ""  # from the job's first good chunk
        self.partial = {s: "" for s in STREAMS}
        self.dropped = 0  # the largest count a chunk gave
        self.noted_at = float("-inf")  # when "dropped so far" was last printed
        self.bad = 0  # chunks that were not chunks


class FollowPrinter:
    """Prints the live output of several followed jobs at once (see the module docstring).
    ``clock`` is for tests. Thread-safe: one lock around each call."""

    def __init__(self, out: TextIO | None = None, clock=time.monotonic):
        self.out = out if out is not None else sys.stdout
        self.clock = clock
        self.jobs: dict[Any, _Followed] = {}
        self.lock = threading.Lock()

    @staticmethod
    def key(result: Any) -> Any:
        """A job's key: its unique key (fan-out gives each host's job its own)."""
        return getattr(result, "unique", result)

    def on_data(self, result: Any, raw: bytes) -> None:
        """JobSender's ``on_data``: one WORK_DATA payload of the job ``result``."""
        self.feed(self.key(result), raw)

    def feed(self, key: Any, raw: bytes) -> None:
        with self.lock:
            job = self.jobs.get(key)
            if job is None:
                job = self.jobs[key] = _Followed()
            chunk = parse_chunk(raw)
            if chunk is None:
                job.bad += 1
                return
            if not job.host:
                job.host = printable(chunk.host)[:MAX_HOST_SHOWN]
            lines: list[str] = []
            if chunk.dropped > job.dropped:
                # Output was dropped just before this chunk: a line held from before is cut.
                job.dropped = chunk.dropped
                self._flush(job, lines)
                now = self.clock()
                if now - job.noted_at >= NOTICE_EVERY:
                    lines.append(f"{job.host} {NOTICE} {job.dropped} bytes of output dropped so far "
                                 f"(over the stream's rate; the result keeps the last {TAIL // 1024} KiB)")
                    job.noted_at = now
            for stream, text in chunk.parts:
                self._lines(job, stream, text, lines)
            self._write(lines)

    def end(self, result: Any) -> None:
        """The job ``result`` (or key) ended: its unfinished lines and the totals are printed."""
        key = self.key(result)
        with self.lock:
            job = self.jobs.pop(key, None)
            if job is None:
                return
            host = job.host or printable(str(key))[:MAX_HOST_SHOWN]
            lines: list[str] = []
            self._flush(job, lines)
            if job.dropped:
                lines.append(f"{host} {NOTICE} {job.dropped} bytes of output were not streamed (over the rate); "
                             f"the result keeps the last {TAIL // 1024} KiB")
            if job.bad:
                lines.append(f"{host} {NOTICE} {job.bad} malformed output chunk(s) ignored")
            self._write(lines)

    def close(self) -> None:
        """Every job still open ends (the sender stopped waiting)."""
        for key in list(self.jobs):
            self.end(key)

    @staticmethod
    def _flush(job: _Followed, lines: list[str]) -> None:
        """The job's unfinished lines, as they are."""
        for stream in STREAMS:
            if job.partial[stream]:
                lines.append(f"{job.host} {MARKS[stream]} {printable(job.partial[stream].expandtabs())}")
                job.partial[stream] = ""

    def _lines(self, job: _Followed, stream: str, text: str, lines: list[str]) -> None:
        held = job.partial[stream] + text
        *whole, rest = held.split("\n")
        while len(rest) > MAX_LINE:  # no end in sight: print what is held as a line of its own
            whole.append(rest[:MAX_LINE])
            rest = rest[MAX_LINE:]
        job.partial[stream] = rest
        mark = f"{job.host} {MARKS[stream]} "
        for line in whole:
            if line.endswith("\r"):
                line = line[:-1]
            lines.append(mark + printable(line.expandtabs()))

    def _write(self, lines: list[str]) -> None:
        if lines:
            self.out.write("\n".join(lines) + "\n")
            self.out.flush()
