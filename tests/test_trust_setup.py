"""geartask certs / keys / init --secure / check, and ssl contexts from tls.*: real files,
real subprocesses, real handshakes."""

from __future__ import annotations

import os
import re
import socket
import ssl
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from geartask.config import load_config
from geartask.errors import ConfigError, UsageError
from geartask.server import free_port
from geartask.trust import certs
from geartask.trust.checks import problems
from geartask.trust.keys import load_private, public_text
from geartask.trust.tls import client_context, server_context
from helpers import write_config

GEARTASK = str(Path(sys.executable).parent / "geartask")


def gt(*args, cwd=None, umask=None):
    pre = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([GEARTASK, *args], capture_output=True, text=True, timeout=60, cwd=cwd, preexec_fn=pre)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_certs_and_keys_are_written_private_even_with_umask_0(tmp_path):
    assert gt("certs", "ca", "pki", cwd=tmp_path, umask=0).returncode == 0
    r = gt("certs", "issue", "pki", "h1", "--ip", "127.0.0.1", "--ip", "::1", "--dns", "h1.example", cwd=tmp_path, umask=0)
    assert r.returncode == 0, r.stderr
    r = gt("keys", "new", "k/me.key", cwd=tmp_path, umask=0)
    assert r.returncode == 0 and r.stdout.count("\n") == 1 and r.stdout.startswith("ed25519:")
    assert mode(tmp_path / "pki/ca.key") == mode(tmp_path / "pki/h1.key") == mode(tmp_path / "k/me.key") == 0o600
    assert mode(tmp_path / "pki/ca.pem") == mode(tmp_path / "pki/h1.pem") == 0o644
    assert public_text(load_private(tmp_path / "k/me.key")) == r.stdout.strip()
    assert gt("keys", "public", "k/me.key", cwd=tmp_path).stdout == r.stdout
    cert = x509.load_pem_x509_certificate((tmp_path / "pki/h1.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / "pki/ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert san.get_values_for_type(x509.DNSName) == ["h1.example"]
    gt("certs", "issue", "pki", "plain", cwd=tmp_path)
    plain = x509.load_pem_x509_certificate((tmp_path / "pki/plain.pem").read_bytes())
    assert plain.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
        .get_values_for_type(x509.DNSName) == ["plain"]  # the default: NAME


def test_an_ipv6_ip_san_may_be_written_bracketed_as_in_server_names(tmp_path):
    """`--ip [fd00:77::a]` (as in tls://[fd00:77::a]:4730) names the address itself."""
    certs.make_ca(tmp_path / "pki")
    certs.issue(tmp_path / "pki", "srv", ips=["[fd00:77::a]", "fd00:77::b", "10.0.0.5"])
    cert = x509.load_pem_x509_certificate((tmp_path / "pki/srv.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["fd00:77::a", "fd00:77::b", "10.0.0.5"]
    with pytest.raises(UsageError, match=r"--ip '\[10.0.0.5\]' is not an IP address"):
        certs.issue(tmp_path / "pki", "bad", ips=["[10.0.0.5]"])


@pytest.mark.parametrize("args, message", [
    (("certs", "ca", "pki"), "pki/ca.key already exists; nothing written (use --force to replace it)"),
    (("certs", "issue", "pki", "h1"), "pki/h1.key already exists"),
    (("keys", "new", "k.key"), "k.key already exists"),
    (("certs", "issue", "pki", "../x"), "bad certificate name '../x'"),
    (("certs", "issue", "pki", "ca"), "'ca' names the CA's own files"),
    (("certs", "issue", "pki", "h2", "--ip", "300.1.1.1"), "--ip '300.1.1.1' is not an IP address"),
    (("certs", "issue", "pki", "h2", "--dns", "a b"), "--dns 'a b' is not a DNS name"),
    (("certs", "issue", "nowhere", "h2"), "CA certificate: nowhere/ca.pem not found"),
    (("keys", "public", "pki/ca.pem"), "is not an unencrypted PEM private key"),
])
def test_user_mistakes_exit_2_with_one_line_and_nothing_overwritten(tmp_path, args, message):
    gt("certs", "ca", "pki", cwd=tmp_path)
    gt("certs", "issue", "pki", "h1", cwd=tmp_path)
    gt("keys", "new", "k.key", cwd=tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    r = gt(*args, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_force_replaces_a_key_without_following_a_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    (tmp_path / "k.key").symlink_to(victim)
    assert gt("keys", "new", "k.key", cwd=tmp_path).returncode == 2
    r = gt("keys", "new", "k.key", "--force", cwd=tmp_path)
    assert r.returncode == 0 and victim.read_text() == "keep"
    assert not (tmp_path / "k.key").is_symlink() and mode(tmp_path / "k.key") == 0o600


def tls_config(tmp_path, extra_tls: str, servers=("tls://127.0.0.1:4730",)):
    certs.make_ca(tmp_path / "pki")
    certs.issue(tmp_path / "pki", "h1", ips=["127.0.0.1"])
    certs.issue(tmp_path / "pki", "h2", ips=["127.0.0.1"])
    return write_config(tmp_path / "c.yaml", list(servers), extra="tls:\n" + extra_tls)


def test_client_context_verifies_the_server_and_presents_the_client_certificate(tmp_path):
    path = tls_config(tmp_path, "  ca: pki/ca.pem\n  cert: pki/h1.pem\n  key: pki/h1.key\n")
    cfg = load_config(path)
    assert cfg.tls.ca == str(tmp_path / "pki/ca.pem")  # relative to the config file
    ctx = client_context(cfg)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2 and ctx.check_hostname
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    server = server_context(cfg)
    seen = {}
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        import threading

        def serve():
            conn, _ = listener.accept()
            with server.wrap_socket(conn, server_side=True) as s:
                seen["peer"] = s.getpeercert()
                s.sendall(b"ok")
        t = threading.Thread(target=serve)
        t.start()
        with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="127.0.0.1") as c:
            assert c.recv(2) == b"ok"
        t.join(10)
    assert dict(x[0] for x in seen["peer"]["subject"])["commonName"] == "h1"
    # the name is checked: the certificate says 127.0.0.1, not localhost
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            _handshake(ctx, server, listener, "localhost")


def _handshake(ctx, server, listener, name):
    import threading

    def serve():
        conn, _ = listener.accept()
        try:
            server.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):
            conn.close()
    t = threading.Thread(target=serve)
    t.start()
    try:
        ctx.wrap_socket(socket.create_connection(listener.getsockname(), timeout=5), server_hostname=name).close()
    finally:
        t.join(10)


@pytest.mark.parametrize("tls, key, message", [
    ("  ca: pki/nope.pem\n  cert: pki/h1.pem\n  key: pki/h1.key\n", "tls.ca", "pki/nope.pem not found"),
    ("  ca: pki\n  cert: pki/h1.pem\n  key: pki/h1.key\n", "tls.ca", "is a directory"),
    ("  ca: pki/h1.key\n  cert: pki/h1.pem\n  key: pki/h1.key\n", "tls.ca", "holds no PEM certificate"),
    ("  ca: pki/ca.pem\n  cert: pki/h1.pem\n  key: pki/h2.key\n", "tls.key", "does not belong to the certificate"),
    ("  ca: pki/ca.pem\n  cert: pki/h1.key\n  key: pki/h1.key\n", "tls.cert", "is not a PEM certificate"),
    ("  ca: pki/ca.pem\n  cert: pki/h1.pem\n  key: pki/ca.pem\n", "tls.key", "is not an unencrypted PEM private key"),
    ("  ca: pki/ca.pem\n", "tls.cert", "needed for tls:// servers"),
])
def test_client_context_errors_name_the_key(tmp_path, tls, key, message):
    cfg = load_config(tls_config(tmp_path, tls))
    with pytest.raises(ConfigError) as e:
        client_context(cfg)
    assert e.value.key == key and message in str(e.value) and "\n" not in str(e.value)


def test_an_unreadable_file_names_the_key(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    cfg = load_config(tls_config(tmp_path, "  ca: pki/ca.pem\n  cert: pki/h1.pem\n  key: pki/h1.key\n"))
    os.chmod(tmp_path / "pki/h1.key", 0)
    with pytest.raises(ConfigError, match="tls.key: cannot read"):
        client_context(cfg)


@pytest.mark.parametrize("extra, key", [
    ("server:\n  port: 5000\n  backend_port: 5000\n", "server.backend_port"),
    ("server:\n  backend_port: 70000\n", "server.backend_port"),
    ("security:\n  max_job_age: 0\n", "security.max_job_age"),
    ("security:\n  trust: [{name: a, public_key: 'ed25519:xx', may: ['*']}]\n", "security.trust[0].public_key"),
    ("security:\n  require_signed: 1\n", "security.require_signed"),
    ("tls:\n  certs: x\n", "tls.certs"),
])
def test_bad_trust_config_keys_are_named(tmp_path, extra, key):
    with pytest.raises(ConfigError) as e:
        load_config(write_config(tmp_path / "c.yaml", ["127.0.0.1:4730"], extra))
    assert e.value.key == key


def test_defaults_are_off():
    from geartask.config import Config
    c = Config()
    assert (c.server.tls, c.security.require_signed, c.security.max_job_age, c.tls.ca) == (False, False, 86400.0, "")
    assert problems(c) == []


@pytest.mark.parametrize("extra, servers, message", [
    ("", ["tls://127.0.0.1:4730"], "tls.cert: not set, but servers has tls://127.0.0.1:4730"),
    ("server:\n  tls: true\n", ["127.0.0.1:4730"], "tls.ca: not set, but server.tls is true"),
    ("server:\n  tls: true\n", ["127.0.0.1:4730"], "servers: 127.0.0.1:4730 is the TLS terminator"),
    ("security:\n  require_signed: true\n  key: k.key\n  trust: [{name: ops, public_key: '%s', may: ['*']}]\n",
     ["127.0.0.1:4730"], "security.require_signed: nobody in security.trust may 'control'"),
    ("security:\n  require_signed: true\n  trust: [{name: ops, public_key: '%s', may: [control]}]\n",
     ["127.0.0.1:4730"], "security.key: not set, but security.require_signed is true"),
    ("security:\n  key: nope.key\n", ["127.0.0.1:4730"], "nope.key not found"),
])
def test_check_reports_a_half_secured_config(tmp_path, extra, servers, message):
    pub = gt("keys", "new", "k.key", cwd=tmp_path).stdout.strip()
    cfg = write_config(tmp_path / "config.yaml", servers, extra.replace("%s", pub))
    r = gt("check", "--config", str(cfg), cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_init_secure_makes_a_fleet_that_works_out_of_the_box(tmp_path):
    r = gt("init", "--secure", "fleet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    folder = tmp_path / "fleet"
    for key in ("tls/ca.key", "tls/host.key", "keys/geartask.key"):
        assert mode(folder / key) == 0o600
    assert gt("check", "--config", str(folder / "config.yaml"), cwd=folder).returncode == 0
    cfg = load_config(folder / "config.yaml")
    assert cfg.server.tls and cfg.security.require_signed and cfg.servers == ["tls://127.0.0.1:4730"]
    signer = cfg.security.trust[0]
    assert signer["may"] == ["*", "control", "report", "answer"]
    assert signer["public_key"] == public_text(load_private(cfg.security.key))
    # run it on free ports (4730 may be someone else's here)
    port, backend = free_port(), free_port()
    # one pass: a chained replace would rewrite the "4731" inside a free port such as 47317
    ports = {"4730": str(port), "4731": str(backend)}
    text = re.sub(r"\b473[01]\b", lambda m: ports[m.group()], (folder / "config.yaml").read_text())
    (folder / "config.yaml").write_text(text)
    assert gt("init", "--secure", "fleet", cwd=tmp_path).returncode == 2  # nothing overwritten
    r = gt("manage", "server", "start", "--config", str(folder / "config.yaml"), cwd=folder)
    assert r.returncode == 0, r.stderr
    try:
        ctx = client_context(load_config(folder / "config.yaml"))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"version\n")
            assert tls.recv(100).startswith(b"OK ")
    finally:
        assert gt("manage", "server", "stop", "--config", str(folder / "config.yaml"), cwd=folder).returncode == 0


def test_the_config_helpers_load_the_key_and_the_trust_list(tmp_path):
    from geartask.trust.keys import signing_key
    from geartask.trust.policy import decide, trust_of
    from geartask.trust.signing import sign_job
    pub = gt("keys", "new", "k.key", cwd=tmp_path).stdout.strip()
    cfg = load_config(write_config(tmp_path / "c.yaml", ["127.0.0.1:4730"], (
        f"security:\n  key: k.key\n  trust: [{{name: me, public_key: '{pub}', may: [shell]}}]\n")))
    key = signing_key(cfg)
    assert public_text(key) == pub
    assert decide("shell", "u", sign_job("shell", "u", b"p", key), trust_of(cfg), __import__("time").time()).signer == "me"
    (tmp_path / "k.key").write_text("junk")
    with pytest.raises(ConfigError) as e:
        signing_key(cfg)
    assert e.value.key == "security.key" and "not an unencrypted PEM private key" in str(e.value)
    from geartask.config import Config
    assert signing_key(Config()) is None and len(trust_of(Config())) == 0


def test_register_adds_certs_and_keys_to_an_argparse_subparser_set(tmp_path, capsys):
    import argparse
    from geartask.trust.cli import register
    parser = argparse.ArgumentParser(prog="geartask")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["keys", "new", str(tmp_path / "a.key")])
    assert args.func(args) == 0 and capsys.readouterr().out.startswith("ed25519:")
    args = parser.parse_args(["certs", "ca", str(tmp_path / "pki")])
    assert args.func(args) == 0 and (tmp_path / "pki/ca.key").exists()
