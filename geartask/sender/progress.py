"""A one-line progress bar for the sender on a terminal: done, failed, total, rate, time left,
and the WORK_STATUS numerator/denominator that running jobs report.

Only drawn when the stream is a terminal; the line is redrawn in place with a carriage
return and cleared before the per-job lines are printed.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import IO, Any

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
    """on_progress callback that draws on a terminal and does nothing elsewhere."""

    def __init__(self, stream: IO[str] | None = None, enabled: bool | None = None, min_interval: float = 0.1):
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.min_interval = min_interval
        self._last = 0.0
        self._drawn = False

    def __call__(self, progress: Progress) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < self.min_interval and progress.finished != progress.total:
            return
        self._last = now
        width = shutil.get_terminal_size((80, 24)).columns
        self.stream.write("\r\x1b[K" + render(progress, width))
        self.stream.flush()
        self._drawn = True

    def clear(self) -> None:
        if self.enabled and self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.clear()
