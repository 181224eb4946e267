"""The local gearmand, and the protocol module's quirk handling, against real servers."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from geartask import gearman as protocol
from geartask.errors import LocalServerError, ServerError
from geartask.server import LocalServer, free_port, port_open

from helpers import tcp_timer, wait_until


def test_start_status_stop(tmp_path):
    server = LocalServer("127.0.0.1", free_port(), tmp_path / "run", queue_path=tmp_path / "q.sqlite")
    pid = server.start()
    try:
        st = server.status()
        assert st["running"] and st["pid"] == pid and st["queue"] == "sqlite"
        assert server.pid_file.read_text().strip() == str(pid)
        assert protocol.admin_command("127.0.0.1", server.port, "version")[0].startswith("OK ")
        assert server.start() == pid  # starting a running server is a no-op
    finally:
        assert server.stop() is True
    assert not port_open("127.0.0.1", server.port)
    assert server.status()["running"] is False
    assert server.stop() is False  # nothing left to stop


def test_start_refuses_a_port_someone_else_serves(gearmand, tmp_path):
    other = LocalServer("127.0.0.1", gearmand.port, tmp_path / "other", queue_type="none")
    with pytest.raises(LocalServerError, match="something else already serves"):
        other.start()


def test_missing_gearmand_program_is_a_clear_error(tmp_path):
    server = LocalServer("127.0.0.1", free_port(), tmp_path, gearmand="no-such-gearmand")
    with pytest.raises(LocalServerError, match="'no-such-gearmand' not found: install it with"):
        server.start()


def test_background_job_survives_kill_9_and_restart(fresh_gearmand, fname):
    """A job queued by the C client is in the sqlite queue, so a crash doesn't lose it."""
    port = str(fresh_gearmand.port)
    subprocess.run(["gearman", "-h", "127.0.0.1", "-p", port, "-b", "-f", fname, "-u", "keep-me", "--", "payload"],
                   check=True, timeout=30)
    assert protocol.admin_command("127.0.0.1", fresh_gearmand.port, "status") == [f"{fname}\t1\t0\t0"]
    fresh_gearmand.kill()
    assert not port_open("127.0.0.1", fresh_gearmand.port)
    fresh_gearmand.start()
    assert protocol.admin_command("127.0.0.1", fresh_gearmand.port, "status") == [f"{fname}\t1\t0\t0"]
    # and a worker really gets it, unique key and data intact
    conn = protocol.Connection("127.0.0.1", fresh_gearmand.port).connect()
    try:
        conn.send(protocol.CAN_DO, task=fname)
        conn.send(protocol.GRAB_JOB_UNIQ)
        pkt = conn.expect(protocol.JOB_ASSIGN_UNIQ, 5)
        assert (pkt["unique"], pkt["data"]) == (b"keep-me", b"payload")
        conn.send(protocol.WORK_COMPLETE, job_handle=pkt["job_handle"], data=b"")
        wait_until(lambda: protocol.admin_command("127.0.0.1", fresh_gearmand.port, "status")
                   == [f"{fname}\t0\t0\t1"], message="the job to leave the queue")
    finally:
        conn.close()


def test_str_task_names_reach_a_job_from_the_c_client(gearmand, fname):
    """Quirk: the server speaks bytes; registering a str name must still receive jobs."""
    conn = protocol.Connection("127.0.0.1", gearmand.port).connect()
    try:
        conn.send(protocol.SET_CLIENT_ID, client_id="quirk:127.0.0.1:1:0")
        conn.send(protocol.CAN_DO, task=fname)  # a str, encoded for the wire here
        client = subprocess.Popen(["gearman", "-h", "127.0.0.1", "-p", str(gearmand.port), "-f", fname, "--", "ping"],
                                  stdout=subprocess.PIPE, text=True)
        conn.send(protocol.PRE_SLEEP)
        conn.expect(protocol.NOOP, 10)
        conn.send(protocol.GRAB_JOB_UNIQ)
        pkt = conn.expect(protocol.JOB_ASSIGN_UNIQ, 5)
        assert pkt.text("task") == fname and pkt["data"] == b"ping"
        conn.send(protocol.WORK_COMPLETE, job_handle=pkt["job_handle"], data="pong")
        out, _ = client.communicate(timeout=10)
        assert out.strip() == "pong"
    finally:
        conn.close()


def test_parser_handles_split_and_coalesced_packets(gearmand):
    """Quirk: pygearman's parser needs a memoryview; many packets in one read, or one split, both parse."""
    conn = protocol.Connection("127.0.0.1", gearmand.port).connect()
    try:
        big = b"x" * 200_000  # arrives in several recv() chunks
        conn.send_raw(b"".join(protocol.pack(protocol.ECHO_REQ, data=d) for d in (b"a", big, b"c")))
        got = [conn.expect(protocol.ECHO_RES, 5)["data"] for _ in range(3)]
        assert got == [b"a", big, b"c"]
    finally:
        conn.close()


