"""deploy/'s stunnel unit passes `systemd-analyze verify`, and deploy/stunnel.conf, with only
its paths and ports changed, fronts a real gearmand the way `server.tls` does."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess

import pytest

from geartask.server import free_port
from geartask.trust import certs
from helpers import REPO, wait_until
from test_trust_server import ECHO_REQ, ECHO_RES, packet, read_packet

DEPLOY = REPO / "deploy"
STUNNEL = shutil.which("stunnel") or shutil.which("stunnel4")


def test_the_stunnel_unit_passes_systemd_analyze_verify(tmp_path):
    if shutil.which("systemd-analyze") is None or STUNNEL is None:
        pytest.skip("needs systemd-analyze and stunnel (scripts/install.sh installs both)")
    unit = tmp_path / "geartask-stunnel.service"
    unit.write_text((DEPLOY / "geartask-stunnel.service").read_text().replace("/usr/bin/stunnel", STUNNEL))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


@pytest.mark.skipif(STUNNEL is None, reason="needs stunnel (Debian's stunnel4)")
def test_the_example_stunnel_conf_fronts_gearmand(gearmand, tmp_path):
    certs.make_ca(tmp_path)
    certs.issue(tmp_path, "server", ips=["127.0.0.1"])
    certs.issue(tmp_path, "client")
    port = free_port()
    # the backend first: the new accept address may itself hold "127.0.0.1:4731" (port 47315)
    conf = ((DEPLOY / "stunnel.conf").read_text().replace("127.0.0.1:4731", gearmand.address)
            .replace("0.0.0.0:4730", f"127.0.0.1:{port}").replace("/etc/geartask/tls", str(tmp_path)))
    (tmp_path / "stunnel.conf").write_text(conf)
    with open(tmp_path / "stunnel.log", "wb") as log:
        proc = subprocess.Popen([STUNNEL, str(tmp_path / "stunnel.conf")], stdout=log, stderr=log)
    try:
        def listening():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return True
            except OSError:
                return proc.poll() is not None
        wait_until(listening, message="stunnel listening")
        assert proc.poll() is None, (tmp_path / "stunnel.log").read_text()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(tmp_path / "ca.pem")
        ctx.load_cert_chain(tmp_path / "client.pem", tmp_path / "client.key")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(packet(ECHO_REQ, b"deploy"))
            assert read_packet(tls) == (ECHO_RES, b"deploy")
    finally:
        proc.terminate()
        proc.wait(10)
