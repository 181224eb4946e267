"""Logging: every event carries role/name/pid/thread, job context per thread, JSON lines in the file."""

from __future__ import annotations

import io
import json
import logging
import os
import threading

from geartask.config import LogConfig
from geartask.logs import configure_logging, get_logger, job_context


def read_events(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    for h in logging.getLogger().handlers:
        h.flush()

    events = read_events(path)
    done = [e for e in events if e["event"] == "job done"]
    assert len(done) == 3
    for e in done:
        n = e["thread"].split("-")[1]
        assert e["handle"] == f"H:x:{n}" and e["unique"] == f"u{n}" and e["task"] == "eg.reverse"
        assert e["role"] == "worker" and e["name"] == "w1" and e["pid"] == os.getpid()
        assert e["level"] == "info" and "timestamp" in e
    # context is cleared after the job: no handle leaks into later events
    assert all("handle" not in e for e in events if e["event"] == "between jobs")
    # stderr is not a terminal here, so the console gets JSON too
    assert json.loads(stream.getvalue().splitlines()[0])["role"] == "worker"


def test_stdlib_logging_goes_through_the_same_pipeline(tmp_path):
    path = configure_logging(LogConfig(dir=tmp_path), "sender", "s1", stream=io.StringIO())
    logging.getLogger("gearman.connection").warning("socket trouble %s", "here")
    for h in logging.getLogger().handlers:
        h.flush()
    (event,) = [e for e in read_events(path) if e["event"] == "socket trouble here"]
    assert event["logger"] == "gearman.connection" and event["role"] == "sender" and event["level"] == "warning"


def test_console_format_and_level(tmp_path):
    stream = io.StringIO()
    configure_logging(LogConfig(dir=tmp_path, format="console", level="warning"), "manager", stream=stream,
                      to_file=False)
    log = get_logger()
    log.info("quiet")
    log.warning("loud", server="127.0.0.1:4730")
    out = stream.getvalue()
    assert "quiet" not in out
    assert "loud" in out and "server=127.0.0.1:4730" in out and not out.lstrip().startswith("{")


def test_reconfiguring_does_not_stack_handlers(tmp_path):
    for _ in range(3):
        configure_logging(LogConfig(dir=tmp_path), "worker", "w2", stream=io.StringIO())
    get_logger().info("once")
    for h in logging.getLogger().handlers:
        h.flush()
    assert [e["event"] for e in read_events(tmp_path / "worker-w2.log")].count("once") == 1


def test_file_is_rotated_by_size(tmp_path):
    path = configure_logging(LogConfig(dir=tmp_path, max_bytes=2000, backups=2), "worker", "rot",
                             stream=io.StringIO())
    log = get_logger()
    for i in range(200):
        log.info("filler", i=i, pad="x" * 50)
    assert path.stat().st_size <= 2000
    assert (tmp_path / "worker-rot.log.1").exists()


def test_hot_logger_writes_the_same_line_as_the_usual_path(tmp_path):
    from geartask.logs import HotLogger
    stream = io.StringIO()
    path = configure_logging(LogConfig(dir=tmp_path / "logs", format="json"), "worker", "w9", stream=stream)
    with job_context(task="t", handle="H:1", unique="u1"):
        get_logger("geartask.worker").info("job", outcome="complete", attempt=1)
        HotLogger("geartask.worker").info("job", outcome="complete", attempt=1)
        HotLogger("geartask.worker").warning("job", outcome="failed", attempt=2)
    usual, hot, warn = read_events(path)
    assert set(usual) == set(hot)
    assert {k: v for k, v in usual.items() if k != "timestamp"} == {k: v for k, v in hot.items() if k != "timestamp"}
    assert hot["timestamp"].endswith("Z") and warn["level"] == "warning"
    assert [json.loads(l)["outcome"] for l in stream.getvalue().splitlines()] == ["complete", "complete", "failed"]


def test_hot_logger_respects_the_level_and_a_console_on_a_terminal(tmp_path):
    from geartask.logs import HotLogger

    class Tty(io.StringIO):
        def isatty(self):
            return True

    path = configure_logging(LogConfig(dir=tmp_path / "logs", level="warning"), "worker", "q", stream=io.StringIO())
    HotLogger("geartask.worker").info("dropped")
    HotLogger("geartask.worker").warning("kept")
    assert [e["event"] for e in read_events(path)] == ["kept"]
    tty = Tty()
    path = configure_logging(LogConfig(dir=tmp_path / "logs2"), "worker", "t", stream=tty)
    HotLogger("geartask.worker").info("readable", x=1)
    assert "readable" in tty.getvalue() and not tty.getvalue().startswith("{")  # the usual console renderer
    assert read_events(path)[0]["event"] == "readable"


def test_buffered_mode_writes_in_order_soon_and_rotates(tmp_path):
    from geartask.logs import HotLogger, flush_logs
    from helpers import wait_until
    stream = io.StringIO()
    path = configure_logging(LogConfig(dir=tmp_path / "logs", format="json", max_bytes=20_000, backups=3),
                             "worker", "b", stream=stream, buffered=True)
    log, hot = get_logger("geartask.test"), HotLogger("geartask.test")
    for i in range(300):
        (hot if i % 2 else log).info("line", i=i)
    wait_until(lambda: path.exists() and path.read_text().count("\n") > 0, 5, message="lines written")
    flush_logs()
    files = [path.with_name(path.name + f".{n}") for n in (3, 2, 1)] + [path]
    events = [e for f in files if f.exists() for e in read_events(f)]
    assert len(events) > 100 and all(f.stat().st_size <= 20_000 for f in files if f.exists())
    numbers = [e["i"] for e in events]
    assert numbers == sorted(numbers) and numbers[-1] == 299  # in order, the newest kept
    assert stream.getvalue().count("\n") == 300  # the JSON console got every line too
    configure_logging(LogConfig(dir=tmp_path / "other"), "worker", "c", stream=io.StringIO())  # unbuffered again


EXIT_WHILE_LOGGING = """
import sys, threading, time
from geartask.config import LogConfig
from geartask.logs import configure_logging, HotLogger, get_logger
configure_logging(LogConfig(dir=sys.argv[1], format="json"), "worker", "x", stream=open("/dev/null", "w"),
                  buffered=True)
def spam():
    hot, usual = HotLogger("t"), get_logger("t")
    while True:
        hot.info("hot", pad="x" * 20000)
        usual.info("usual")
for _ in range(3):
    threading.Thread(target=spam, daemon=True).start()
time.sleep(0.2)
sys.exit(0)
"""


def test_a_process_exits_while_threads_log_in_buffered_mode(tmp_path):
    """logging.shutdown at exit and the writer thread once took two locks in opposite orders
    (a worker hung after 'worker stopped' in CI; this reproduced it about 1 run in 6)."""
    import subprocess
    import sys
    from helpers import REPO
    for i in range(8):
        r = subprocess.run([sys.executable, "-c", EXIT_WHILE_LOGGING, str(tmp_path / f"logs{i}")],
                           cwd=REPO, timeout=20, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]


def test_an_unwritable_log_dir_is_a_config_error_not_a_traceback(tmp_path):
    import subprocess
    import sys
    from helpers import REPO, write_config
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the log folder should be")
    cfg = write_config(tmp_path / "c.yaml", ["127.0.0.1:1"], "")
    cfg.write_text(cfg.read_text().replace("dir: logs", f"dir: {blocker}/logs"))
    r = subprocess.run([sys.executable, str(REPO / "worker_client" / "runworkers.py"), "--config", str(cfg),
                        "--name", "x", "--threads", "1"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "log.dir" in r.stderr and "cannot write the log file" in r.stderr
    assert "Traceback" not in r.stderr


# -- a log file that disappears or can't be written (issue 11) ----------------------------------

def test_a_deleted_log_dir_is_made_again_and_nothing_is_lost_after_the_check(tmp_path):
    """rm -r log.dir while a process runs: its lines went to a deleted file for ever. The
    handler checks once per WATCH_INTERVAL (not per line) and makes the folder and file again."""
    import shutil
    from geartask import logs
    from helpers import wait_until
    path = configure_logging(LogConfig(dir=tmp_path / "logs", format="json"), "sender", "d", stream=io.StringIO())
    log = get_logger()
    log.info("before")
    shutil.rmtree(tmp_path / "logs")
    n = iter(range(10**6))
    wait_until(lambda: log.info("after", i=next(n)) or path.exists(), logs.WATCH_INTERVAL * 5,
               message="the log file made again")
    log.info("last")
    events = read_events(path)
    assert events[-1]["event"] == "last" and all("dropped_lines" not in e for e in events)


def test_lines_a_full_disk_refused_are_counted_and_reported_once(tmp_path, capsys):
    """A full disk: logging stopped with a traceback per line on stderr (or silently, buffered).
    Now: one warning on stderr, the lost lines counted, and the count in the next line written."""
    folder = tmp_path / "logs"
    folder.mkdir()
    (folder / "worker-full.log").symlink_to("/dev/full")  # every write: ENOSPC
    path = configure_logging(LogConfig(dir=folder, format="json"), "worker", "full", stream=io.StringIO())
    log = get_logger()
    for i in range(5):
        log.info("lost", i=i)
    err = capsys.readouterr().err
    assert err.count("cannot write the log file") == 1 and "No space left on device" in err
    assert "Traceback" not in err
    path.unlink()  # the disk has room again (the next write checks at once after a failure)
    log.info("back")
    (event,) = read_events(path)
    assert event["event"] == "back" and event["dropped_lines"] == 5
    log.info("after")
    assert "dropped_lines" not in read_events(path)[-1]


def test_buffered_lines_a_full_disk_refused_are_counted_too(tmp_path, capsys):
    from geartask.logs import HotLogger, flush_logs
    folder = tmp_path / "logs"
    folder.mkdir()
    (folder / "worker-fullb.log").symlink_to("/dev/full")
    path = configure_logging(LogConfig(dir=folder, format="json"), "worker", "fullb", stream=io.StringIO(),
                             buffered=True)
    hot = HotLogger("geartask.worker")
    for i in range(7):
        hot.info("job", i=i)
    flush_logs()
    assert capsys.readouterr().err.count("cannot write the log file") == 1
    path.unlink()
    hot.info("job", i=7)
    flush_logs()
    (event,) = read_events(path)
    assert event["i"] == 7 and event["dropped_lines"] == 7
    configure_logging(LogConfig(dir=tmp_path / "other"), "worker", "c", stream=io.StringIO())  # unbuffered again


def test_a_console_on_a_terminal_gets_a_peers_text_escaped(tmp_path):
    class Tty(io.StringIO):
        def isatty(self):
            return True
    tty = Tty()
    path = configure_logging(LogConfig(dir=tmp_path), "manager", stream=tty)
    get_logger().warning("shutdown", worker="evil\x1b]0;pwned\x07\nforged")
    assert "\x1b]0" not in tty.getvalue() and "evil\\x1b]0;pwned\\x07\\nforged" in tty.getvalue()
    assert read_events(path)[0]["worker"] == "evil\x1b]0;pwned\x07\nforged"  # the file keeps it exact
