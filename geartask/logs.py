"""Logging for every role: structlog loggers, JSON lines in a file, human text on the console.

A log call renders and writes nothing: the event goes on a queue, and one listener thread
(the standard library's QueueListener) writes the file and the console. Per-job context
(task, handle, unique) is bound with ``job_context``; stdlib logging takes the same way.

Used as a library (nobody called ``configure_logging``), geartask's events go to the standard
library's ``geartask.*`` loggers, which carry a NullHandler: silent until the application
configures logging, as the logging HOWTO asks of a library.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import io
import json
import logging
import logging.handlers
import os
import queue
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import structlog
from structlog.typing import EventDict, Processor

from .config import LogConfig
from .display import printable
from .errors import UsageError

JOB_LOGGER = "geartask.worker.job"  # the worker's line per job: on the console only with -v
LINGER = 0.05  # seconds the listener waits after its queue runs dry, so lines are written in batches
WATCH_INTERVAL = 1.0  # seconds between checks that the log file still exists (log.dir deleted)
FLUSH_TIMEOUT = 5.0  # flush_logs waits at most this long for the listener

# The console's level per role at the default verbosity; other roles use log.level.
# The sender and the manager report on stdout, so their console shows only what went wrong.
CONSOLE_LEVELS = {"worker": logging.INFO, "sender": logging.WARNING, "manager": logging.WARNING}

_MULTILINE_FIELDS = ("exception", "stack")  # tracebacks keep their lines on the console
_PROCESS_FIELDS = ("role", "name", "pid", "thread")  # in every file line; left off the console

console_lock = threading.RLock()  # held while anything is written on the console or the status line


class StatusLine(Protocol):
    """A line drawn under the log on a terminal (the sender's progress bar): a console log
    line erases it, is printed, and draws it again, all under ``console_lock``."""

    def erase(self) -> None: ...

    def redraw(self) -> None: ...


_status_line: StatusLine | None = None


def set_status_line(line: StatusLine | None) -> None:
    """Register (or, with None, remove) the status line the console keeps under its lines."""
    global _status_line
    with console_lock:
        _status_line = line


# -- the caller's side: structlog's bound loggers put finished events on the queue ----------------

class _EventSink:
    """What structlog's bound loggers hand a finished event to: the caller's time and thread
    name are taken here, the rendering and writing happen in the listener thread."""

    __slots__ = ("name",)

    def __init__(self, name: str | None = None):
        self.name = name or "geartask"


def _sink_method(levelno: int) -> Callable[[_EventSink, dict], None]:
    def method(self: _EventSink, event: dict) -> None:
        _state.put((time.time(), levelno, self.name, threading.current_thread().name, event))
    return method


for _name, _levelno in (("debug", logging.DEBUG), ("info", logging.INFO), ("warning", logging.WARNING),
                        ("error", logging.ERROR), ("critical", logging.CRITICAL)):
    setattr(_EventSink, _name, _sink_method(_levelno))


def _to_sink(logger: Any, method: str, event: EventDict) -> tuple:
    return (event,), {}


_format_exc_info = structlog.processors.format_exc_info
_render_stack = structlog.processors.StackInfoRenderer()


def _exceptions(logger: Any, method: str, event: EventDict) -> EventDict:
    """structlog's exception and stack renderers, called only when there is one to render
    (on the caller's thread: a traceback can't be rendered later)."""
    if "exc_info" in event:
        event = _format_exc_info(logger, method, event)
    if "stack_info" in event:
        event = _render_stack(logger, method, event)
    return event


def _to_stdlib(item: Any) -> None:
    """Where events go before configure_logging (geartask used as a library): to the standard
    library's logger of the same name, as one line, only if the application enabled it."""
    if type(item) is not tuple:
        return
    created, levelno, name, thread, event = item
    logger = logging.getLogger(name)
    if not logger.isEnabledFor(levelno):
        return
    event = dict(event)
    text = str(event.pop("event", ""))
    exception = event.pop("exception", None)
    if event:
        text += " " + " ".join(f"{k}={v!r}" for k, v in event.items())
    if exception:
        text += "\n" + str(exception)
    logger.log(levelno, text)


logging.getLogger("geartask").addHandler(logging.NullHandler())  # a library is silent by default


class _State:
    """The current configuration: where events go, and the listener to stop when it changes."""
    put: Callable[[Any], None] = staticmethod(_to_stdlib)
    wrapper: Any = structlog.make_filtering_bound_logger(logging.DEBUG)  # the stdlib loggers filter
    listener: "_Listener | None" = None
    root_handlers: list[logging.Handler] = []
    handlers: list[logging.Handler] = []
    started = False


_state = _State()
_proxies: "weakref.WeakSet[Any]" = weakref.WeakSet()  # loggers from get_logger, cached on first use


# The job's fields (task, handle, unique) in one ContextVar made here, at import, once. Not
# structlog's bind_contextvars: structlog (26.1) makes a ContextVar per key on first use without
# a lock, so threads binding a key for the first time at once could get a token of another
# ContextVar back, and the reset raised ValueError into the job.
_job_fields: contextvars.ContextVar[dict] = contextvars.ContextVar("geartask_job_fields")


def _merge_job_context(logger: Any, method: str, event: EventDict) -> EventDict:
    """The job's fields on every event logged inside job_context (the event's own keys win)."""
    fields = _job_fields.get(None)
    if fields:
        for key, value in fields.items():
            event.setdefault(key, value)
    return event


_PROCESSORS: list[Processor] = [_merge_job_context, structlog.contextvars.merge_contextvars, _exceptions, _to_sink]


def get_logger(name: str = "geartask", **bound: Any) -> Any:
    """A structlog logger; ``bound`` fields go on every event it logs.

    It goes through geartask's own pipeline whatever structlog's global configuration is (an
    application's structlog setup is its own; a script that set up nothing gets no output)."""
    proxy = structlog.wrap_logger(_EventSink(name), processors=_PROCESSORS, wrapper_class=_state.wrapper,
                                  context_class=dict, cache_logger_on_first_use=True)
    _proxies.add(proxy)
    return proxy.bind(**bound) if bound else proxy


@contextlib.contextmanager
def job_context(**fields: Any) -> Iterator[None]:
    """Bind task/handle/unique (or anything) to every event logged inside, in this thread only.

    Logging never fails a job: if binding or unbinding fails, the job runs on and its lines
    lack the fields. Exceptions of the job itself pass through unchanged."""
    token = None
    try:
        token = _job_fields.set({**_job_fields.get({}), **{k: v for k, v in fields.items() if v is not None}})
    except Exception:
        pass
    try:
        yield
    finally:
        if token is not None:
            try:
                _job_fields.reset(token)
            except Exception:
                pass


# -- the listener's side: records, rendering, the file and the console ---------------------------

class _EventRecord(logging.LogRecord):
    """A structlog event on its way to the handlers; ``msg`` is the event dict. Sets only what
    handlers and formatters read: a full LogRecord costs more than the rest of the line."""

    msg: dict

    def __init__(self, created: float, levelno: int, name: str, thread: str, event: dict):  # no super(): on purpose
        self.name, self.levelno, self.levelname = name, levelno, logging.getLevelName(levelno)
        self.msg, self.args, self.created, self.threadName = event, None, created, thread
        self.exc_info = self.exc_text = self.stack_info = None


_last_second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text


def _iso(created: float) -> str:
    """ISO 8601 in UTC to the microsecond, e.g. 2026-11-25T22:29:31.123456Z."""
    global _last_second
    second = int(created)
    cached, text = _last_second
    if second != cached:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _last_second = (second, text)
    return f"{text}.{int((created - second) * 1e6):06d}Z"


def _json_fallback(value: Any) -> str:
    return repr(value)


_to_json = json.JSONEncoder(default=_json_fallback).encode  # built once: json.dumps(default=) builds one a call


def _render_json(logger: Any, method: str, event: dict) -> str:
    return _to_json(event)


class _EventFormatter(logging.Formatter):
    """Renders a record as one line with a structlog renderer: our events and the standard
    library's records (pygearman's, warnings) alike."""

    def __init__(self, renderer: Callable, fields: dict, console: bool):
        super().__init__()
        self.renderer, self.fields, self.console = renderer, fields, console

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record, _EventRecord):
            event = {**self.fields, "thread": record.threadName, **record.msg}
        else:
            event = {**self.fields, "thread": record.threadName, "event": record.getMessage()}
            if record.exc_info:
                event["exception"] = self.formatException(record.exc_info)
        event["level"] = record.levelname.lower()
        event["logger"] = record.name
        event["timestamp"] = _iso(record.created)
        if self.console:
            event = self._for_console(event, record)
        return self.renderer(None, event["level"], event)

    @staticmethod
    def _for_console(event: dict, record: logging.LogRecord) -> dict:
        """Time to the second, no process fields (one process per console), and a peer's text
        (a client id, a task name) escaped so it can't drive the operator's terminal."""
        for key in _PROCESS_FIELDS:
            event.pop(key, None)
        if record.name.startswith("geartask"):
            event.pop("logger")
        event["timestamp"] = event["timestamp"][:19] + "Z"
        return {k: printable(v) if isinstance(v, str) and k not in _MULTILINE_FIELDS else v
                for k, v in event.items()}


