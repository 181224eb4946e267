"""What a careless operator or a hostile peer may try against the config, the command lines and
the manager, and what they get: one clear line and a defined exit status, never a traceback, a
hang, a forged row on the terminal or a command smuggled into gearmand.

Real processes throughout: each role's command line run as a user runs it, real gearmand
servers, and small fake peers (an HTTP server, a liar that speaks just enough Gearman) where
a hostile server is the point.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from geartask import gearman as gp
from geartask.errors import ServerError

from helpers import PYTHON, REPO, run_script, wait_until, write_config
from workers import WorkerProc

MANAGER = "manage_client/manage_client.py"
SENDER = "send_job_client/send_job_client.py"
WORKER = "worker_client/runworkers.py"
NOWHERE = "127.0.0.1:1"  # nothing listens: a command that reaches the network fails with 1, not 2


def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "geartask", *args], capture_output=True, text=True, cwd=REPO, timeout=60)


def every_role(config: str | Path) -> dict[str, subprocess.CompletedProcess]:
    """The four commands, each started with ``--config config`` as an operator would."""
    c = str(config)
    return {"sender": run_script(SENDER, "list", "--config", c),
            "worker": run_script(WORKER, "--config", c, "--name", "w", "--threads", "1"),
            "manager": run_script(MANAGER, "status", "--config", c),
            "check": run_check("--config", c, "check")}


def assert_one_line(r: subprocess.CompletedProcess, *expected: str, status: int = 2) -> None:
    assert r.returncode == status, (r.returncode, r.stdout[-500:], r.stderr[-1500:])
    assert "Traceback" not in r.stderr, r.stderr[-1500:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])


# -- a config file that is not one ------------------------------------------------------------

def _bad_configs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("servers: ['127.0.0.1:1']\nworker: {name: caf\xe9}\n".encode("latin-1"))
    twice = tmp_path / "twice.yaml"
    twice.write_text("servers: ['127.0.0.1:1']\nworker:\n  threads: 2\n  job_timeout: 5\n  threads: 200\n")
    nan = tmp_path / "nan.yaml"
    nan.write_text("servers: ['127.0.0.1:1']\nworker: {job_timeout: .nan}\n")
    inf = tmp_path / "inf.yaml"
    inf.write_text("servers: ['127.0.0.1:1']\nworker: {job_timeout: .inf}\n")
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    return {"not UTF-8": (latin1, f"{latin1}:2:19: not UTF-8 text (byte 0xe9)"),
            "a key given twice": (twice, f"{twice}:5:3: duplicate key 'threads' (first given at line 3)"),
            "NaN": (nan, f"{nan}: worker.job_timeout: must be a finite number, got nan"),
            "infinity": (inf, f"{inf}: worker.job_timeout: must be a finite number, got inf"),
            "a directory": (folder, f"{folder}: is a directory, not a config file"),
            "/dev/zero": (Path("/dev/zero"), "/dev/zero: is not a regular file")}


@pytest.mark.parametrize("case", ["not UTF-8", "a key given twice", "NaN", "infinity", "a directory", "/dev/zero"])
def test_a_config_that_is_not_a_config_is_one_line_and_exit_2_in_every_command(tmp_path, case):
    """Latin-1 text was a UnicodeDecodeError traceback in all four commands; a key given twice
    silently took the last value; `.nan` turned the watchdog off; a directory said "not found";
    /dev/zero was read for ever. Now: one line naming the file (line and column where there
    is one) and what is wrong, exit 2, before anything starts."""
    path, message = _bad_configs(tmp_path)[case]
    for _role, r in every_role(path).items():
        assert_one_line(r, message)


def test_a_config_given_as_a_pipe_is_read(tmp_path):
    """The size cap must not break `--config <(generate-config)`."""
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)

    def feed():
        with open(fifo, "w") as f:
            f.write("servers: ['127.0.0.1:4999']\n")
    threading.Thread(target=feed, daemon=True).start()
    r = run_check("--config", str(fifo), "check")
    assert r.returncode == 0 and "servers: 127.0.0.1:4999" in r.stdout, r.stderr


# -- plugins that misbehave -------------------------------------------------------------------

def _plugin_config(tmp_path: Path, body: str, enabled: str = "[bad]") -> Path:
    folder = tmp_path / "plugs"
    folder.mkdir(exist_ok=True)
    (folder / "bad.py").write_text(body)
    (folder / "good.py").write_text("")
    path = tmp_path / "c.yaml"
    path.write_text(f"servers: ['{NOWHERE}']\nlog: {{dir: logs}}\nplugins:\n  paths: [{folder}]\n"
                    f"  enabled: {enabled}\n")
    return path


def test_an_unknown_plugin_in_plugins_enabled_names_the_file_and_the_key(tmp_path):
    """It said "unknown plugin 'nope'" and nothing about where the name came from."""
    path = _plugin_config(tmp_path, "", enabled="[good, nope]")
    expected = f"{path}: plugins.enabled[1]: unknown plugin 'nope'; available: bad, good"
    assert_one_line(run_check("--config", str(path), "check"), expected)
    assert_one_line(run_script(WORKER, "--config", str(path), "--name", "w", "--threads", "1"), expected)


EXITS_AT_IMPORT = "import sys\nsys.exit(0)\n"
INTERRUPTS_AT_IMPORT = "raise KeyboardInterrupt\n"
EXITS_IN_TASKS_HOOK = """
import sys
from geartask import hookimpl

