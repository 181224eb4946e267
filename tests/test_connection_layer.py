"""The connection layer (geartask.gearman): address parsing, backoff and deadlines (pure),
the packet cap over real socket pairs, a rogue worker's 100 MB answer against a real sender,
and TLS through a real stunnel in front of a real gearmand."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest

from geartask import gearman as gp
from geartask.errors import ServerError
from geartask.sender.link import ServerLink
from geartask.sender.sender import JobSender

from helpers import PYTHON, REPO, wait_until
from netproxy import SliceProxy


# -- addresses ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, parsed", [
    ("h:1", ("tcp", "h", 1)),
    ("h", ("tcp", "h", 4730)),
    ("tls://gear.example:4731", ("tls", "gear.example", 4731)),
    ("TLS://10.0.0.1:9", ("tls", "10.0.0.1", 9)),
    ("[::1]:4730", ("tcp", "::1", 4730)),
    ("tls://[fe80::1]:7", ("tls", "fe80::1", 7)),
    ("[::1]", ("tcp", "::1", 4730)),
    ("::1", ("tcp", "::1", 4730)),
    (" tcp://h:2 ", ("tcp", "h", 2)),
])
def test_addresses_parse_into_scheme_host_port(text, parsed):
    assert gp.parse_address(text) == parsed


@pytest.mark.parametrize("text, words", [
    ("", "expected"), ("http://h:1", "unknown scheme 'http'"), ("h:0", "bad port"), ("h:x", "bad port"),
    ("h:70000", "bad port"), ("[::1", "missing ']'"), ("[::1]x", "bad text after"), ("tls://:1", "bad host"),
    ("a b:1", "bad host"), ("u@h:1", "bad host"),
])
def test_bad_addresses_say_what_is_wrong(text, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("(", r"\(")):
        gp.parse_address(text)


# -- backoff, deadlines, repeats (pure) ---------------------------------------------------------

def test_backoff_doubles_with_jitter_up_to_its_cap_and_resets():
    b = gp.Backoff(0.2, 10.0, rand=lambda: 1.0)
    assert [round(b.next(), 3) for _ in range(8)] == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0]
    assert b.reset() == 8 and b.failures == 0
    low = gp.Backoff(0.2, 10.0, rand=lambda: 0.0)
    waits = [low.next() for _ in range(8)]
    assert waits[0] == 0.2 and waits[-1] == 5.0  # jitter draws from [base/2, base], never below low
    assert gp.Backoff().low == gp.RECONNECT_MIN and gp.Backoff().high == gp.RECONNECT_MAX
    with pytest.raises(ValueError):
        gp.Backoff(0, 1)


def test_a_lane_waits_longer_on_a_slow_path_and_after_each_miss():
    """The sender's "server slow" deadline: submit_timeout on a fast path, a multiple of the
    measured round trip on a slow one, doubled per miss, at most failover_after."""
    link = ServerLink("h", 1)
    for _ in range(50):
        link.measured(0.0002)
    assert link.slow_after(5.0, 30.0) == 5.0  # a fast path never goes below the floor
    slow = ServerLink("h", 1)
    for _ in range(50):
        slow.measured(2.0)  # a loaded path: 2 s round trips
    assert 7.9 < slow.slow_after(5.0, 30.0) <= 8.1
    slow.missed()
    assert 15.9 < slow.slow_after(5.0, 30.0) <= 16.1
    slow.missed()
    assert slow.slow_after(5.0, 30.0) == 30.0
    slow.measured(2.0)
    assert slow.misses == 0 and slow.slow_after(5.0, 30.0) < 9


# -- the packet cap over a socket pair ----------------------------------------------------------

def _pair(max_packet: int) -> tuple[gp.Connection, socket.socket]:
    """A Connection over a real loopback TCP pair; the test plays the server on the other end."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        ours = socket.create_connection(listener.getsockname())
        theirs, _ = listener.accept()
    conn = gp.Connection("peer", 1, max_packet=max_packet)
    conn.adopt(ours)
    return conn, theirs


