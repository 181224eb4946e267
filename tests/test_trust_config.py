"""tls:// in `servers` (issue 19): parsed by the config, kept as (host, port) for every caller
that unpacks it, and installed once per process so every connection to it is TLS."""

from __future__ import annotations

import ssl

import pytest

from geartask.config import ServerAddress, load_config, parse_config
from geartask.errors import ConfigError
from geartask.gearman import tls_for, use_tls
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