@hookimpl
def geartask_tasks():
    sys.exit(0)
"""
EXITS_IN_JOBS_HOOK = """
import sys
from geartask import hookimpl

@hookimpl
def geartask_jobs():
    yield {"task": "t"}
    sys.exit(0)
"""


@pytest.mark.parametrize("body, roles, message", [
    (EXITS_AT_IMPORT, ("check", "worker", "sender"), "cannot import: SystemExit"),
    (INTERRUPTS_AT_IMPORT, ("check", "worker", "sender"), "cannot import: KeyboardInterrupt"),
    (EXITS_IN_TASKS_HOOK, ("check", "worker"), "hook geartask_tasks raised SystemExit"),
    (EXITS_IN_JOBS_HOOK, ("sender",), "hook geartask_jobs raised SystemExit"),
], ids=["sys.exit at import", "KeyboardInterrupt at import", "sys.exit in geartask_tasks",
        "sys.exit in geartask_jobs"])
def test_a_plugin_that_exits_is_a_plugin_error_not_a_silent_success(tmp_path, body, roles, message):
    """sys.exit(0) in a plugin ended the role with status 0 and no word: a worker that never
    started looked like one that finished. Now it is the plugin's error, named, exit 2."""
    path = _plugin_config(tmp_path, body)
    runs = {"check": lambda: run_check("--config", str(path), "check"),
            "worker": lambda: run_script(WORKER, "--config", str(path), "--name", "w", "--threads", "1"),
            "sender": lambda: run_script(SENDER, "plugin", "bad", "--config", str(path))}
    for role in roles:
        r = runs[role]()
        assert_one_line(r, "plugin 'bad'", str(tmp_path / "plugs" / "bad.py"), message)


