"""What a hostile peer or a careless operator may throw at the sender, and what it gets.

Each test names the input; the sender must answer with a line or a result, never a
traceback, and keep serving the inputs that were fine. Hostile workers and hostile job
servers are hand-written here with geartask.gearman (real sockets, real gearmand).
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from geartask import gearman as gp
from geartask.cli import run
from geartask.jobs import decode_payload
from geartask.sender.sender import JobSender
from geartask.sender.cli import main

from helpers import PYTHON, REPO, write_config

SCRIPT = REPO / "send_job_client" / "send_job_client.py"


def cli(argv, capsys):
    capsys.readouterr()  # the CLI's output only: not what an in-process JobSender logged before it
    rc = run(main, argv)
    out, err = capsys.readouterr()
    return rc, out, err


def record_path(cfg: Path) -> Path:
    return cfg.parent / "logs" / "sender-background.jsonl"


# -- hostile workers: results, warnings, data ------------------------------------------------

def hostile_worker(address: str, function: str, packets) -> threading.Thread:
    """A raw worker that grabs one job of ``function`` and answers with ``packets(handle)``:
    a list of (command, data) it sends as WORK_* packets for that job."""
    host, port = address.rsplit(":", 1)
    ready = threading.Event()

    def serve():
        conn = gp.Connection(host, int(port)).connect()
        try:
            conn.send(gp.CAN_DO, task=function)
            ready.set()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                conn.send(gp.GRAB_JOB_UNIQ)
                pkt = conn.recv(5)
                if pkt is None or pkt.cmd == gp.NO_JOB:
                    conn.send(gp.PRE_SLEEP)
                    conn.recv(1)  # a NOOP wakes us; a timeout just asks again
                    continue
                if pkt.cmd == gp.JOB_ASSIGN_UNIQ:
                    handle = pkt["job_handle"]
                    conn.send_raw(b"".join(gp.pack(cmd, job_handle=handle) if cmd == gp.WORK_FAIL
                                           else gp.pack(cmd, job_handle=handle, data=data)
                                           for cmd, data in packets(handle)))
                    conn.echo(30)  # everything above reached gearmand before we go
                    return
        finally:
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    ready.wait(10)
    return t


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_decode_payload_never_raises_on_deep_nesting():
    """100,000 nested brackets made json raise RecursionError (decode caught ValueError only)."""
    assert decode_payload(nested(100_000)) == nested(100_000).decode()
    # Deep enough for json.loads but too deep for json.dumps: kept as text, so anything can
    # serialise what decode_payload returns.
    text = decode_payload(nested(995))
    assert isinstance(text, str)
    json.dumps(text)
    assert decode_payload(b'{"a": [1, {"b": 2}]}') == {"a": [1, {"b": 2}]}
    assert decode_payload(b"\xff\xfe") == b"\xff\xfe"


def test_deeply_nested_result_does_not_crash_the_sender(gearmand, fname, make_config):
    _, config = make_config(gearmand)
    t = hostile_worker(gearmand.address, fname, lambda h: [(gp.WORK_COMPLETE, nested(100_000))])
    with JobSender(config) as sender:
        r = sender.submit(fname, "x", timeout=20)
    t.join(10)
    assert r.state == "complete" and r.result == nested(100_000).decode()


def test_results_the_cli_cannot_print_as_json_are_printed_anyway(gearmand, fname, make_config, capsys):
    """A result nested 995 deep (json parses it, json.dumps then fails) and one that is not
    UTF-8: `job --json` and the text output print them, exit 0."""
    path, _ = make_config(gearmand)
    for payload in (nested(995), b"\xff\xfeok"):
        for extra in (["--json"], []):
            t = hostile_worker(gearmand.address, fname, lambda h, p=payload: [(gp.WORK_COMPLETE, p)])
            rc, out, err = cli(["--config", str(path), "job", fname, "1", "--timeout", "20", *extra], capsys)
            t.join(10)
            assert rc == 0, err
            assert "complete" in out and "Traceback" not in err
            if extra:
                (line,) = [json.loads(l) for l in out.splitlines()]
                assert line["state"] == "complete" and isinstance(line["result"], str)


def test_huge_warning_is_the_reason_and_is_shortened_on_screen(gearmand, fname, make_config, capsys):
    path, _ = make_config(gearmand)
    reason = b"r" * (20 * 1024 * 1024)
    t = hostile_worker(gearmand.address, fname, lambda h: [(gp.WORK_WARNING, reason), (gp.WORK_FAIL, b"")])
    rc, out, err = cli(["--config", str(path), "job", fname, "1", "--timeout", "30"], capsys)
    t.join(10)
    assert rc == 1
    line = [l for l in out.splitlines() if l.startswith("failed")][0]
    assert "rrrr" in line and len(line) < 400


def test_a_flood_of_warnings_and_data_is_not_kept_without_bound(gearmand, fname, make_config):
    """A worker may send any number of WORK_WARNING/WORK_DATA packets; the sender keeps the
    last warnings (the last is the failure reason) and data up to a byte limit, and counts
    what it dropped."""
    _, config = make_config(gearmand)
    chunk = b"d" * (1024 * 1024)
    packets = [(gp.WORK_WARNING, json.dumps(f"w{i}").encode()) for i in range(100)]
    packets += [(gp.WORK_DATA, chunk)] * 80
    packets.append((gp.WORK_FAIL, b""))
    t = hostile_worker(gearmand.address, fname, lambda h: packets)
    with JobSender(config) as sender:
        sender.max_data = 16 * 1024 * 1024
        r = sender.submit(fname, "x", timeout=30)
    t.join(10)
    assert r.state == "failed" and r.error == "w99"
    assert len(r.warnings) <= 10 and r.warnings[-1] == "w99"
    assert sum(len(c) for c in r.data) <= 16 * 1024 * 1024
    assert r.data_dropped == 80 - len(r.data) > 0


def answered(config, address: str, function: str, packets):
    """The JobResult of one job that a hostile worker answers with ``packets``."""
    t = hostile_worker(address, function, lambda h: packets)
    with JobSender(config) as sender:
        r = sender.submit(function, "x", timeout=20)
    t.join(10)
    return r


def test_the_workers_attempts_notice_is_read_and_not_a_warning(gearmand, fname, make_config, capsys):
    """The contract with geartask workers: WORK_WARNING {"geartask": {"attempts": N}} just
    before WORK_COMPLETE gives the job's attempts, and is not one of its warnings."""
    path, config = make_config(gearmand)
    notice = json.dumps({"geartask": {"attempts": 3}}).encode()
    r = answered(config, gearmand.address, fname,
                 [(gp.WORK_WARNING, b'"careful"'), (gp.WORK_WARNING, notice), (gp.WORK_COMPLETE, b'"ok"')])
    assert (r.state, r.result, r.attempts, r.submissions, r.warnings) == ("complete", "ok", 3, 1, ["careful"])
    t = hostile_worker(gearmand.address, fname, lambda h: [(gp.WORK_WARNING, notice), (gp.WORK_COMPLETE, b"1")])
    rc, out, err = cli(["--config", str(path), "job", fname, "1", "--timeout", "20"], capsys)
    t.join(10)
    assert rc == 0 and re.search(r"^complete .* attempts=3 submissions=1 ", out, re.M), out + err


