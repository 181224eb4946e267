"""Logging: JSON lines in the file, human text on the console (JSON only when asked), -v/-q,
the worker's quiet console, the progress bar as the console's status line, and a log file
that survives being deleted, a full disk and the process's exit."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest

import gearclient
from geartask.config import LogConfig, load_config
from geartask.logs import JOB_LOGGER, configure_logging, flush_logs, get_logger, job_context
from helpers import PYTHON, REPO, run_on_a_terminal, run_script, wait_until, write_config
from workers import WorkerProc

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \[(\w+)\s*\] (\S.*)$")


def read_events(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def text_lines(text: str) -> list[tuple[str, str]]:
    """(level, event) of every human console line in ``text``; fails on any other line."""
    found = []
    for line in text.splitlines():
        m = TEXT_LINE.match(line)
        assert m, f"not a console log line: {line!r}"
        found.append((m.group(1), m.group(2).split("  ")[0].strip()))  # the event is padded before its fields
    return found


def test_json_file_carries_process_thread_and_job_fields(tmp_path):
    stream = io.StringIO()
    path = configure_logging(LogConfig(dir=tmp_path / "logs"), "worker", "w1", stream=stream)
    assert path == tmp_path / "logs" / "worker-w1.log"
    log = get_logger("geartask.test")

    def job(n):
        with job_context(task="eg.reverse", handle=f"H:x:{n}", unique=f"u{n}"):
            log.info("job done", outcome="complete")
        log.info("between jobs")

    threads = [threading.Thread(target=job, args=(n,), name=f"worker-{n}") for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flush_logs()

    events = read_events(path)
    done = [e for e in events if e["event"] == "job done"]
    assert len(done) == 3
    for e in done:
        n = e["thread"].split("-")[1]
        assert e["handle"] == f"H:x:{n}" and e["unique"] == f"u{n}" and e["task"] == "eg.reverse"
        assert e["role"] == "worker" and e["name"] == "w1" and e["pid"] == os.getpid()
        assert e["level"] == "info" and e["logger"] == "geartask.test"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", e["timestamp"])
    # context is cleared after the job: no handle leaks into later events
    assert all("handle" not in e for e in events if e["event"] == "between jobs")


def test_stdlib_logging_goes_through_the_same_pipeline(tmp_path):
    path = configure_logging(LogConfig(dir=tmp_path), "sender", "s1", stream=io.StringIO())
    logging.getLogger("gearman.connection").warning("socket trouble %s", "here")
    flush_logs()
    (event,) = [e for e in read_events(path) if e["event"] == "socket trouble here"]
    assert event["logger"] == "gearman.connection" and event["role"] == "sender" and event["level"] == "warning"


# -- the console: text unless asked, levels per role and -v/-q -----------------------------------

@pytest.mark.parametrize("fmt", ["text", "auto", "console"])
def test_the_console_is_human_text_on_a_non_terminal_stream(tmp_path, fmt):
    """A StringIO is not a terminal: the console used to get JSON there (log.format: auto).
    Now it is text whatever the stream; auto and console are the old names of text."""
    stream = io.StringIO()
    path = configure_logging(LogConfig(dir=tmp_path, format=fmt), "worker", "t", stream=stream)
    get_logger("geartask.worker").warning("server unreachable", server="127.0.0.1:4730", attempt=2)
    flush_logs()
    [(level, event)] = text_lines(stream.getvalue())
    line = stream.getvalue()
    assert level == "warning" and event == "server unreachable"
    assert "server=127.0.0.1:4730" in line and "attempt=2" in line
    assert "role=" not in line and "pid=" not in line  # one process per console: no process fields
    assert read_events(path)[0]["event"] == "server unreachable"  # the file stays JSON


def test_json_on_the_console_only_when_asked(tmp_path):
    for kwargs, config_format in (({"console_format": "json"}, "text"), ({}, "json")):
        stream = io.StringIO()
        configure_logging(LogConfig(dir=tmp_path, format=config_format), "worker", "j", stream=stream, **kwargs)
        get_logger("geartask.worker").warning("server unreachable", server="s:1")
        flush_logs()
        [line] = stream.getvalue().splitlines()
        event = json.loads(line)
        assert event["event"] == "server unreachable" and event["role"] == "worker" and event["server"] == "s:1"


def test_old_log_format_names_still_load(tmp_path):
    for value in ("auto", "console", "text", "json"):
        path = tmp_path / f"{value}.yaml"
        path.write_text(f"log:\n  format: {value}\n")
        assert load_config(path).log.format == value


def _console_and_file(tmp_path, role, verbosity, name="c"):
    stream = io.StringIO()
    path = configure_logging(LogConfig(dir=tmp_path / f"{role}{verbosity}"), role, name, stream=stream,
                             verbosity=verbosity)
    log, jobs = get_logger(f"geartask.{role}"), get_logger(JOB_LOGGER)
    log.debug("a debug line")
    log.info("worker started")
    jobs.info("job", attempt=1, outcome="complete")
    log.warning("server slow")
    log.error("cannot record background jobs")
    flush_logs()
    return [event for _, event in text_lines(stream.getvalue())], [e["event"] for e in read_events(path)]


def test_the_worker_console_shows_what_an_operator_needs_and_every_job_only_at_verbose(tmp_path):
    console, file = _console_and_file(tmp_path, "worker", 0)
    everything = ["a debug line", "worker started", "job", "server slow", "cannot record background jobs"]
    assert console == ["worker started", "server slow", "cannot record background jobs"]
    assert file == everything[1:]
    console, file = _console_and_file(tmp_path, "worker", 1)  # -v: debug too, and the job lines
    assert console == everything
    assert file == everything[1:]  # the file keeps log.level (info)
    console, file = _console_and_file(tmp_path, "worker", -1)  # -q: errors only
    assert console == ["cannot record background jobs"] and file == everything[1:]


def test_the_sender_and_manager_consoles_show_only_what_went_wrong(tmp_path):
    for role in ("sender", "manager"):
        console, file = _console_and_file(tmp_path, role, 0)
        assert console == ["server slow", "cannot record background jobs"]
        assert file == ["worker started", "job", "server slow", "cannot record background jobs"]


def test_reconfiguring_does_not_stack_handlers(tmp_path):
    for _ in range(3):
        configure_logging(LogConfig(dir=tmp_path), "worker", "w2", stream=io.StringIO())
    get_logger().info("once")
    flush_logs()
    assert [e["event"] for e in read_events(tmp_path / "worker-w2.log")].count("once") == 1


def test_a_logger_used_before_reconfiguring_follows_the_new_setup(tmp_path):
    """Loggers are cached on first use (structlog's cache_logger_on_first_use); a cached
    logger kept the level of the setup it was first used under."""
    log = get_logger("geartask.test.cached")
    configure_logging(LogConfig(dir=tmp_path / "a", level="error"), "worker", "a", stream=io.StringIO())
    log.info("dropped")
    path = configure_logging(LogConfig(dir=tmp_path / "b"), "worker", "b", stream=io.StringIO())
    log.info("kept")
    flush_logs()
    assert [e["event"] for e in read_events(path)] == ["kept"]


def test_file_is_rotated_by_size(tmp_path):
    path = configure_logging(LogConfig(dir=tmp_path, max_bytes=2000, backups=2), "worker", "rot",
                             stream=io.StringIO())
    log = get_logger()
    for i in range(200):
        log.info("filler", i=i, pad="x" * 50)
    flush_logs()
    files = [path.with_name(path.name + f".{n}") for n in (2, 1)] + [path]
    assert all(f.exists() and 0 < f.stat().st_size <= 2000 for f in files)
    numbers = [e["i"] for f in files for e in read_events(f)]
    assert numbers == sorted(numbers) and numbers[-1] == 199  # in order, the newest kept


def test_a_console_gets_a_peers_text_escaped(tmp_path):
    stream = io.StringIO()
    path = configure_logging(LogConfig(dir=tmp_path), "manager", stream=stream)
    get_logger().warning("shutdown", worker="evil\x1b]0;pwned\x07\nforged")
    flush_logs()
    assert "\x1b]0" not in stream.getvalue() and "evil\\x1b]0;pwned\\x07\\nforged" in stream.getvalue()
    assert len(stream.getvalue().splitlines()) == 1
    assert read_events(path)[0]["worker"] == "evil\x1b]0;pwned\x07\nforged"  # the file keeps it exact


def test_an_exception_is_rendered_where_it_happened(tmp_path):
    stream = io.StringIO()
    path = configure_logging(LogConfig(dir=tmp_path), "worker", "exc", stream=stream)
    try:
        {}["missing"]
    except KeyError:
        get_logger().exception("worker thread error")
    flush_logs()
    (event,) = read_events(path)
    assert event["level"] == "error" and "KeyError: 'missing'" in event["exception"]
    assert "Traceback (most recent call last):\n" in stream.getvalue()  # on the console, on its own lines


def test_the_progress_bar_is_erased_for_a_log_line_and_drawn_again_under_it(tmp_path):
    from geartask.sender import sender as clients
    from geartask.sender.progress import ProgressBar, render
    stream = io.StringIO()
    configure_logging(LogConfig(dir=tmp_path), "sender", stream=stream)
    progress = clients.Progress(total=10, done=3, failed=1, accepted=10, elapsed=2.0, running=[])
    with ProgressBar(stream, enabled=True) as bar:
        bar(progress)
        get_logger().warning("server slow", server="s:1")
        flush_logs()
    bar_text, erase = re.escape(render(progress, 80)), re.escape("\r\x1b[K")
    # drawn; erased; the log line on a line of its own; drawn again under it; erased at the end
    assert re.fullmatch(f"{erase}{bar_text}{erase}\\d{{4}}-\\S+Z \\[warning\\s*\\] server slow\\s+server=s:1\n"
                        f"{erase}{bar_text}{erase}", stream.getvalue()), repr(stream.getvalue())


# -- exit, deleted folders, full disks ------------------------------------------------------------

EXIT_AFTER_LOGGING = """
import os, sys
from geartask.config import LogConfig
from geartask.logs import configure_logging, flush_logs, get_logger
configure_logging(LogConfig(dir=sys.argv[1]), "worker", "x", stream=open(os.devnull, "w"))
log = get_logger("t")
for i in range(5000):
    log.info("line", i=i)
if sys.argv[2] == "exit":
    sys.exit(0)  # logging.shutdown drains the queue
flush_logs()
os._exit(0)  # the worker's second signal: nothing drains but flush_logs
"""


@pytest.mark.parametrize("how", ["exit", "os._exit"])
def test_every_queued_line_is_written_before_the_process_ends(tmp_path, how):
    r = subprocess.run([sys.executable, "-c", EXIT_AFTER_LOGGING, str(tmp_path), how.split(".")[-1]],
                       cwd=REPO, timeout=60, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [e["i"] for e in read_events(tmp_path / "worker-x.log")] == list(range(5000))


EXIT_WHILE_LOGGING = """
import os, sys, threading, time
from geartask.config import LogConfig
from geartask.logs import configure_logging, get_logger
configure_logging(LogConfig(dir=sys.argv[1]), "worker", "x", stream=open(os.devnull, "w"))
def spam():
    log = get_logger("t")
    while True:
        log.info("big", pad="x" * 20000)
        log.warning("small")
        time.sleep(0)
for _ in range(3):
    threading.Thread(target=spam, daemon=True).start()
time.sleep(0.2)
sys.exit(0)
"""


def test_a_process_exits_while_threads_log(tmp_path):
    """logging.shutdown at exit and the log writer once took two locks in opposite orders
    (a worker hung after 'worker stopped' in CI; this reproduced it about 1 run in 6)."""
    for i in range(8):
        r = subprocess.run([sys.executable, "-c", EXIT_WHILE_LOGGING, str(tmp_path / f"logs{i}")],
                           cwd=REPO, timeout=60, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "Logging error" not in r.stderr, r.stderr[-2000:]


def test_an_unwritable_log_dir_is_a_config_error_not_a_traceback(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the log folder should be")
    cfg = write_config(tmp_path / "c.yaml", ["127.0.0.1:1"], "")
    cfg.write_text(cfg.read_text().replace("dir: logs", f"dir: {blocker}/logs"))
    r = subprocess.run([sys.executable, str(REPO / "worker_client" / "runworkers.py"), "--config", str(cfg),
                        "--name", "x", "--threads", "1"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "log.dir" in r.stderr and "cannot write the log file" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_deleted_log_dir_is_made_again_and_nothing_is_lost_after_the_check(tmp_path):
    """rm -r log.dir while a process runs: its lines went to a deleted file for ever. The
    file handler checks once per WATCH_INTERVAL (not per line) and makes the folder and file again."""
    import shutil
    from geartask import logs
    path = configure_logging(LogConfig(dir=tmp_path / "logs"), "sender", "d", stream=io.StringIO())
    log = get_logger()
    log.info("before")
    flush_logs()
    shutil.rmtree(tmp_path / "logs")
    n = iter(range(10**6))
    wait_until(lambda: log.info("after", i=next(n)) or flush_logs() or path.exists(), logs.WATCH_INTERVAL * 5,
               message="the log file made again")
    log.info("last")
    flush_logs()
    events = read_events(path)
    assert events[-1]["event"] == "last" and all("dropped_lines" not in e for e in events)


def test_lines_a_full_disk_refused_are_counted_and_reported_once(tmp_path, capsys):
    """A full disk: logging stopped with a traceback per line on stderr. Now: one warning on
    stderr, the lost lines counted, and the count in the next line written."""
    folder = tmp_path / "logs"
    folder.mkdir()
    (folder / "worker-full.log").symlink_to("/dev/full")  # every write: ENOSPC
    path = configure_logging(LogConfig(dir=folder), "worker", "full", stream=io.StringIO())
    log = get_logger()
    for i in range(5):
        log.info("lost", i=i)
    flush_logs()
    log.info("lost", i=5)
    flush_logs()
    err = capsys.readouterr().err
    assert err.count("cannot write the log file") == 1 and "No space left on device" in err
    assert "Traceback" not in err and "Logging error" not in err
    path.unlink()  # the disk has room again (the next write checks at once after a failure)
    log.info("back")
    flush_logs()
    (event,) = read_events(path)
    assert event["event"] == "back" and event["dropped_lines"] == 6
    log.info("after")
    flush_logs()
    assert "dropped_lines" not in read_events(path)[-1]


# -- the commands: -v/-q/--log-format, the worker's console, the manager's audit line -------------

def _text_config(tmp_path, servers, name="c.yaml"):
    """A test config with the default console format (helpers.write_config asks for JSON)."""
    path = write_config(tmp_path / name, servers)
    path.write_text(path.read_text().replace("  format: json\n", ""))
    return path


def _stop(w: WorkerProc) -> str:
    w.signal(signal.SIGTERM)
    assert w.wait(30) == 0, w.text()[-3000:]
    return w.text()


def test_the_worker_command_logs_jobs_to_its_file_and_to_the_console_only_with_verbose(tmp_path, gearmand):
    cfg = _text_config(tmp_path, [gearmand.address])
    consoles = {}
    for name, flags in (("plain", ()), ("loud", ("-v",)), ("quiet", ("-q",)), ("json", ("--log-format", "json"))):
        w = WorkerProc(cfg, name, 2, *flags).wait_attached([gearmand.address])
        try:
            outs = gearclient.run(gearmand.address, "eg.reverse", ["abc", "de", "f"])
            assert [o.state for o in outs] == ["complete"] * 3
            consoles[name] = _stop(w)
        finally:
            w.stop()
        jobs = [e for e in w.log_lines() if e["event"] == "job"]
        assert len(jobs) == 3 and all(e["logger"] == JOB_LOGGER and e["outcome"] == "complete" for e in jobs)
    events = [event for _, event in text_lines(consoles["plain"])]
    assert "worker started" in events and "worker stopped" in events and "job" not in events
    loud = [event for _, event in text_lines(consoles["loud"])]
    assert loud.count("job") == 3 and "worker started" in loud
    assert consoles["quiet"].strip() == ""
    as_json = [json.loads(line) for line in consoles["json"].splitlines()]
    assert {"worker started", "worker stopped"} <= {e["event"] for e in as_json}
    assert all(e["role"] == "worker" and e["name"] == "json" for e in as_json)


def test_manage_clear_piped_prints_no_json_and_its_audit_line_only_when_asked(tmp_path, gearmand, fname):
    cfg = _text_config(tmp_path, [gearmand.address])
    r = run_script("manage_client/manage_client.py", "clear", fname, "--yes", "--config", str(cfg))
    assert r.returncode == 0 and "0 queued jobs cleared" in r.stdout, r.stderr
    assert r.stderr == ""  # the audit line is in the manager's file only
    # -v after the command: the audit line, as text
    r = run_script("manage_client/manage_client.py", "clear", fname, "--yes", "--config", str(cfg), "-v")
    assert r.returncode == 0, r.stderr
    assert text_lines(r.stderr) == [("info", "clear")] and f"server={gearmand.address}" in r.stderr
    # before the command, and through the geartask command: JSON
    r = subprocess.run([PYTHON, "-m", "geartask.main", "manage", "--log-format", "json", "-v", "clear", fname,
                        "--yes", "--config", str(cfg)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0, r.stderr
    [line] = r.stderr.splitlines()
    assert json.loads(line)["event"] == "clear" and json.loads(line)["role"] == "manager"
    events = read_events(tmp_path / "logs" / "manager.log")
    assert [e["event"] for e in events] == ["clear"] * 3


@pytest.mark.parametrize("script, args", [
    ("manage_client/manage_client.py", ["-v", "-q", "status"]),
    ("send_job_client/send_job_client.py", ["list", "--quiet", "--verbose"]),
    ("worker_client/runworkers.py", ["--log-format", "xml"]),
])
def test_bad_logging_flags_are_usage_errors(tmp_path, script, args):
    cfg = _text_config(tmp_path, ["127.0.0.1:1"])
    r = run_script(script, *args, "--config", str(cfg))
    assert r.returncode == 2 and ("not allowed with argument" in r.stderr or "invalid choice" in r.stderr), r.stderr
    assert "Traceback" not in r.stderr


# -- the progress bar and log lines on a real terminal --------------------------------------------

def screen(raw: str) -> list[str]:
    """The lines a terminal shows for ``raw``: CR goes back to the line's start, ESC [ K erases
    to its end, anything else overwrites."""
    lines, line, col, i = [], [], 0, 0
    while i < len(raw):
        if raw.startswith("\x1b[K", i):
            del line[col:]
            i += 3
            continue
        ch, i = raw[i], i + 1
        if ch == "\r":
            col = 0
        elif ch == "\n":
            lines.append("".join(line))
            line, col = [], 0
        else:
            line[col:col + 1] = [ch]
            col += 1
    return lines + ["".join(line)]




def test_warnings_under_the_progress_bar_leave_no_line_glued_to_it(tmp_path, fresh_gearmand):
    """The sender's first server accepts connections and never answers: the sender warns
    ("server slow", then "failing over") while its bar is drawn, and the job completes on the
    second server. On the terminal, each warning must be a line of its own: they were glued
    to the bar (`…0/1 0.0/s left --:--2026-11-25T22:29:31Z [warning ] …`)."""
    from geartask.sender.sender import rendezvous
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        servers = [address, fresh_gearmand.address]
        unique = next(u for u in (f"u{i}" for i in range(100)) if rendezvous(u, servers)[0] == address)
        cfg = _text_config(tmp_path, servers)
        cfg.write_text(cfg.read_text() + "sender:\n  submit_timeout: 0.5\n  failover_after: 2\n")
        w = WorkerProc(_text_config(tmp_path, [fresh_gearmand.address], "w.yaml"), "w", 1)
        try:
            w.wait_attached([fresh_gearmand.address])
            code, raw = run_on_a_terminal([PYTHON, str(REPO / "send_job_client" / "send_job_client.py"),
                                           "--config", str(cfg), "job", "eg.slow", '{"seconds": 1}',
                                           "--unique", unique])
        finally:
            w.stop()
    finally:
        silent.close()
    assert code == 0, raw
    lines = screen(raw)
    warnings = [line for line in lines if "[warning" in line]
    assert any("server slow" in line for line in warnings) and any("failing over" in line for line in warnings), raw
    assert all(TEXT_LINE.match(line) for line in warnings), lines  # nothing before a warning on its line
    assert not [line for line in lines if "done," in line and "[warning" in line], lines
    assert re.search(r"\[[#-]+\] 0 done, 0 failed, 0/1", raw), raw  # the bar was drawn
    assert any(line.startswith("complete eg.slow") for line in lines), lines
