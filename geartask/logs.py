"""structlog, configured once per process: readable on a terminal, JSON lines in the file.

Every event carries role, name, pid and thread; per-job context (task, handle, unique)
is bound with ``job_context`` and lives in contextvars, which each thread has its own of,
so one job's story can be pulled out of a multi-threaded log with grep or jq.
Stdlib logging (pygearman's included) goes through the same processors and handlers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import structlog

from .config import LogConfig
from .display import printable
from .errors import UsageError

_process_fields: dict[str, Any] = {}
_handlers: list[logging.Handler] = []


def _add_process_fields(logger: Any, method: str, event: dict) -> dict:
    for key, value in _process_fields.items():
        event.setdefault(key, value)
    event.setdefault("pid", os.getpid())
    event.setdefault("thread", threading.current_thread().name)
    return event


def _shared_processors() -> list:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        _add_process_fields,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
    ]


BUFFER_LINES = 2000  # buffered mode: lines that wake the writer early
FLUSH_INTERVAL = 0.05  # buffered mode: seconds a line may wait before it is written
WATCH_INTERVAL = 1.0  # seconds between checks that the log file still exists (log.dir deleted)


class _RotatingFileHandler(logging.handlers.RotatingFileHandler):
    """Formats each record once: the stdlib's shouldRollover formats every record a second
    time (and stats the file twice) only to learn its length; we count what we wrote.
    ``mirror``: a stream that gets the same line (the console, when it is JSON too), so a
    record is rendered once for both."""

    _size: int | None = None
    _ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
    _next_check = 0.0
    dropped = 0  # lines lost since the last successful write: full disk, deleted or unwritable file
    mirror: Any = None
    mirror_level: int = logging.NOTSET
    _pending: list | None = None  # buffered mode: lines waiting for the writer thread
    _writer: threading.Thread | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(self.format(record) + self.terminator, record.levelno)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def write_line(self, msg: str, levelno: int) -> None:
        """Write one rendered line, or queue it for the writer thread. Caller holds the lock."""
        if self._pending is None:
            self._write([(msg, levelno)])
            return
        self._pending.append((msg, levelno))
        if levelno >= logging.WARNING or len(self._pending) >= BUFFER_LINES:
            self._wake.set()

    def start_writer(self) -> None:
        """Buffered mode: a thread writes queued lines every FLUSH_INTERVAL seconds (at once for
        a warning), in one write per batch. Every line written from a busy multi-threaded
        process cost two syscalls, each a GIL hand-off: a third of a no-op job's time (bench)."""
        if self._writer is not None:
            return
        self._pending, self._wake = [], threading.Event()
        self._writer = threading.Thread(target=self._drain_forever, name="log-writer", daemon=True)
        self._writer.start()

    def _drain_forever(self) -> None:
        while self._writer is not None:
            self._wake.wait(FLUSH_INTERVAL)
            self._wake.clear()
            self.drain()

    def drain(self) -> None:
        """Write every queued line now (the writer thread, flush_logs, and close).

        Only the handler's own lock, held while writing: a second lock taken in the other
        order by logging.shutdown (handler lock, then close -> drain) deadlocked the exit.
        """
        if self._pending is None:
            return
        self.acquire()
        try:
            lines, self._pending = self._pending, []
            if lines:
                self._write(lines)
        except Exception:
            pass  # a full disk must not stop the process; lines are lost, not jobs
        finally:
            self.release()

    def _write(self, lines: list) -> None:
        now = time.monotonic()
        if now >= self._next_check:  # a stat a second, not a line: the worker logs every job
            self._next_check = now + WATCH_INTERVAL
            self._reopen_if_replaced()
        if self.dropped:
            msg, levelno = lines[0]
            if msg.endswith("}\n"):  # the next line written says how many went missing
                lines = [(f'{msg[:-2]}, "dropped_lines": {self.dropped}}}\n', levelno)] + lines[1:]
        try:
            self._write_file(lines)
        except OSError as e:
            self._lost(len(lines), e)
        else:
            self.dropped = 0
        if self.mirror is not None:
            shown = [msg for msg, levelno in lines if levelno >= self.mirror_level]
            if shown:
                self.mirror.write("".join(shown))
                self.mirror.flush()

    def _write_file(self, lines: list) -> None:
        self._ensure_open()
        chunk: list[str] = []
        for msg, _ in lines:
            size = len(msg) if msg.isascii() else len(msg.encode(self.encoding or "utf-8"))
            if 0 < self.maxBytes < self._size + size and self._size:
                if chunk:
                    self.stream.write("".join(chunk))
                    chunk = []
                self.doRollover()
                self._ident = None  # a new file (or none, if the rename failed)
                self._ensure_open()
            chunk.append(msg)
            self._size += size
        if chunk:
            self.stream.write("".join(chunk))
        self.stream.flush()

    def _ensure_open(self) -> None:
        if self.stream is None:
            os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
            self.stream = self._open()
        if self._ident is None:  # a file not seen yet: the first, rotated or recreated
            st = os.fstat(self.stream.fileno())
            self._ident, self._size = (st.st_dev, st.st_ino), st.st_size
            if self.dropped and st.st_size:
                self._end_torn_line()

    def _end_torn_line(self) -> None:
        """A write that failed half way may have left half a line: end it, so the next line
        is a line of its own."""
        with open(self.baseFilename, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                self.stream.write("\n")
                self._size = (self._size or 0) + 1

    def _reopen_if_replaced(self) -> None:
        """Like WatchedFileHandler: when the file was deleted or replaced (log.dir removed,
        logrotate), close ours so the next write makes a new one."""
        if self.stream is None or self._ident is None:
            return
        try:
            st = os.stat(self.baseFilename)
            if (st.st_dev, st.st_ino) == self._ident:
                return
        except FileNotFoundError:
            pass
        except OSError:
            return
        self._close_stream()

    def _close_stream(self) -> None:
        stream, self.stream, self._ident = self.stream, None, None
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass  # its buffer is lost with the disk that refused it; counted by the caller

    def _lost(self, count: int, error: OSError) -> None:
        """Lines that could not be written: counted, reported on stderr once per outage."""
        if not self.dropped:
            try:
                sys.stderr.write(f"geartask: cannot write the log file {self.baseFilename}: "
                                 f"{error.strerror or error}; log lines are dropped (and counted, as "
                                 f"dropped_lines, in the next line written) until it works again\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
        self.dropped += count
        self._close_stream()  # reopened (the folder recreated) at the next write
        self._next_check = 0.0

    def close(self) -> None:
        self.drain()
        self._writer = None
        super().close()


def flush_logs() -> None:
    """Write out every buffered log line now (before os._exit, or at the end of a test)."""
    for h in _handlers:
        if isinstance(h, _RotatingFileHandler):
            h.drain()


# Set by configure_logging when every handler writes JSON lines, so HotLogger may write
# its lines straight to the file handler (which mirrors them to a JSON console).
_hot: dict[str, Any] = {}


class HotLogger:
    """For events logged once per job, where the usual path costs more than the job.

    Writes the same JSON line the structlog pipeline would (event, level, logger, role,
    name, pid, thread, timestamp, the job context and the fields), but renders it with one
    json.dumps and writes it straight to the log file, skipping the stdlib LogRecord and
    the processor chain. Falls back to the usual path whenever logging is not JSON-only
    (a console on a terminal, or logging not configured)."""

    def __init__(self, name: str):
        self.name = name

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, "info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, "warning", event, fields)

    def _log(self, levelno: int, level: str, event: str, fields: dict) -> None:
        handler = _hot.get("handler")
        if handler is None:
            getattr(structlog.get_logger(self.name), level)(event, **fields)
            return
        if levelno < _hot["level"]:
            return
        line = {**_process_fields, "pid": os.getpid(), "thread": threading.current_thread().name,
                **structlog.contextvars.get_contextvars(), **fields,
                "event": event, "level": level, "logger": self.name,
                "timestamp": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")}
        msg = json.dumps(line, default=repr) + "\n"
        handler.acquire()
        try:
            handler.write_line(msg, levelno)
        except Exception:
            pass  # a full disk must not fail a job; the usual path would print to stderr
        finally:
            handler.release()


def _printable_values(logger: Any, method: str, event: dict) -> dict:
    """Readable console only (JSON escapes by itself): a peer's text in an event (a client id,
    a task name) must not drive the operator's terminal."""
    return {k: printable(v) if isinstance(v, str) and k not in _MULTILINE_FIELDS else v for k, v in event.items()}


_MULTILINE_FIELDS = ("exception", "stack")  # tracebacks keep their lines


def log_file_path(log: LogConfig, role: str, name: str | None = None) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in (name or ""))
    return Path(log.dir) / (f"{role}-{safe}.log" if safe else f"{role}.log")


def configure_logging(log: LogConfig, role: str, name: str | None = None, *,
                      to_file: bool = True, stream: Any = None,
                      console_level: str | None = None, buffered: bool = False) -> Path | None:
    """Set up logging for this process; returns the JSON log file's path (or None).

    ``console_level`` (e.g. "warning") keeps the console quieter than the log file.
    ``buffered``: a writer thread writes the file (and a JSON console) in batches, at most
    FLUSH_INTERVAL seconds late, at once for warnings; for busy multi-threaded processes.

    Safe to call again (tests do): earlier geartask handlers are replaced, not stacked.
    """
    stream = stream or sys.stderr
    _process_fields.clear()
    _process_fields.update(role=role, name=name or role)
    level = getattr(logging, log.level.upper())
    shared = _shared_processors()

    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )

    fmt = log.format
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    console_renderer = (structlog.dev.ConsoleRenderer(colors=False) if fmt == "console"
                        else structlog.processors.JSONRenderer())

    root = logging.getLogger()
    for h in _handlers:
        root.removeHandler(h)
        h.close()
    _handlers.clear()

    path = None
    fh = None
    if to_file:
        path = log_file_path(log, role, name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fh = _RotatingFileHandler(path, maxBytes=log.max_bytes, backupCount=log.backups, encoding="utf-8")
        except OSError as e:
            raise UsageError(f"log.dir: cannot write the log file {path}: {e.strerror or e}") from None
        if buffered:
            fh.start_writer()  # logging.shutdown closes the handler at exit, which drains it
        fh.setFormatter(structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        structlog.processors.JSONRenderer()]))
    console_level = getattr(logging, console_level.upper()) if console_level else logging.NOTSET
    _hot.clear()
    if fh is not None and fmt == "json":
        fh.mirror, fh.mirror_level = stream, console_level  # the console line is the file line: render it once
        _hot.update(handler=fh, level=level)
    else:
        console = logging.StreamHandler(stream)
        console.setFormatter(structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                        *([_printable_values] if fmt == "console" else []), console_renderer]))
        console.setLevel(console_level)
        _handlers.append(console)
    if fh is not None:
        _handlers.append(fh)

    for h in _handlers:
        root.addHandler(h)
    root.setLevel(level)
    logging.captureWarnings(True)
    return path


def get_logger(name: str = "geartask", **bound: Any) -> Any:
    return structlog.get_logger(name).bind(**bound) if bound else structlog.get_logger(name)


@contextlib.contextmanager
def job_context(**fields: Any) -> Iterator[None]:
    """Bind task/handle/unique (or anything) to every event logged inside, in this thread only."""
    fields = {k: v for k, v in fields.items() if v is not None}
    tokens = structlog.contextvars.bind_contextvars(**fields)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