@pytest.mark.parametrize("warning", [
    {"geartask": {"attempts": 3}, "more": 1},  # not exactly the notice: an ordinary warning
    {"geartask": {"attempts": 3, "more": 1}},
    {"geartask": {"attempts": "3"}},
    {"geartask": {"attempts": True}},
    {"geartask": {"attempts": 0}},
    {"geartask": {"attempts": -2}},
    {"geartask": {"attempts": 10 ** 30}},
    {"geartask": [3]},
    {"geartask": {"attempts": 3.0}},
])
def test_anything_but_the_exact_notice_is_an_ordinary_warning(gearmand, fname, make_config, warning):
    _, config = make_config(gearmand)
    r = answered(config, gearmand.address, fname,
                 [(gp.WORK_WARNING, json.dumps(warning).encode()), (gp.WORK_COMPLETE, b"1")])
    assert (r.state, r.attempts, r.warnings) == ("complete", 1, [warning])


@pytest.mark.parametrize("reason, attempts", [
    ({"error": "boom", "attempts": 4}, 4),  # a geartask worker's reason
    ({"error": "no such task", "attempts": 0}, 0),  # never ran
    ({"error": "boom", "attempts": "4"}, None),
    ({"error": "boom", "attempts": -1}, None),
    ({"error": "boom"}, None),
    ("plain text", None),
])
def test_attempts_come_from_the_failure_reason_when_it_has_a_count(gearmand, fname, make_config, reason, attempts):
    _, config = make_config(gearmand)
    r = answered(config, gearmand.address, fname, [(gp.WORK_WARNING, json.dumps(reason).encode()), (gp.WORK_FAIL, b"")])
    assert (r.state, r.error, r.attempts, r.submissions) == ("failed", reason, attempts, 1)