class _LogFile(logging.handlers.RotatingFileHandler):
    """The JSON-lines file, rotated by size like its parent, but counting the bytes it writes
    (the parent formats every record twice and stats the file to learn its size), flushed by
    the listener once per batch, made again when deleted or replaced (checked once per
    WATCH_INTERVAL), and counting the lines it could not write: one warning on stderr per
    outage, and the count in the next line written, as ``dropped_lines``."""

    def __init__(self, path: Path, max_bytes: int, backups: int):
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=True)
        self._size = 0
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) of the open file
        self._next_check = 0.0
        self.dropped = 0  # lines lost and not yet reported in a line written
        self._carried = 0  # lost lines reported in a line not flushed yet
        self._unflushed = 0  # lines written since the last flush
        self._failing = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
            return
        if self.dropped and line.endswith("}"):
            line = f'{line[:-1]}, "dropped_lines": {self.dropped}}}'
            self._carried, self.dropped = self._carried + self.dropped, 0
        line += "\n"
        try:
            if time.monotonic() >= self._next_check:  # a stat a second, not a line
                self._next_check = time.monotonic() + WATCH_INTERVAL
                self._close_if_replaced()
            stream = self._ensure_open()
            size = len(line) if line.isascii() else len(line.encode("utf-8"))
            if 0 < self.maxBytes < self._size + size and self._size:
                stream.flush()
                self._unflushed = self._carried = 0
                self.doRollover()
                self._ident = None  # a new file (or none, if the rename failed)
                stream = self._ensure_open()
            stream.write(line)
            self._size += size
            self._unflushed += 1
        except OSError as e:
            self._lost(e, 1)

    def flush(self) -> None:
        self.acquire()
        try:
            if self.stream is not None and self._unflushed:
                try:
                    self.stream.flush()
                except OSError as e:
                    self._lost(e, 0)
                else:
                    self._unflushed = self._carried = 0
                    self._failing = False
        finally:
            self.release()

    def _open(self) -> Any:
        os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
        return super()._open()

    def _ensure_open(self) -> io.TextIOWrapper:
        stream = self.stream = self._open() if self.stream is None else self.stream
        if self._ident is None:  # a file not seen yet: the first, rotated or recreated
            st = os.fstat(stream.fileno())
            self._ident, self._size = (st.st_dev, st.st_ino), st.st_size
            if st.st_size and self._failing:
                self._end_torn_line(stream)
        return stream

    def _end_torn_line(self, stream: io.TextIOWrapper) -> None:
        """A write that failed half way may have left half a line: end it."""
        with open(self.baseFilename, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                stream.write("\n")
                self._size += 1

    def _close_if_replaced(self) -> None:
        """Like WatchedFileHandler: the file was deleted or replaced (log.dir removed,
        logrotate): close ours, so the next write makes a new one."""
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

    def _lost(self, error: OSError, current: int) -> None:
        """Lines that could not be written (a full disk, an unwritable file): counted, and
        reported on stderr once per outage."""
        if not self._failing:
            self._failing = True
            try:
                sys.stderr.write(f"geartask: cannot write the log file {self.baseFilename}: "
                                 f"{error.strerror or error}; log lines are dropped (and counted, as "
                                 f"dropped_lines, in the next line written) until it works again\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
        self.dropped += self._carried + self._unflushed + current
        self._carried = self._unflushed = 0
        self._close_stream()  # reopened (the folder made again) at the next write
        self._next_check = 0.0


class _Console(logging.StreamHandler):
    """The console: a line per record; a status line (the progress bar) is erased before it
    and drawn again after it. Without a stream of its own it writes to whatever sys.stderr is
    when the line is written (a caller that swapped sys.stderr, as pytest's capture does, never
    gets a line written into the closed stream it replaced)."""

    def __init__(self, stream: Any = None):
        self._follow_stderr = stream is None
        super().__init__(stream or sys.stderr)

    @property
    def stream(self) -> Any:
        return sys.stderr if self._follow_stderr else self._stream

    @stream.setter
    def stream(self, value: Any) -> None:
        self._stream = value

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
            with console_lock:
                status = _status_line
                if status is not None:
                    status.erase()
                self.stream.write(line)
                self.stream.flush()
                if status is not None:
                    status.redraw()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


class _FlushRequest:
    def __init__(self) -> None:
        self.done = threading.Event()


class _Listener(logging.handlers.QueueListener):
    """The thread that renders and writes every line. After its queue runs dry it flushes the
    file and waits LINGER seconds, so a busy process writes a batch at a time: a write per line
    is a system call and a GIL hand-off among busy job threads."""

    queue: queue.SimpleQueue

    def dequeue(self, block: bool) -> Any:
        try:
            return self.queue.get_nowait()
        except queue.Empty:
            pass
        self.flush_handlers()
        time.sleep(LINGER)
        return self.queue.get(block)

    def prepare(self, item: Any) -> Any:
        return _EventRecord(*item) if type(item) is tuple else item

    def handle(self, record: Any) -> None:
        if isinstance(record, _FlushRequest):
            self.flush_handlers()
            record.done.set()
            return
        try:
            super().handle(record)
        except Exception:
            pass  # handlers report their own errors (handleError); nothing may end this thread

    def flush_handlers(self) -> None:
        for h in self.handlers:
            try:
                h.flush()
            except Exception:
                pass  # a closed console (a test's captured stderr) must not end this thread


class _ToListener(logging.handlers.QueueHandler):
    """The root logger's handler: standard-library records join structlog's events on the
    listener's queue. Lock-free (the queue is thread-safe), so logging.shutdown can't hold a
    lock the listener waits for; closing it drains the queue."""

    def createLock(self) -> None:
        self.lock = None

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)  # the message now: its arguments may change before the listener runs
        record.msg, record.args = record.getMessage(), None
        return record

    def close(self) -> None:
        _stop_listener()
        super().close()


def _stop_listener() -> None:
    listener, _state.listener = _state.listener, None
    if listener is not None and _state.started:
        _state.started = False
        listener.stop()  # the sentinel goes after every queued line: they are all written first


def flush_logs() -> None:
    """Write out every queued log line now (before os._exit, or in a test before reading the file)."""
    listener = _state.listener
    if listener is None:
        return
    if not _state.started:
        listener.flush_handlers()
        return
    request = _FlushRequest()
    _state.put(request)
    request.done.wait(FLUSH_TIMEOUT)


def log_file_path(log: LogConfig, role: str, name: str | None = None) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in (name or ""))
    return Path(log.dir) / (f"{role}-{safe}.log" if safe else f"{role}.log")