def _stream(sock: socket.socket, parts, chunk: int = 1 << 20) -> threading.Thread:
    """Send ``parts`` (bytes, or (byte, count) for count copies of a byte) without building them."""
    def run():
        try:
            for part in parts:
                if isinstance(part, tuple):
                    byte, n = part
                    block = byte * chunk
                    while n > 0:
                        sock.sendall(block[:min(n, chunk)])
                        n -= chunk
                else:
                    sock.sendall(part)
        except OSError:
            pass
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _header(cmd: int, length: int) -> bytes:
    return gp.HEADER.pack(gp.MAGIC_RES, cmd, length)


def test_an_oversize_answer_is_skipped_by_handle_and_never_buffered_whole():
    conn, peer = _pair(max_packet=64 * 1024)
    body = 20 * 1024 * 1024
    t = _stream(peer, [_header(gp.WORK_COMPLETE, len(b"H:x:1\0") + body) + b"H:x:1\0", (b"z", body),
                       gp.response_bytes(gp.ECHO_RES, b"after")])
    got, peak = [], 0
    deadline = time.monotonic() + 30
    while len(got) < 2 and time.monotonic() < deadline:
        pkt = conn.recv(5)
        peak = max(peak, len(conn._buf))
        if pkt is not None:
            got.append(pkt)
    t.join(10)
    assert [p.cmd for p in got] == [gp.WORK_COMPLETE, gp.ECHO_RES]
    assert got[0].args == {"job_handle": b"H:x:1", "oversize": str(6 + body).encode()}
    assert got[1]["data"] == b"after"  # the stream stays in step after the skipped body
    assert peak < 64 * 1024 + 70 * 1024  # never more than the cap and one read
    conn.close()


def test_an_oversize_packet_without_a_handle_closes_the_connection():
    conn, peer = _pair(max_packet=4096)
    _stream(peer, [_header(gp.ECHO_RES, 10_000_000), (b"e", 100_000)])
    with pytest.raises(ServerError, match=r"peer:1: a ECHO_RES packet of 10000000 bytes exceeds gearman.max_packet \(4096 bytes\)"):
        conn.recv(5)
    assert not conn.connected


def test_an_oversize_packet_with_an_endless_handle_is_a_protocol_error():
    conn, peer = _pair(max_packet=4096)
    _stream(peer, [_header(gp.WORK_DATA, 1_000_000), (b"h", 10_000)])
    with pytest.raises(ServerError, match="job handle longer than 64 bytes"):
        conn.recv(5)


def test_packets_under_the_cap_are_unchanged_and_read_packets_sees_them():
    conn, peer = _pair(max_packet=4096)
    data = b"d" * 4000
    peer.sendall(gp.response_bytes(gp.ECHO_RES, data) * 3)
    assert gp.wait_readable(conn.fileno(), 5)
    pkts = []
    while len(pkts) < 3:
        pkts += conn.read_packets()
    assert [p["data"] for p in pkts] == [data] * 3


# -- a rogue worker against a real sender --------------------------------------------------------

SENDER = r"""
import json, sys
from geartask.config import load_config
from geartask.logs import configure_logging, flush_logs
from geartask.sender.sender import JobSender
cfg = load_config(sys.argv[1])
configure_logging(cfg.log, "sender")
with JobSender(cfg) as s:
    results = list(s.stream([{"task": sys.argv[2], "data": i} for i in range(int(sys.argv[3]))], timeout=120))
flush_logs()
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"hwm_kb": int(hwm), "results": [[r.state, r.result, r.error] for r in results]}))
"""