# -- status: bad handles, bad records, hostile replies ------------------------------------------

def good_record(cfg: Path, server: str, n: int = 2) -> list[dict]:
    """Submit n background jobs for nobody (they stay queued) and return their records."""
    from test_sender import LogRecorder  # its "no worker serves" warning, kept off a stale console
    log = LogRecorder()
    with JobSender(_load(cfg), log=log) as sender:
        results = sender.submit_many([{"task": "t.nobody.hostile", "data": i, "background": True}
                                      for i in range(n)])
    assert all(r.state == "queued" and r.no_worker for r in results)
    return [json.loads(l) for l in record_path(cfg).read_text().splitlines()]


def _load(cfg: Path):
    from geartask.config import load_config
    return load_config(cfg)


def test_status_handle_with_a_garbage_server_is_one_line_not_a_traceback(gearmand, make_config, capsys):
    path, _ = make_config(gearmand)
    good_record(path, gearmand.address, 1)
    rc, out, err = cli(["--config", str(path), "status", "H:x@garbage", "H:y@host:notaport", "--json"], capsys)
    assert rc == 1, err
    lines = [json.loads(l) for l in out.splitlines()]
    assert [l["state"] for l in lines] == ["unknown", "unknown"]
    assert "garbage" in lines[0]["error"] and "notaport" in lines[1]["error"]


def test_a_bare_handle_nobody_knows_is_unknown_not_done(gearmand, make_config, capsys):
    path, _ = make_config(gearmand)
    rc, out, err = cli(["--config", str(path), "status", "H:nosuch:1", "--json"], capsys)
    (line,) = [json.loads(l) for l in out.splitlines()]
    assert line["state"] == "unknown" and rc == 1
    assert "not in the background record" in line["error"]


@pytest.mark.parametrize("bad", [
    b'{"handle": "H:x:1", "server": "garbage"}',  # a server without a port
    b'{"handle": "H:x:1", "server": 4730}',  # not a string
    b'{"handle": ["H:x:1"], "server": "127.0.0.1:1"}',  # a handle that is not a string
    b'{"handle": "H:\xff\xfe:1", "server": "127.0.0.1:1"}',  # not UTF-8
    b'{"torn line from a crashed wri',  # not JSON
    b'[1, 2, 3]',  # JSON, not a record
    b"[" * 100_000,  # deep enough to make json raise RecursionError
])
def test_one_bad_record_line_does_not_hide_the_others(gearmand, make_config, capsys, bad):
    path, _ = make_config(gearmand)
    recs = good_record(path, gearmand.address, 2)
    rp = record_path(path)
    lines = rp.read_bytes().splitlines()
    rp.write_bytes(lines[0] + b"\n" + bad + b"\n" + lines[1] + b"\n")
    rc, out, err = cli(["--config", str(path), "status", "--json"], capsys)
    assert "Traceback" not in err
    got = [json.loads(l) for l in out.splitlines()]
    assert len(got) == 3, out
    assert [g["state"] for g in got] == ["queued", "unknown", "queued"]
    assert [got[0]["handle"], got[2]["handle"]] == [r["handle"] for r in recs]
    assert "sender-background.jsonl:2" in got[1]["error"]
    assert rc == 1
    # Text output too: one line each, and a summary.
    rc, out, err = cli(["--config", str(path), "status"], capsys)
    assert rc == 1 and len(out.splitlines()) == 4 and "1 unknown" in out.splitlines()[-1]


