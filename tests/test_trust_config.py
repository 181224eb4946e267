"""tls:// in `servers` (issue 19): parsed by the config, kept as (host, port) for every caller
that unpacks it, and installed once per process so every connection to it is TLS."""

from __future__ import annotations

import ssl

import pytest

from geartask.config import ServerAddress, load_config, parse_config
from geartask.errors import ConfigError
from geartask.gearman import forget_tls, tls_for, use_tls
from geartask.trust import certs
from geartask.trust.tls import install
from helpers import write_config


def test_tls_entries_unpack_as_before_and_say_tls():
    cfg = parse_config({"servers": ["tls://10.0.0.5:4730", "jobs2:4731", "tls://[::1]:4732", "jobs3"]})
    assert [tuple(a) for a in cfg.server_addresses] == [("10.0.0.5", 4730), ("jobs2", 4731), ("::1", 4732),
                                                        ("jobs3", 4730)]
    assert [a.tls for a in cfg.server_addresses] == [True, False, True, False]
    host, port = cfg.server_addresses[0]
    assert (host, port) == ("10.0.0.5", 4730)
    assert [str(a) for a in cfg.server_addresses] == ["tls://10.0.0.5:4730", "jobs2:4731", "tls://[::1]:4732",
                                                      "jobs3:4730"]
    assert cfg.server_tls("10.0.0.5", 4730) and not cfg.server_tls("jobs2", 4731)
    assert cfg.servers == ["tls://10.0.0.5:4730", "jobs2:4731", "tls://[::1]:4732", "jobs3"]  # kept as written


@pytest.mark.parametrize("entry, words", [("http://a:1", "unknown scheme 'http'"), ("tls://", "expected 'host:port'"),
                                          ("tls://a:0", "must be 1-65535")])
def test_bad_tls_entries_are_config_errors_naming_the_entry(entry, words):
    with pytest.raises(ConfigError, match=words) as e:
        parse_config({"servers": ["a:1", entry]}, "c.yaml")
    assert "servers[1]" in str(e.value)


def test_loading_a_config_installs_tls_for_its_tls_servers_only(tmp_path):
    certs.make_ca(tmp_path / "pki")
    certs.issue(tmp_path / "pki", "h", ips=["127.0.0.1"])
    path = write_config(tmp_path / "c.yaml", ["tls://127.0.0.9:4999", "127.0.0.9:4998"],
                        "tls:\n  ca: pki/ca.pem\n  cert: pki/h.pem\n  key: pki/h.key\n")
    use_tls("127.0.0.9", 4998, lambda: ssl.create_default_context())  # left over from another config
    load_config(path)
    ctx = tls_for("127.0.0.9", 4999)
    assert isinstance(ctx, ssl.SSLContext) and ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert tls_for("127.0.0.9", 4999) is ctx  # built once
    assert tls_for("127.0.0.9", 4998) is None  # plain in this config: plain
    use_tls("127.0.0.9", 4999, None)


def test_forget_tls_reaches_every_port_of_that_host_in_clear_and_no_other_host():
    """A process meeting a plain gearmand where a TLS one was (the network tests reuse their
    addresses) must not try TLS on it: forget_tls drops the host's registrations, all ports."""
    ctx = ssl.create_default_context()
    for port in (4996, 4995):
        use_tls("127.0.0.9", port, ctx)
    use_tls("127.0.0.8", 4996, ctx)
    try:
        forget_tls("127.0.0.9")
        assert tls_for("127.0.0.9", 4996) is None and tls_for("127.0.0.9", 4995) is None
        assert tls_for("127.0.0.8", 4996) is ctx
    finally:
        use_tls("127.0.0.8", 4996, None)


def test_a_missing_certificate_is_said_when_a_connection_needs_it(tmp_path):
    certs.make_ca(tmp_path)
    cfg = parse_config({"servers": ["tls://127.0.0.9:4997"], "tls": {"ca": "ca.pem"}}, str(tmp_path / "c.yaml"),
                       tmp_path)
    install(cfg)
    try:
        with pytest.raises(ConfigError, match="tls.cert"):
            tls_for("127.0.0.9", 4997)
    finally:
        use_tls("127.0.0.9", 4997, None)


def test_server_address_is_a_plain_pair_for_equality():
    assert ServerAddress("h", 1, True) == ("h", 1)
    assert dict([ServerAddress("h", 1, True)]) == {"h": 1}


@pytest.mark.skipif(__import__("shutil").which("stunnel") is None and __import__("shutil").which("stunnel4") is None,
                    reason="needs stunnel")
def test_one_tls_connection_sends_from_one_thread_while_another_reads(tmp_path):
    """A worker's watchdog sends on a connection its job thread reads: OpenSSL's SSL object
    must never be written and read at once. 2,000 echoes sent from a second thread while this
    one reads them all back, intact and in order, through real stunnel and gearmand. (Without
    Connection's SSL lock this passed too in 3 tries here: the race is rare; the test guards
    that the lock never deadlocks a sender against a reader.)"""
    import threading
    import time

    from geartask import gearman as gp
    from geartask.server import LocalServer, free_port
    from geartask.server.stunnel import Stunnel
    from geartask.trust.tls import client_context
    certs.make_ca(tmp_path / "pki")
    certs.issue(tmp_path / "pki", "s", ips=["127.0.0.1"])
    certs.issue(tmp_path / "pki", "c")
    g = LocalServer(host="127.0.0.1", port=free_port(), run_dir=tmp_path, queue_type="none")
    g.start()
    st = Stunnel("127.0.0.1", free_port(), g.port, tmp_path / "pki/ca.pem", tmp_path / "pki/s.pem",
                 tmp_path / "pki/s.key", tmp_path)
    st.start()
    try:
        cfg = parse_config({"servers": [f"tls://127.0.0.1:{st.port}"],
                            "tls": {"ca": "pki/ca.pem", "cert": "pki/c.pem", "key": "pki/c.key"}},
                           str(tmp_path / "c.yaml"), tmp_path)
        conn = gp.Connection("127.0.0.1", st.port, tls=client_context(cfg)).connect()
        n, errors = 2000, []

        def sender() -> None:
            try:
                for i in range(n):
                    conn.send(gp.ECHO_REQ, data=b"%06d" % i + b"x" * (i % 700))
            except Exception as e:  # handed to the test's thread
                errors.append(e)
        t = threading.Thread(target=sender)
        t.start()
        got = []
        deadline = time.monotonic() + 60
        while len(got) < n and time.monotonic() < deadline and not errors:
            pkt = conn.recv(1.0)
            if pkt is not None:
                got.append(pkt["data"])
        t.join(30)
        conn.close()
        assert not errors, errors
        assert got == [b"%06d" % i + b"x" * (i % 700) for i in range(n)]
    finally:
        st.stop()
        g.stop()