def console_level(role: str, log: LogConfig, verbosity: int = 0) -> int:
    """-q (verbosity -1): errors only; -v (1): debug; else the role's CONSOLE_LEVELS entry."""
    if verbosity < 0:
        return logging.ERROR
    if verbosity > 0:
        return logging.DEBUG
    return CONSOLE_LEVELS.get(role, getattr(logging, log.level.upper()))


def configure_logging(log: LogConfig, role: str, name: str | None = None, *,
                      to_file: bool = True, stream: Any = None, verbosity: int = 0,
                      console_format: str | None = None) -> Path | None:
    """Set up logging for this process; returns the JSON log file's path (or None).

    The file gets JSON lines at ``log.level``. The console (``stream``, default stderr) gets
    human text, or JSON lines when ``console_format`` (else ``log.format``) is ``json``, at
    the level ``console_level`` gives for the role and ``verbosity`` (-1 for -q, 1 for -v);
    the worker's per-job lines only at -v. With a file, a listener thread does the writing;
    without one, lines are written at once. Safe to call again (tests do): the previous
    setup is drained and replaced.
    """
    _teardown()
    fields = {"role": role, "name": name or role, "pid": os.getpid()}
    file_level = getattr(logging, log.level.upper())
    shown = console_level(role, log, verbosity)
    fmt = (console_format or log.format).lower()

    handlers: list[logging.Handler] = []
    path = None
    if to_file:
        path = log_file_path(log, role, name)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8"):
                pass
        except OSError as e:
            raise UsageError(f"log.dir: cannot write the log file {path}: {e.strerror or e}") from None
        file = _LogFile(path, log.max_bytes, log.backups)
        file.setFormatter(_EventFormatter(_render_json, fields, console=False))
        file.setLevel(file_level)
        handlers.append(file)
    console = _Console(stream)
    console.setFormatter(_EventFormatter(
        _render_json if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False),
        fields, console=fmt != "json"))
    console.setLevel(shown)
    if verbosity <= 0:
        console.addFilter(lambda record: record.name != JOB_LOGGER)
    handlers.append(console)

    listener = _Listener(queue.SimpleQueue(), *handlers, respect_handler_level=True)
    _state.listener, _state.handlers = listener, handlers
    root = logging.getLogger()
    if to_file:
        _state.put = listener.queue.put
        _state.root_handlers = [_ToListener(listener.queue)]  # made last: logging.shutdown closes it first
        listener.start()
        _state.started = True
    else:  # a short-lived helper (an isolated task's process): written at once
        _state.put = listener.handle
        _state.root_handlers = handlers
    for h in _state.root_handlers:
        root.addHandler(h)

    level = min(file_level if to_file else logging.CRITICAL, shown)
    root.setLevel(level)
    _state.wrapper = structlog.make_filtering_bound_logger(level)
    # This process is a geartask command: structlog loggers of plugins take the same pipeline.
    structlog.configure(
        processors=_PROCESSORS,
        wrapper_class=_state.wrapper,
        logger_factory=_EventSink,
        context_class=dict,
        cache_logger_on_first_use=True,
    )
    for proxy in list(_proxies):  # loggers cached under the previous setup build themselves again
        proxy._wrapper_class = _state.wrapper  # set by wrap_logger; structlog has no setter for it
        proxy.__dict__.pop("bind", None)
    logging.captureWarnings(True)
    return path


def _teardown() -> None:
    """Drain and close the previous setup's handlers."""
    root = logging.getLogger()
    for h in _state.root_handlers:
        root.removeHandler(h)
    _stop_listener()
    for h in {*_state.root_handlers, *_state.handlers}:
        h.close()
    _state.root_handlers, _state.handlers = [], []