def _res(cmd: int, *args: bytes) -> bytes:
    body = b"\0".join(args)
    return struct.pack("!4sII", b"\0RES", cmd, len(body)) + body


class FakeStatusServer:
    """A job server that answers each GET_STATUS with whatever ``answer(handle)`` returns."""

    def __init__(self, answer):
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn):
        buf = b""
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while len(buf) >= 12:
                    _, cmd, size = struct.unpack("!4sII", buf[:12])
                    if len(buf) < 12 + size:
                        break
                    body, buf = buf[12:12 + size], buf[12 + size:]
                    if cmd == gp.GET_STATUS:
                        conn.sendall(self.answer(body))

    def close(self):
        self.sock.close()


def test_hostile_status_replies_are_reported_per_handle(make_config, gearmand, capsys):
    """GET_STATUS replies are input too: a 5,000-digit numerator, an answer about another
    handle, an ERROR, a 'known' flag that is neither 0 nor 1. Each handle gets its own line."""
    answers = {
        b"H:a": lambda h: _res(gp.STATUS_RES, h, b"1", b"1", b"9" * 5000, b"10"),
        b"H:b": lambda h: _res(gp.STATUS_RES, b"H:other", b"1", b"0", b"0", b"0"),
        b"H:c": lambda h: _res(gp.ERROR, b"ERR", b"no such thing"),
        b"H:d": lambda h: _res(gp.STATUS_RES, h, b"yes", b"no", b"", b""),
        b"H:e": lambda h: _res(gp.STATUS_RES, h, b"1", b"1", b"3", b"4"),
    }
    fake = FakeStatusServer(lambda h: answers[h](h))
    try:
        path, _ = make_config(gearmand)
        handles = [f"H:{c}@{fake.address}" for c in "abcde"]
        rc, out, err = cli(["--config", str(path), "status", *handles, "--json"], capsys)
    finally:
        fake.close()
    assert "Traceback" not in err
    got = {l["handle"]: l for l in map(json.loads, out.splitlines())}
    assert set(got) == {"H:a", "H:b", "H:c", "H:d", "H:e"}
    for h in ("H:a", "H:b", "H:c", "H:d"):
        assert got[h]["state"] == "unknown" and fake.address in got[h]["error"], got[h]
    assert got["H:e"]["state"] == "running" and (got["H:e"]["numerator"], got["H:e"]["denominator"]) == (3, 4)
    assert rc == 1