def test_admin_text_commands_single_and_multi_line(gearmand):
    assert protocol.admin_command("127.0.0.1", gearmand.port, "getpid")[0] == f"OK {gearmand.pid()}"
    workers = protocol.admin_command("127.0.0.1", gearmand.port, "workers")
    assert isinstance(workers, list) and all(isinstance(line, str) for line in workers)
    assert protocol.admin_command("127.0.0.1", gearmand.port, "no such command")[0].startswith("ERR ")


def test_unreachable_server_is_a_server_error():
    port = free_port()
    with pytest.raises(ServerError, match=f"127.0.0.1:{port}: cannot connect"):
        protocol.Connection("127.0.0.1", port, connect_timeout=1).connect()


@pytest.mark.parametrize("keepalive", [(7, 2, 3), None])
def test_gearmand_runs_with_the_configured_tcp_keepalive(tmp_path, keepalive):
    """gearmand keeps a silent peer's connection (and its running jobs) for about 2 h 11 min
    with the kernel's keepalive defaults: `server start` passes server.keepalive, and gearmand's
    end of a connection then has its keepalive timer armed for `idle` seconds, not 7200."""
    server = LocalServer("127.0.0.1", free_port(), tmp_path / "run", queue_type="none", keepalive=keepalive)
    pid = server.start()
    client = socket.create_connection(("127.0.0.1", server.port))
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        flags = ["--keepalive", "--keepalive-idle", "7", "--keepalive-interval", "2", "--keepalive-count", "3"]
        if keepalive:
            i = argv.index("--keepalive")
            assert argv[i:i + len(flags)] == flags
        else:
            assert not any(a.startswith("--keepalive") for a in argv)
        # gearmand sets its options just after accepting: wait for the keepalive timer (kind 2)
        kind, left = wait_until(lambda: (t := tcp_timer(server.port, client.getsockname()[1]))[0] == 2 and t, 5,
                                message="gearmand's end of the connection with its keepalive timer")
        if keepalive:
            assert 0 < left <= 7, left
        else:  # the kernel's default idle time: 2 hours (tcp_keepalive_time)
            assert left > 3600, left
    finally:
        client.close()
        server.stop()


def test_gearmands_log_is_rotated_past_its_size_and_gearmand_writes_on_in_a_new_file(tmp_path):
    server = LocalServer("127.0.0.1", free_port(), tmp_path / "run", queue_path=tmp_path / "q.sqlite",
                         max_log_bytes=2000, log_backups=2)
    log, first, second = server.log_file, Path(f"{server.log_file}.1"), Path(f"{server.log_file}.2")
    pid = server.start()
    try:
        def grow_past(limit: int) -> None:  # each connection is a few INFO lines
            def big() -> bool:  # (after a SIGHUP, the file is back once gearmand reopened it)
                if log.exists() and log.stat().st_size > limit:
                    return True
                port_open("127.0.0.1", server.port)
                return False
            wait_until(big, 30, interval=0, message=f"gearmand's log past {limit} bytes")

        grow_past(2000)
        assert server.status()["running"]  # status finds it too big: renamed, gearmand HUPed
        assert first.stat().st_size > 2000 and not second.exists()
        wait_until(lambda: "reopening log file" in first.read_text(), 10, message="gearmand got the SIGHUP")
        wait_until(lambda: port_open("127.0.0.1", server.port) and log.exists() and
                   "Accepted connection" in log.read_text(), 10, message="gearmand writing to the new log")
        grow_past(2000)
        assert server.start() == pid  # start of a running server rotates as well
        assert second.exists() and first.exists()
        grow_past(2000)
        server.status()
        wait_until(log.exists, 10, message="gearmand reopened its log")
        assert sorted(p.name for p in log.parent.glob("*.log*")) == [log.name, first.name, second.name]  # 2 kept
    finally:
        server.stop()
    assert server.pid() is None
    server.max_log_bytes = log.stat().st_size - 1  # at start, before gearmand runs: a rename, no signal
    server.start()
    try:
        assert "Shutdown complete" in first.read_text() and "Shutdown complete" not in log.read_text()
    finally:
        server.stop()


def test_with_no_backups_gearmands_log_is_emptied_in_place(tmp_path):
    server = LocalServer("127.0.0.1", free_port(), tmp_path / "run", queue_path=tmp_path / "q.sqlite",
                         max_log_bytes=1000, log_backups=0)
    server.start()
    try:
        wait_until(lambda: server.log_file.stat().st_size > 1000 or port_open("127.0.0.1", server.port) and False,
                   30, interval=0, message="gearmand's log past 1000 bytes")
        server.status()
        assert server.log_file.stat().st_size < 1000 and not Path(f"{server.log_file}.1").exists()
        port_open("127.0.0.1", server.port)
        wait_until(lambda: b"Accepted connection" in server.log_file.read_bytes().lstrip(b"\0"), 10,
                   message="gearmand appending to the emptied file")
        assert not server.log_file.read_bytes().startswith(b"\0")  # appended at the start, no hole
    finally:
        server.stop()
