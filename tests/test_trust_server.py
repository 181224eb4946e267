"""server.tls: real stunnel in front of real gearmand, started and stopped by `geartask manage
server`. Only a client with a certificate from the fleet's CA gets any byte of the Gearman
protocol; the others get a TLS alert or a closed connection."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geartask.address import format_address
from geartask.config import load_config
from geartask.server import LocalServer, pid_alive, free_port
from geartask.trust import certs
from geartask.trust.tls import client_context
from helpers import tcp_timer, wait_until, write_config

GEARTASK = str(Path(sys.executable).parent / "geartask")
ECHO_REQ, ECHO_RES, SUBMIT_JOB_BG, JOB_CREATED = 16, 17, 18, 8

pytestmark = pytest.mark.skipif(shutil.which("stunnel") is None and shutil.which("stunnel4") is None,
                                reason="needs stunnel (Debian's stunnel4; scripts/install.sh installs it)")


def packet(kind: int, *args: bytes) -> bytes:
    data = b"\0".join(args)
    return b"\0REQ" + struct.pack(">II", kind, len(data)) + data


def tls_server(base: Path, host: str = "127.0.0.1", key: str = "server.key",
               server_extra: str = "") -> tuple[Path, int, int]:
    """(config, port, backend): a CA and a server certificate for ``host`` in base/pki, and a
    config whose server runs stunnel on host:port (free) in front of gearmand on backend."""
    certs.make_ca(base / "pki")
    certs.issue(base / "pki", "server", ips=[host])
    port, backend = free_port(), free_port()
    host_line = "" if host == "127.0.0.1" else f"  host: {json.dumps(host)}\n"
    config = write_config(base / "config.yaml", [f"tls://{format_address(host, port)}"], extra=(
        f"server:\n{host_line}  port: {port}\n  backend_port: {backend}\n  tls: true\n  queue: {{type: none}}\n"
        f"{server_extra}tls:\n  ca: pki/ca.pem\n  cert: pki/server.pem\n  key: pki/{key}\n"))
    return config, port, backend


def manage_server(config: Path, action: str) -> subprocess.CompletedProcess:
    return subprocess.run([GEARTASK, "--config", str(config), "manage", "server", action], capture_output=True,
                          text=True, timeout=60)


def read_exactly(sock, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise AssertionError(f"connection closed after {data!r}")
        data += chunk
    return data


def read_packet(sock) -> tuple[int, bytes]:
    magic, kind, size = struct.unpack(">4sII", read_exactly(sock, 12))
    assert magic == b"\0RES"
    return kind, read_exactly(sock, size)


def read_until_dot(sock, deadline: float = 10.0) -> list[str]:
    data = b""
    end = time.monotonic() + deadline
    while not data.endswith(b".\n") and time.monotonic() < end:
        chunk = sock.recv(4096)
        assert chunk, f"closed after {data!r}"
        data += chunk
    return data.decode().splitlines()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """A CA with a server and a client certificate, a second CA with its own client, and a
    running `manage server start` with server.tls: true."""
    base = tmp_path_factory.mktemp("tls-server")
    certs.make_ca(base / "pki")
    certs.issue(base / "pki", "server", ips=["127.0.0.1"])
    certs.issue(base / "pki", "client")
    certs.make_ca(base / "other", name="someone else's CA")
    certs.issue(base / "other", "client")
    port, backend = free_port(), free_port()
    config = write_config(base / "config.yaml", [f"tls://127.0.0.1:{port}"], extra=(
        f"server:\n  port: {port}\n  backend_port: {backend}\n  tls: true\n"
        f"  queue: {{path: {base / 'queue.sqlite'}}}\n"
        f"tls:\n  ca: pki/ca.pem\n  cert: pki/server.pem\n  key: pki/server.key\n"))
    r = subprocess.run([GEARTASK, "--config", str(config), "manage", "server", "start"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cfg = load_config(config)
    yield base, cfg, port, backend
    subprocess.run([GEARTASK, "--config", str(config), "manage", "server", "stop"], timeout=60)


def client(fleet_cfg, cert: str | None):
    """A client context of the fleet's CA with the given certificate (or none)."""
    base = Path(fleet_cfg.tls.ca).parent.parent
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(fleet_cfg.tls.ca)
    if cert:
        ctx.load_cert_chain(base / f"{cert}.pem", base / f"{cert}.key")
    return ctx