def _rogue_worker(address: str, function: str, jobs: int, huge_at: int, size: int) -> threading.Thread:
    """Grabs ``jobs`` jobs; answers the ``huge_at``-th with a ``size``-byte WORK_COMPLETE
    (streamed, never held), the others with their own data."""
    host, port = address.rsplit(":", 1)

    def serve():
        conn = gp.Connection(host, int(port)).connect()
        try:
            conn.send(gp.CAN_DO, task=function)
            served, deadline = 0, time.monotonic() + 120
            while served < jobs and time.monotonic() < deadline:
                conn.send(gp.GRAB_JOB_UNIQ)
                pkt = conn.expect({gp.JOB_ASSIGN_UNIQ, gp.NO_JOB}, 30)
                if pkt.cmd == gp.NO_JOB:
                    time.sleep(0.05)
                    continue
                handle = pkt["job_handle"]
                if served == huge_at:
                    conn.send_raw(gp.HEADER.pack(gp.MAGIC_REQ, gp.WORK_COMPLETE, len(handle) + 1 + size)
                                  + handle + b"\0")
                    block = b"x" * (1 << 20)
                    left = size
                    while left > 0:
                        conn.send_raw(block[:min(left, len(block))])
                        left -= len(block)
                else:
                    conn.send(gp.WORK_COMPLETE, job_handle=handle, data=b'"ok"')
                served += 1
        finally:
            conn.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_a_rogue_100mb_answer_fails_its_job_only_and_the_sender_stays_small(gearmand_factory, fname, make_config,
                                                                             tmp_path):
    server = gearmand_factory(queue="none")
    cfg, _ = make_config(server)
    script = tmp_path / "send.py"
    script.write_text(SENDER)
    worker = _rogue_worker(server.address, fname, jobs=6, huge_at=2, size=100 * 1024 * 1024)
    proc = subprocess.run([PYTHON, str(script), str(cfg), fname, "6"], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    worker.join(30)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    states = [r[0] for r in out["results"]]
    assert states.count("complete") == 5 and states.count("failed") == 1, out["results"]
    error = [r[2] for r in out["results"] if r[0] == "failed"][0]
    assert error.startswith("answer of 1048576") and "bytes (WORK_COMPLETE)" in error, error
    assert "exceeds gearman.max_packet" in error and "WORK_COMPLETE" in error, error
    assert "packet too large; its job fails" in proc.stderr  # the clear logged error
    print("sender VmHWM MB:", out["hwm_kb"] / 1024)
    assert out["hwm_kb"] < 200 * 1024, out["hwm_kb"]


def test_a_work_data_and_status_flood_does_not_grow_the_sender(gearmand, fname, make_config):
    """200 MB of WORK_DATA in 1 MB packets and 100,000 WORK_STATUS: kept data stays under
    max_data, the rest is counted; the job's result still arrives."""
    _, config = make_config(gearmand)
    host, port = gearmand.address.rsplit(":", 1)

    def serve():
        conn = gp.Connection(host, int(port)).connect()
        try:
            conn.send(gp.CAN_DO, task=fname)
            for _ in range(200):
                conn.send(gp.GRAB_JOB_UNIQ)
                pkt = conn.expect({gp.JOB_ASSIGN_UNIQ, gp.NO_JOB}, 30)
                if pkt.cmd == gp.JOB_ASSIGN_UNIQ:
                    break
                time.sleep(0.05)
            h = pkt["job_handle"]
            status = b"".join(gp.pack(gp.WORK_STATUS, job_handle=h, numerator=i, denominator=100_000)
                              for i in range(100_000))
            conn.send_raw(status)
            chunk = gp.pack(gp.WORK_DATA, job_handle=h, data=b"d" * (1 << 20))
            for _ in range(200):
                conn.send_raw(chunk)
            conn.send(gp.WORK_COMPLETE, job_handle=h, data=b'"done"')
        finally:
            conn.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with JobSender(config) as sender:
        sender.max_data = 8 * 1024 * 1024
        r = sender.submit(fname, "x", timeout=120)
    t.join(30)
    assert r.state == "complete" and r.result == "done"
    assert sum(len(c) for c in r.data) <= 8 * 1024 * 1024 and r.data_dropped >= 190
    assert r.progress == (99_999, 100_000)


# -- TLS through stunnel in front of gearmand ---------------------------------------------------

STUNNEL = shutil.which("stunnel4") or shutil.which("stunnel")


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, cert, key=None) -> None:
    from cryptography.hazmat.primitives import serialization
    path.with_suffix(".pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))
        os.chmod(path.with_suffix(".key"), 0o600)


def _ca(d: Path, name: str):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write(d / name, cert, key)
    return cert, key


def _issue(d: Path, name: str, ca, *, ips=(), dns=(), expired: bool = False) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    ca_cert, ca_key = ca
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = (now - datetime.timedelta(days=10), now - datetime.timedelta(days=1)) if expired else \
        (now - datetime.timedelta(days=1), now + datetime.timedelta(days=30))
    sans = [x509.IPAddress(ipaddress.ip_address(i)) for i in ips] + [x509.DNSName(n) for n in dns]
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                     ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    _write(d / name, builder.sign(ca_key, hashes.SHA256()), key)


def _context(d: Path, ca: str = "ca", client: str | None = "client") -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(d / f"{ca}.pem")
    if client:
        ctx.load_cert_chain(d / f"{client}.pem", d / f"{client}.key")
    return ctx


class Stunnel:
    """A real stunnel in front of ``target`` requiring a client certificate of ``ca``."""

    def __init__(self, d: Path, target: str, cert: str = "server", ca: str = "ca"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        conf = d / f"stunnel-{self.port}.conf"
        conf.write_text(f"foreground = yes\npid =\ndebug = 4\n[gearman]\naccept = {self.address}\n"
                        f"connect = {target}\ncert = {d / (cert + '.pem')}\nkey = {d / (cert + '.key')}\n"
                        f"CAfile = {d / (ca + '.pem')}\nverifyChain = yes\nrequireCert = yes\n")
        self.log = open(d / f"stunnel-{self.port}.log", "wb")
        self.proc = subprocess.Popen([STUNNEL, str(conf)], stdout=self.log, stderr=subprocess.STDOUT)

        def up():
            assert self.proc.poll() is None, (d / f"stunnel-{self.port}.log").read_text()
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        wait_until(up, 15)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca = _ca(d, "ca")
    other = _ca(d, "otherca")
    _issue(d, "server", ca, ips=["127.0.0.1"], dns=["localhost"])
    _issue(d, "client", ca)
    _issue(d, "stranger", other)
    _issue(d, "expired", ca, ips=["127.0.0.1"], expired=True)
    return d


@pytest.fixture(scope="module")
def tls_server(pki, tmp_path_factory):
    if STUNNEL is None:
        pytest.fail("stunnel is not installed: apt-get install -y stunnel4 (scripts/install.sh does)")
    from conftest import _start_server
    server = _start_server(tmp_path_factory.mktemp("tls-gearmand"), queue="none")
    tunnel = Stunnel(pki, server.address)
    yield server, tunnel
    tunnel.stop()
    server.stop()


def _tls_worker(address: str, ctx: ssl.SSLContext, function: str, jobs: int) -> threading.Thread:
    host, port = address.rsplit(":", 1)

    def serve():
        conn = gp.Connection(host, int(port), tls=ctx).connect()
        try:
            conn.send(gp.CAN_DO, task=function)
            served, deadline = 0, time.monotonic() + 60
            while served < jobs and time.monotonic() < deadline:
                conn.send(gp.GRAB_JOB_UNIQ)
                pkt = conn.expect({gp.JOB_ASSIGN_UNIQ, gp.NO_JOB}, 30)
                if pkt.cmd == gp.NO_JOB:
                    conn.send(gp.PRE_SLEEP)
                    conn.recv_until(gp.NOOP, time.monotonic() + 1)
                    continue
                conn.send(gp.WORK_COMPLETE, job_handle=pkt["job_handle"], data=pkt["data"][-60:])
                served += 1
        finally:
            conn.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def _tls_sender(config, address: str, ctx: ssl.SSLContext, hostname: str | None = None) -> JobSender:
    sender = JobSender(config)
    host, port = address.rsplit(":", 1)
    sender.servers = [ServerLink(host, int(port), sender.keepalive, tls=ctx, server_hostname=hostname)]
    return sender


def test_tls_echo_admin_and_jobs_go_through_stunnel(pki, tls_server, fname, make_config):
    server, tunnel = tls_server
    ctx = _context(pki)
    conn = gp.Connection("127.0.0.1", tunnel.port, tls=ctx).connect()
    try:
        assert conn.echo(5) < 5
        assert isinstance(conn.sock, ssl.SSLSocket) and conn.sock.version() in ("TLSv1.2", "TLSv1.3")
        status = conn.text_command("status", 5)
        assert isinstance(status, list)
        pkt = conn.request(gp.submit_command(), gp.JOB_CREATED, 5, task=fname + ".nobody", unique="u1", data=b"x")
        assert pkt["job_handle"].startswith(b"H:")
    finally:
        conn.close()
    _, config = make_config(server)
    worker = _tls_worker(tunnel.address, ctx, fname, 20)
    with _tls_sender(config, tunnel.address, ctx) as sender:
        results = list(sender.stream([{"task": fname, "data": i} for i in range(20)], timeout=60))
    worker.join(30)
    assert [r.state for r in results] == ["complete"] * 20


def _refusal(ctx, hostname=None, port=None) -> str:
    conn = gp.Connection("127.0.0.1", port, tls=ctx, server_hostname=hostname, connect_timeout=10)
    with pytest.raises(ServerError) as e:
        conn.connect()
        conn.echo(10)  # TLS 1.3 refuses a client's certificate after the handshake: at the first read
    assert not conn.connected
    assert isinstance(e.value, gp.TLSError), e.value
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"127.0.0.1:{port}: TLS: ")
    return text


def test_tls_refusals_are_one_clear_line_naming_the_server(pki, tls_server):
    _, tunnel = tls_server
    assert "no client certificate" in _refusal(_context(pki, client=None), port=tunnel.port)
    assert "unknown CA (the server does not trust our certificate)" in \
        _refusal(_context(pki, client="stranger"), port=tunnel.port)
    assert "name mismatch (the server's certificate is not for wrong.example)" in \
        _refusal(_context(pki), hostname="wrong.example", port=tunnel.port)
    assert "unknown CA (the server's certificate is not signed by tls.ca)" in \
        _refusal(_context(pki, ca="otherca", client="client"), port=tunnel.port)


def test_an_expired_server_certificate_is_named(pki, tls_server):
    server, _ = tls_server
    tunnel = Stunnel(pki, server.address, cert="expired")
    try:
        assert "certificate expired (the server's)" in _refusal(_context(pki), port=tunnel.port)
    finally:
        tunnel.stop()


def test_plain_tcp_to_a_tls_port_and_tls_to_a_plain_port_fail_clearly(pki, tls_server):
    server, tunnel = tls_server
    with pytest.raises(ServerError):
        gp.Connection("127.0.0.1", tunnel.port, connect_timeout=5).connect().echo(5)
    assert "connection closed during the TLS handshake (not a TLS server" in _refusal(_context(pki), port=server.port)


def test_a_sender_without_a_client_certificate_gives_up_at_once_with_the_reason(pki, tls_server, fname,
                                                                               make_config):
    server, tunnel = tls_server
    _, config = make_config(server, "sender:\n  connect_timeout: 2\n")
    t0 = time.monotonic()
    with _tls_sender(config, tunnel.address, _context(pki, client=None)) as sender:
        with pytest.raises(ServerError, match="no client certificate"):
            list(sender.stream([{"task": fname, "data": 1}], timeout=60))
    # given up at its first refusal, like a refused connect: NoServerError after connect_timeout
    assert time.monotonic() - t0 < config.sender.connect_timeout + 4


def test_sliced_tls_through_a_slicing_proxy_works(pki, tls_server, fname, make_config):
    """Every byte of the server's handshake and records reaches us in slices of 1-48 bytes.

    Only the server's direction is sliced: stunnel 5.68 itself drops a connection whose client
    records arrive in slices ("transfer() loop executes not transferring any data", measured
    here with TLS 1.2 and 1.3), which is stunnel's reading, not ours."""
    server, tunnel = tls_server
    ctx = _context(pki)
    _, config = make_config(server)
    with SliceProxy(tunnel.address, seed=7, slice_up=False) as proxy:
        conn = gp.Connection("127.0.0.1", proxy.port, tls=ctx, server_hostname="127.0.0.1").connect()
        try:
            assert conn.echo(10) < 10
        finally:
            conn.close()
        worker = _tls_worker(proxy.address, ctx, fname, 200)
        with _tls_sender(config, proxy.address, ctx, hostname="127.0.0.1") as sender:
            results = list(sender.stream([{"task": fname, "data": "x" * (i * 50)} for i in range(200)], timeout=120))
        worker.join(30)
        assert proxy.slices > 1000
    assert [r.state for r in results] == ["complete"] * 200
