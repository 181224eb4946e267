"""A one-line progress bar for the sender on a terminal: done, failed, total, rate, time left,
and the WORK_STATUS numerator/denominator that running jobs report.

Only drawn when the stream is a terminal. It is the console's status line (geartask.logs):
a log line erases it, is printed, and the bar is drawn again under it.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import IO, Any

from .. import logs
from .sender import Progress


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def render(p: Progress, width: int = 80) -> str:
    """The bar as text, fitted to ``width`` columns."""
    finished = p.finished
    if p.total is None:  # jobs still coming from a plugin: the bar shows what was accepted
        frac = min(1.0, finished / p.accepted) if p.accepted else 0.0
    else:
        frac = finished / p.total if p.total else 1.0
    text = (f" {p.done} done, {p.failed} failed, {finished}/{'?' if p.total is None else p.total}"
            f"  {p.rate:.1f}/s  left {_duration(p.eta)}")
    if p.running:
        task, num, den = p.running[0]
        more = f" +{len(p.running) - 1}" if len(p.running) > 1 else ""
        text += f"  {task} {num}/{den}{more}"
    bar_width = max(10, min(30, width - len(text) - 3))
    filled = int(round(frac * bar_width))
    line = "[" + "#" * filled + "-" * (bar_width - filled) + "]" + text
    return line[:max(1, width - 1)]


class ProgressBar:
    """on_progress callback that draws on a terminal and does nothing elsewhere. Used as a
    context manager, it is the console's status line while it lasts."""

    def __init__(self, stream: IO[str] | None = None, enabled: bool | None = None, min_interval: float = 0.1):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.min_interval = min_interval
        self._last = 0.0
        self._text: str | None = None  # the bar last drawn; None after clear()
        self._drawn = False  # on the terminal now

    def __call__(self, progress: Progress) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < self.min_interval and progress.finished != progress.total:
            return
        self._last = now
        width = shutil.get_terminal_size((80, 24)).columns
        with logs.console_lock:
            self._text = render(progress, width)
            self.redraw()

    def erase(self) -> None:
        """Take the bar off the terminal; redraw() puts it back."""
        with logs.console_lock:
            if self.enabled and self._drawn:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
                self._drawn = False

    def redraw(self) -> None:
        with logs.console_lock:
            if self.enabled and self._text is not None:
                self.stream.write("\r\x1b[K" + self._text)
                self.stream.flush()
                self._drawn = True

    def clear(self) -> None:
        """Erase the bar until the next progress report (before a line is printed on stdout)."""
        with logs.console_lock:
            self.erase()
            self._text = None

    def __enter__(self) -> "ProgressBar":
        if self.enabled:
            logs.set_status_line(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            logs.set_status_line(None)
        self.clear()