def test_a_fleet_certificate_echoes_submits_and_reads_status(fleet, fname):
    base, cfg, port, backend = fleet
    ctx = client_context(cfg)  # the config's own: tls.cert is the server's, also a client certificate
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        tls.sendall(packet(ECHO_REQ, b"hello through stunnel"))
        assert read_packet(tls) == (ECHO_RES, b"hello through stunnel")
        tls.sendall(packet(SUBMIT_JOB_BG, fname.encode(), b"u1", b"payload"))
        kind, handle = read_packet(tls)
        assert kind == JOB_CREATED and handle.startswith(b"H:")
        tls.sendall(b"status\n")
        assert f"{fname}\t1\t0\t0" in read_until_dot(tls)
    other_client = client(cfg, "pki/client")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            other_client.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(packet(ECHO_REQ, b"x"))
        assert read_packet(tls) == (ECHO_RES, b"x")


@pytest.mark.parametrize("cert, alert", [(None, "CERTIFICATE_REQUIRED"), ("other/client", "UNKNOWN_CA")])
def test_no_certificate_or_another_cas_gets_an_alert_and_no_gearman_byte(fleet, cert, alert):
    base, cfg, port, _ = fleet
    ctx = client(cfg, cert)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        with pytest.raises(ssl.SSLError, match=alert):  # TLS 1.3: the alert arrives on the first read
            tls.recv(4096)
    got = b""
    for request in (packet(ECHO_REQ, b"x"), b"status\n", b"workers\n", b"maxqueue x 1\n"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            try:
                tls.sendall(request)
                got += tls.recv(4096)
            except (ssl.SSLError, OSError):
                pass
    assert got == b""


def test_plain_tcp_gets_no_byte_of_the_gearman_protocol(fleet):
    _, _, port, _ = fleet
    for request in (packet(ECHO_REQ, b"x"), b"status\n", b"workers\n", b"version\n"):
        got = b""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            try:
                s.sendall(request)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    got += chunk
            except ConnectionResetError:
                pass
        # nothing, or a TLS alert record (content type 21): never a Gearman reply or admin line
        assert got == b"" or got[0] == 0x15, got
        assert b"\0RES" not in got and b"OK" not in got and b"\n.\n" not in got


def test_server_status_start_again_and_stop_stop_both(tmp_path):
    config, port, backend = tls_server(tmp_path)
    gt = [GEARTASK, "--config", str(config), "manage", "server"]
    assert subprocess.run([*gt, "start"], capture_output=True, timeout=60).returncode == 0
    srv = LocalServer.from_config(load_config(config))
    gearmand_pid, stunnel_pid = srv.pid(), srv.stunnel.pid()
    try:
        assert gearmand_pid and stunnel_pid and gearmand_pid != stunnel_pid
        assert srv.gearmand.host == "127.0.0.1" and srv.gearmand.port == backend
        conf = (tmp_path / "logs" / f"stunnel-{port}.conf").read_text()
        for line in ("verifyChain = yes", "requireCert = yes", "sslVersionMin = TLSv1.2",
                     f"connect = 127.0.0.1:{backend}", f"accept = 127.0.0.1:{port}"):
            assert line in conf.splitlines()
        r = subprocess.run([*gt, "status", "--json"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and '"tls": true' in r.stdout and f'"stunnel_pid": {stunnel_pid}' in r.stdout
        # starting a running server is a no-op: the same processes
        assert subprocess.run([*gt, "start"], capture_output=True, timeout=60).returncode == 0
        assert srv.pid() == gearmand_pid and srv.stunnel.pid() == stunnel_pid
    finally:
        r = subprocess.run([*gt, "stop"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "stopped" in r.stdout
    wait_until(lambda: not pid_alive(gearmand_pid) and not pid_alive(stunnel_pid), message="both processes gone")
    assert subprocess.run([*gt, "status"], capture_output=True, timeout=60).returncode == 1


def test_server_tls_without_certificates_is_a_config_error(tmp_path):
    port = free_port()
    config = write_config(tmp_path / "config.yaml", [f"127.0.0.1:{port}"],
                          extra=f"server:\n  port: {port}\n  tls: true\n  queue: {{type: none}}\n")
    r = subprocess.run([GEARTASK, "--config", str(config), "manage", "server", "start"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "tls.ca: needed by server.tls: true" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "logs" / f"gearmand-{port + 1}.pid").exists()


def test_a_stunnel_that_cannot_start_leaves_no_gearmand_behind(tmp_path):
    config, _, _ = tls_server(tmp_path, key="ca.key")  # the wrong key
    r = manage_server(config, "start")
    assert r.returncode == 1 and "stunnel exited at start" in r.stderr and "Traceback" not in r.stderr
    srv = LocalServer.from_config(load_config(config))
    assert srv.gearmand.pid() is None and srv.stunnel.pid() is None


def test_stunnel_drops_a_silent_peer_after_server_keepalive_not_after_two_hours(tmp_path):
    """With server.tls, gearmand's keepalive sees only stunnel's loopback connection, which
    never goes silent: a worker host cut off would keep its jobs "running" for 12 hours
    (TIMEOUTidle). stunnel's end of a client's connection has its keepalive timer armed for
    server.keepalive.idle seconds, so stunnel drops the peer and gearmand requeues its jobs."""
    config, port, _ = tls_server(tmp_path, server_extra="  keepalive: {idle: 7, interval: 2, count: 3}\n")
    r = manage_server(config, "start")
    assert r.returncode == 0, r.stderr
    try:
        text = LocalServer.from_config(load_config(config)).stunnel.conf_file.read_text().splitlines()
        assert {"socket = l:SO_KEEPALIVE=1", "socket = l:TCP_KEEPIDLE=7", "socket = l:TCP_KEEPINTVL=2",
                "socket = l:TCP_KEEPCNT=3"} <= set(text), text
        with socket.create_connection(("127.0.0.1", port), timeout=10) as peer:  # silent from here on
            # stunnel sets its options on a connection just after accepting it: wait for the timer
            timer = wait_until(lambda: (t := tcp_timer(port, peer.getsockname()[1]))[0] == 2 and t, 10,
                               message="stunnel's end of the connection with its keepalive timer")
            assert 0 < timer[1] <= 7, timer  # the kernel's default would be 7200 s
    finally:
        manage_server(config, "stop")


def test_a_path_with_a_line_break_is_never_written_into_stunnels_config(tmp_path):
    from geartask.errors import LocalServerError
    from geartask.server.stunnel import Stunnel
    s = Stunnel("127.0.0.1", 1, 2, tmp_path / "ca.pem", tmp_path / "x.pem\nverifyChain = no", tmp_path / "k",
                tmp_path)
    with pytest.raises(LocalServerError, match="tls.cert .* can't be written into stunnel's config"):
        s.config_text()


def test_stunnels_config_names_an_ipv6_host_bare_as_stunnel_splits_at_the_last_colon(tmp_path):
    """stunnel 5.68 resolves what is before the last ':' as written: `[::1]:4730` fails at start
    ("Error resolving "[::1]""), `::1:4730` listens on ::1. The backend stays on 127.0.0.1."""
    from geartask.server.stunnel import Stunnel
    lines = Stunnel("::1", 4730, 4731, tmp_path / "ca.pem", tmp_path / "c.pem", tmp_path / "k", tmp_path) \
        .config_text().splitlines()
    assert "accept = ::1:4730" in lines and "connect = 127.0.0.1:4731" in lines, lines
    lines = Stunnel("fd00:77::a", 4730, 4731, tmp_path / "ca.pem", tmp_path / "c.pem", tmp_path / "k",
                    tmp_path).config_text().splitlines()
    assert "accept = fd00:77::a:4730" in lines, lines
    lines = Stunnel("10.0.0.5", 4730, 4731, tmp_path / "ca.pem", tmp_path / "c.pem", tmp_path / "k",
                    tmp_path).config_text().splitlines()
    assert "accept = 10.0.0.5:4730" in lines, lines


def test_an_ipv6_server_host_behind_stunnel_answers_a_bracketed_tls_address(tmp_path):
    """server.host ::1 with server.tls: `manage server start` brings stunnel up on [::1]:PORT;
    clients named `tls://[::1]:PORT` verify the server certificate's IPv6 IP SAN and talk
    Gearman through it (`manage status` sees the queued job)."""
    config, port, _ = tls_server(tmp_path, host="::1")

    def geartask(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([GEARTASK, "--config", str(config), *args], capture_output=True, text=True, timeout=60)
    r = geartask("manage", "server", "start")
    try:
        assert r.returncode == 0, r.stderr
        conf = load_config(config)
        assert f"accept = ::1:{port}" in (Path(conf.log.dir) / f"stunnel-{port}.conf").read_text()
        r = geartask("send", "job", "v6.tls", "{}", "--background")
        assert r.returncode == 0, r.stderr
        r = geartask("manage", "status")
        assert r.returncode == 0 and "v6.tls" in r.stdout, (r.stdout, r.stderr)
        assert f"[::1]:{port}" in r.stdout, r.stdout
    finally:
        geartask("manage", "server", "stop")


def test_a_stunnel_that_cannot_bind_an_ipv6_host_says_why_in_one_line(tmp_path):
    """server.host an IPv6 address this machine does not have: `manage server start` exits 1
    with stunnel's own reason (its log's last line is only a cleanup note) and leaves no
    gearmand behind."""
    config, port, _ = tls_server(tmp_path, host="2001:db8::1")
    r = manage_server(config, "start")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    line = r.stderr.splitlines()[0]
    assert "stunnel exited at start" in line and f"2001:db8::1:{port}: Cannot assign requested address" in line, line
    srv = LocalServer.from_config(load_config(config))
    assert srv.gearmand.pid() is None and srv.stunnel.pid() is None