# -- numbers on the command line --------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    [MANAGER, "status", "--timeout", "inf"], [MANAGER, "status", "--timeout", "nan"],
    [MANAGER, "ping", "--timeout", "1e400"], [MANAGER, "version", "--timeout", "1e300"],
    [MANAGER, "status", "--watch", "nan"], [MANAGER, "workers", "--watch", "inf"],
    [MANAGER, "shutdown", "--wait", "nan"], [MANAGER, "shutdown", "--wait", "inf"],
    [MANAGER, "shutdown", "--wait", "-inf"], [MANAGER, "maxqueue", "f", "nan"],
    [MANAGER, "maxqueue", "f", "1e3"], [MANAGER, "maxqueue", "f", "99999999999"],
    [SENDER, "job", "t", "1", "--timeout", "inf"], [SENDER, "job", "t", "1", "--timeout", "nan"],
    [SENDER, "plugin", "eg", "--timeout", "-inf"], [SENDER, "shell", "--timeout", "nan", "--", "true"],
    [SENDER, "shell", "--retries", "nan", "--", "true"], [SENDER, "shell", "--retries", "inf", "--", "true"],
    [WORKER, "--name", "w", "--threads", "nan"], [WORKER, "--name", "w", "--threads", "inf"],
], ids=lambda argv: " ".join(argv[1:]))
def test_nan_infinity_and_absurd_numbers_in_flags_are_usage_errors(argv):
    """`--timeout inf` was an OverflowError traceback in the manager and a wrong message in the
    sender; `--wait nan` was accepted (and waited for nothing). Every numeric flag of the three
    commands now refuses them before any server is contacted."""
    r = run_script(argv[0], *argv[1:], "--servers", NOWHERE)
    assert r.returncode == 2, (argv, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.strip()
    assert "cannot connect" not in r.stderr  # refused before any network


# -- a peer that is not gearmand --------------------------------------------------------------

class _Quiet(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("command", ["version", "status", "workers", "ping", "jobs"])
def test_a_web_server_is_not_taken_for_gearmand(http_server, gearmand, command):
    """`version` against an HTTP server printed `<!DOCTYPE HTML>` as the version, exit 0. Now the
    manager checks each reply's shape and says which server is not a gearmand, exit 1, while
    a real gearmand next to it is still reported."""
    servers = ["--servers", f"{gearmand.address},{http_server}", "--timeout", "2"]
    r = run_script(MANAGER, command, *servers)
    assert r.returncode == 1, (r.stdout, r.stderr)
    (error,) = r.stderr.splitlines()
    assert error.startswith(f"error: {http_server}: ") and "not a gearmand" in error, r.stderr
    r = run_script(MANAGER, command, "--json", *servers)
    assert r.returncode == 1
    data = json.loads(r.stdout)
    ok = {s["server"]: s.get("ok", s.get("reachable")) for s in data["servers"]}
    assert ok == {gearmand.address: True, http_server: False}


class FakeGearmand:
    """Speaks just enough Gearman to pass for gearmand: answers ECHO_REQ, and each admin text
    line with ``answer(line)``, an iterable of byte chunks (sent as they come)."""

    def __init__(self, answer):
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket):
        buf = b""
        try:
            while not self.stop.is_set():
                chunk = conn.recv(65536)
                if not chunk:
                    return
                buf += chunk
                while buf:
                    if buf[:1] == b"\0":  # a binary request
                        if len(buf) < 12:
                            break
                        size = 12 + int.from_bytes(buf[8:12], "big")
                        if len(buf) < size:
                            break
                        packet, buf = buf[:size], buf[size:]
                        if int.from_bytes(packet[4:8], "big") == gp.ECHO_REQ:
                            conn.sendall(b"\0RES" + packet[4:8].replace(bytes([0, 0, 0, gp.ECHO_REQ]),
                                                                        bytes([0, 0, 0, gp.ECHO_RES])) + packet[8:])
                    elif b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        for part in self.answer(line.decode()):
                            if self.stop.is_set():
                                return
                            conn.sendall(part)
                    else:
                        break
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.stop.set()
        self.listener.close()


def _liar(status_lines: bytes):
    def answer(line):
        if line == "version":
            return [b"OK 1.1.20\n"]
        return [status_lines]
    return answer


@pytest.mark.parametrize("lines", [
    b"eg.reverse\t-1\t0\t2\n.\n",
    b"eg.reverse\t1\tx\t2\n.\n",
    b"eg.reverse\t1\t0\t99999999999999999999999999\n.\n",
    b"eg.reverse\t\xc2\xb2\t0\t1\n.\n",  # a superscript two: str.isdigit() says yes, int() says no
], ids=["negative", "a letter", "26 digits", "a unicode digit"])
def test_a_status_line_with_garbage_numbers_is_an_error_naming_the_server(lines):
    """gearmand's counts are plain decimal numbers; anything else is a peer that is not one."""
    liar = FakeGearmand(_liar(lines))
    try:
        r = run_script(MANAGER, "status", "--servers", liar.address, "--timeout", "2")
        assert_one_line(r, f"error: {liar.address}: malformed 'status' reply", status=1)
    finally:
        liar.close()


def test_a_reply_that_never_ends_is_cut_by_the_deadline():
    """A peer that sends a multi-line reply for ever (a line every 10 ms, never the end): the
    manager still answers within its --timeout per exchange."""
    def endless(line):
        if line == "version":
            yield b"OK 1.1.20\n"
            return
        for i in range(100_000):
            time.sleep(0.01)
            yield f"f{i}\t1\t0\t0\n".encode()
    liar = FakeGearmand(endless)
    try:
        t0 = time.monotonic()
        r = run_script(MANAGER, "status", "--servers", liar.address, "--timeout", "1")
        elapsed = time.monotonic() - t0
        assert_one_line(r, f"error: {liar.address}: no complete answer to 'status' within 1s", status=1)
        assert elapsed < 10, elapsed
    finally:
        liar.close()


def test_a_huge_reply_is_refused_past_the_cap():
    """A peer that floods an admin reply (fast, without ever ending it) can't take the
    manager's memory: past the cap the connection is dropped with a clear error."""
    chunk = b"x" * 65536

    def flood(line):
        for _ in range(10_000):
            yield chunk
    liar = FakeGearmand(flood)
    try:
        host, port = liar.address.rsplit(":", 1)
        conn = gp.Connection(host, int(port)).connect()
        with pytest.raises(ServerError, match="larger than 1048576 bytes"):
            conn.text_command("workers", timeout=20, max_bytes=1024 * 1024)
        assert not conn.connected
    finally:
        liar.close()


# -- names a hostile peer chose ---------------------------------------------------------------

EVIL_ID = "evil\x1b]0;pwned\x07\tX\rY"
EVIL_FUNCTION = "fn\x1b[2J\nforged-row\t9\t9\t9"
EVIL_UNIQUE = "u\n.\nH:forged\t0\t0\t0"


def test_escape_codes_and_newlines_in_peer_names_are_escaped_on_the_terminal_and_exact_in_json(fresh_gearmand):
    """A client id or function name with terminal escape codes was printed raw (a hostile worker
    could retitle the operator's terminal, clear it, or forge a row with a newline); a unique
    key with a '.' line ended gearmand's reply early and the rest was read as the next answer.
    Now every text output escapes what is not printable, JSON keeps the exact text, and
    admin replies are framed so no name can cut them short."""
    srv = fresh_gearmand
    evil = gp.Connection(srv.host, srv.port).connect()
    try:
        evil.send(gp.SET_CLIENT_ID, client_id=EVIL_ID)
        evil.send(gp.CAN_DO, task=EVIL_FUNCTION)
        evil.send(gp.submit_command("normal", True), task=EVIL_FUNCTION, unique=EVIL_UNIQUE, data=b"{}")
        evil.expect(gp.JOB_CREATED, 5)
        servers = ["--servers", srv.address]
        for command in ("status", "workers", "jobs"):
            r = run_script(MANAGER, command, *servers)
            assert r.returncode == 0, (command, r.stderr)
            assert "\x1b" not in r.stdout and "\x07" not in r.stdout and "\r" not in r.stdout, (command, r.stdout)
            assert not any(line.startswith("forged") for line in r.stdout.splitlines()), r.stdout
        r = run_script(MANAGER, "workers", *servers)
        assert "evil\\x1b]0;pwned\\x07\\tX\\rY" in r.stdout and "fn\\x1b[2J\\nforged-row\\t9\\t9\\t9" in r.stdout
        r = run_script(MANAGER, "status", *servers)
        (row,) = [line for line in r.stdout.splitlines() if line.startswith("fn\\x1b")]
        assert row.split()[1:] == ["1", "0", "1"], row  # the counts of the real line, not the forged ones

        data = json.loads(run_script(MANAGER, "workers", "--json", *servers).stdout)
        (conn,) = [c for c in data["servers"][0]["connections"] if c["client_id"] == EVIL_ID]
        assert conn["functions"] == [EVIL_FUNCTION.split(" ")[0]]
        data = json.loads(run_script(MANAGER, "status", "--json", *servers).stdout)
        assert {"function": EVIL_FUNCTION, "queued": 1, "running": 0, "workers": 1} in data["totals"]
        r = run_script(MANAGER, "jobs", "--json", *servers)
        assert r.returncode == 0, r.stderr
        # gearmand lists unique keys one per line, so one with newlines comes back in pieces,
        # but nothing after it is misread any more (before, `jobs` failed: "protocol error")
        assert "\n".join(json.loads(r.stdout)["servers"][0]["value"]["unique_keys"]) == EVIL_UNIQUE
        # and `clear` reaches the job under its true name
        r = run_script(MANAGER, "clear", "--yes", "--json", *servers)
        assert r.returncode == 0 and json.loads(r.stdout)["cleared"] == 1, r.stdout + r.stderr
    finally:
        evil.close()


# -- what the operator types goes into gearmand's line protocol ------------------------------

@pytest.mark.parametrize("args, message", [
    (["cancel", "H:" + "x" * 5000], "bad job handle"),
    (["cancel", "H:host:1\nshutdown"], "bad job handle"),
    (["cancel", "H:host 1"], "bad job handle"),
    (["maxqueue", "f\nshutdown graceful", "1"], "bad function name"),
    (["maxqueue", "f" * 10_000, "1"], "bad function name"),
    (["maxqueue", "two words", "1"], "bad function name"),
    (["clear", "--yes", "g" * 10_000], "bad function name"),
    (["shutdown", "--name", "two words"], "worker name"),
    (["shutdown", "--name", "w\x1b[2J"], "--name: bad worker name 'w\\x1b[2J'"),
    (["shutdown", "--name", "n" * 1000], "--name: bad worker name"),
    (["shutdown", "--host", "not-an-ip"], "--host: expected an IP address"),
    (["shutdown", "--host", "10.0.0.1 "], "--host: expected an IP address"),
], ids=["5000-char handle", "newline in handle", "space in handle", "newline in maxqueue function",
        "10000-char maxqueue function", "space in maxqueue function",
        "10000-char clear function", "space in --name", "escape in --name",
        "1000-char --name", "--host not an IP", "--host with a space"])
def test_bad_handles_function_names_and_filters_are_usage_errors_before_any_server_is_asked(gearmand, args, message):
    """A 5,000-character handle was reported as an unreachable server; a function name with a
    newline is a second command to gearmand's admin protocol; `shutdown --name 'two words'`
    matched nothing and said so with exit 0. Each is now a usage error, exit 2."""
    r = run_script(MANAGER, *args, "--servers", gearmand.address)
    assert_one_line(r, message)


@pytest.mark.parametrize("name", ["f\nshutdown", "two words"], ids=["newline", "space"])
def test_clear_takes_a_name_with_a_newline_or_space_without_reaching_the_line_protocol(gearmand, name):
    """`clear NAME` used to refuse these (a newline would have been a second command to
    gearmand's line protocol); it drains through the binary protocol now, so a function with
    such a name can be cleared (issue 20): the name is only a name, and nothing slips into the
    admin protocol (gearmand still answers: no `shutdown` went through)."""
    r = run_script(MANAGER, "clear", "--yes", name, "--servers", gearmand.address)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert gp.admin_command("127.0.0.1", gearmand.port, "version")[0].startswith("OK")


# -- logs -------------------------------------------------------------------------------------

def test_a_worker_whose_log_dir_is_deleted_writes_its_log_again(gearmand, tmp_path):
    """An operator cleaning up removes log.dir while a worker runs: its log lines went to a
    deleted file for the rest of its life. Now the file is made again within about a second."""
    from gearclient import run_one
    config = write_config(tmp_path / "c.yaml", [gearmand.address])
    w = WorkerProc(config, "logdel", 1, "--plugins", "eg").wait_attached([gearmand.address])
    try:
        log_dir = tmp_path / "logs"
        wait_until(lambda: (log_dir / "worker-logdel.log").exists(), 10, message="the worker's log")
        shutil.rmtree(log_dir)
        n = [0]

        def job_logged():
            n[0] += 1
            assert run_one(gearmand.address, "eg.reverse", f"after-{n[0]}", timeout=10).state == "complete"
            return any(e.get("task") == "eg.reverse" for e in w.log_lines())
        wait_until(job_logged, 15, interval=0.3, message="a job's line in the recreated log")
    finally:
        w.stop()


def test_client_ids_and_control_functions_built_to_break_the_parser_are_shown_not_crashed_on(fresh_gearmand):
    """'²' is a digit to str.isdigit() and not to int(); a NUL can't go into a job's function
    name. A peer registering such names made `workers` (and its ping) a traceback."""
    srv = fresh_gearmand
    evil = gp.Connection(srv.host, srv.port).connect()
    try:
        evil.send(gp.SET_CLIENT_ID, client_id="w:1.2.3.4:\u00b2:0")
        evil.send(gp.CAN_DO, task="geartask.control:x\0y:1.2.3.4:5")
        evil.send(gp.CAN_DO, task="geartask.control:z:1.2.3.4:\u00b3")
        evil.echo()
        for args in (["workers"], ["workers", "--json"], ["status"], ["shutdown", "--wait", "0"]):
            r = run_script(MANAGER, *args, "--servers", srv.address, "--timeout", "1")
            assert "Traceback" not in r.stderr, (args, r.stderr)
            assert r.returncode in (0, 1), (args, r.returncode, r.stderr)
        data = json.loads(run_script(MANAGER, "workers", "--json", "--servers", srv.address).stdout)
        (conn,) = [c for c in data["servers"][0]["connections"] if c["client_id"].startswith("w:")]
        assert conn["name"] is None  # not taken for a geartask worker
    finally:
        evil.close()