def test_a_server_that_never_answers_is_asked_once_not_once_per_record(make_config, gearmand, capsys):
    """Ten records on a server that accepts but never answers: the first query times out and
    the other nine are reported unreachable at once."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        path, _ = make_config(gearmand, "sender:\n  submit_timeout: 1\n")
        t0 = time.monotonic()
        rc, out, err = cli(["--config", str(path), "status", "--json",
                            *[f"H:s:{i}@{address}" for i in range(10)]], capsys)
        took = time.monotonic() - t0
    finally:
        silent.close()
    got = [json.loads(l) for l in out.splitlines()]
    assert [g["state"] for g in got] == ["unreachable"] * 10 and rc == 1
    assert took < 5


# -- scale: memory flat in the batch size; the record bounded --------------------------------

MANY_PLUGIN = '''
import os
from geartask import hookimpl

@hookimpl
def geartask_jobs():
    for i in range(int(os.environ["MANY_JOBS"])):
        yield {"task": "t.nobody.many", "data": {"i": i, "pad": "x" * 40}, "background": True}
'''


# The peak RSS of the sender's own image (VmHWM, reset by exec), written at exit. ru_maxrss
# from wait4 would include the pytest process the child was forked from.
_PEAK = ("import runpy, sys\nout = sys.argv.pop(1)\nsys.argv = sys.argv[1:]\ntry:\n"
         "    runpy.run_path(sys.argv[0], run_name='__main__')\nfinally:\n"
         "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0]\n"
         "    open(out, 'w').write(hwm.split()[1])\n")


def _peak_rss_mb(argv: list[str], env: dict, out_path: Path) -> tuple[float, int]:
    """Run the sender CLI; (its peak RSS in MB, exit status)."""
    peak = out_path.with_suffix(".peak")
    with open(out_path, "w") as out:
        proc = subprocess.run([PYTHON, "-c", _PEAK, str(peak), str(SCRIPT), *argv], stdout=out,
                              stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=REPO, timeout=600)
    return int(peak.read_text()) / 1024, proc.returncode


@pytest.mark.slow
def test_memory_is_flat_in_the_number_of_jobs(tmp_path, gearmand_factory):
    """`plugin` with 100,000 and 300,000 background jobs, and `list` of the same: the peak RSS
    of the larger run is within a few MB of the smaller (the old sender held every job:
    1.4 GB for 1,000,000), and the background record stays bounded by rotation."""
    server = gearmand_factory(queue="none")
    plugdir = tmp_path / "many"
    plugdir.mkdir()
    (plugdir / "many.py").write_text(MANY_PLUGIN)
    cfg = write_config(tmp_path / "c.yaml", [server.address], plugin_paths=[plugdir])
    cfg.write_text(cfg.read_text().replace("  format: json\n", "  format: json\n  max_bytes: 2000000\n  backups: 2\n"))
    peaks = {}
    for n in (100_000, 300_000):
        rss, rc = _peak_rss_mb(["--config", str(cfg), "plugin", "many", "--json"], {"MANY_JOBS": str(n)},
                               tmp_path / f"send-{n}.out")
        assert rc == 0, (tmp_path / f"send-{n}.out").read_text()[-2000:]
        lines = sum(1 for line in open(tmp_path / f"send-{n}.out") if '"event": ' not in line)  # not a log line
        assert lines == n
        rss_list, rc = _peak_rss_mb(["--config", str(cfg), "list"], {"MANY_JOBS": str(n)}, tmp_path / f"list-{n}.out")
        assert rc == 0
        peaks[n] = (rss, rss_list)
    print("peak RSS MB (send, list):", peaks)
    assert peaks[300_000][0] - peaks[100_000][0] < 25, peaks
    assert peaks[300_000][1] - peaks[100_000][1] < 25, peaks
    assert peaks[300_000][0] < 200
    files = sorted(f for f in (tmp_path / "logs").glob("sender-background.jsonl*") if f.suffix != ".lock")
    assert 1 < len(files) <= 3, files  # the record and at most log.backups rotated ones
    assert all(f.stat().st_size <= 2_000_000 + 4_000_000 for f in files)


@pytest.mark.parametrize("job", [{"task": "t\udcff", "data": 1}, {"task": "t", "unique": "u\udcff", "data": 1}])
def test_a_task_or_unique_that_is_not_utf8_text_is_a_definition_error(gearmand, make_config, job):
    """A lone surrogate (what a non-UTF-8 file name decodes to) can't go on the wire: one
    clear error before anything is sent, not a UnicodeEncodeError from deep inside."""
    from geartask.errors import JobDefinitionError
    _, config = make_config(gearmand)
    with JobSender(config) as sender:
        with pytest.raises(JobDefinitionError, match="UTF-8"):
            sender.submit_many([job])
