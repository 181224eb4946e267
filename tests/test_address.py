"""The one parser and formatter of addresses and client ids: IPv4 forms unchanged, IPv6 bracketed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from geartask import gearman as gp
from geartask.address import (canonical_address, format_address, format_host, parse_host, split_address,
                              split_server)
from geartask.config import load_config, parse_hostport
from geartask.control import WorkerIdentity, parse_client_id, parse_control_function
from geartask.errors import ConfigError
from geartask.fleet.checks import check_host
from geartask.fleet.replies import parse_workers, peer_ip
from geartask.sender.background import server_problem
from geartask.sender.outcomes import split_key



@pytest.mark.parametrize("text, parsed", [
    ("10.0.0.5:4731", ("10.0.0.5", 4731)),
    ("10.0.0.5", ("10.0.0.5", 4730)),
    ("gear.example:9", ("gear.example", 9)),
    ("localhost", ("localhost", 4730)),
    ("[::1]:47601", ("::1", 47601)),
    ("[2001:db8::1]:4730", ("2001:db8::1", 4730)),
    ("[2001:db8::1]", ("2001:db8::1", 4730)),
    ("[fe80::1%eth0]:7", ("fe80::1%eth0", 7)),
    # bare IPv6: the whole text is the host, the port the default (a port needs brackets)
    ("2001:db8::1", ("2001:db8::1", 4730)),
    ("::1", ("::1", 4730)),
    (" h:2 ", ("h", 2)),
])
def test_addresses_split_into_host_and_port(text, parsed):
    assert split_address(text) == parsed
    assert parse_hostport(text) == parsed  # the config's entry point is the same parser


@pytest.mark.parametrize("text, words", [
    ("", "expected 'host:port'"),
    ("h:0", "bad port in 'h:0': must be 1-65535"),
    ("h:x", "bad port in 'h:x': not a number"),
    ("h:70000", "must be 1-65535"),
    ("[::1", "missing ']'"),
    ("[::1]x", "bad text after ']'"),
    ("[gear.example]:1", "brackets hold an IPv6 address only"),
    ("2001:db8:::1", "not an IPv6 address; write IPv6 with a port as [2001:db8::1]:4730"),
    ("host:1:2", "not an IPv6 address"),
    (":1", "bad host"),
    ("a b:1", "bad host"),
    ("u@h:1", "bad host"),
])
def test_bad_addresses_say_what_is_wrong(text, words):
    with pytest.raises(ValueError) as exc:
        split_address(text)
    assert words in str(exc.value)


@pytest.mark.parametrize("host, port, text", [
    ("10.0.0.5", 4730, "10.0.0.5:4730"), ("gear.example", 1, "gear.example:1"),
    ("::1", 47601, "[::1]:47601"), ("2001:db8::1", 4730, "[2001:db8::1]:4730"),
])
def test_format_and_split_are_inverse(host, port, text):
    assert format_address(host, port) == text
    assert split_address(text) == (host, port)
    assert gp.parse_address(text) == ("tcp", host, port)
    assert gp.parse_address("tls://" + text) == ("tls", host, port)


def test_canonical_spelling_compresses_ipv6_and_keeps_ipv4():
    assert canonical_address("[0:0::0001]:5") == "[::1]:5"
    assert canonical_address("2001:db8::1") == "[2001:db8::1]:4730"
    assert canonical_address("10.0.0.5:7") == "10.0.0.5:7"
    assert format_host("::1") == "[::1]" and format_host("h") == "h"


def test_a_server_with_its_port_must_bracket_ipv6():
    """In a handle's @SERVER the port is required: '::1:4730' can't be told apart, so it is refused."""
    assert split_server("[::1]:47601") == ("::1", 47601)
    assert split_server("10.0.0.5:4730") == ("10.0.0.5", 4730)
    with pytest.raises(ValueError, match=r"as \[ADDR\]:PORT"):
        split_server("::1:4730")
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        split_server("[::1]")
    assert server_problem("[::1]:47601") is None
    assert "[ADDR]:PORT" in server_problem("::1:47601")
    assert split_key("H:vm:1@[0::1]:47601") == (None, "H:vm:1", "[::1]:47601")
    assert split_key("H:vm:1@10.0.0.5:4730") == (None, "H:vm:1", "10.0.0.5:4730")


@pytest.mark.parametrize("text, host", [("::1", "::1"), ("[::1]", "::1"), ("10.0.0.5", "10.0.0.5"), ("web3", "web3")])
def test_a_host_alone(text, host):
    assert parse_host(text) == host


@pytest.mark.parametrize("text", ["", "[web3]", "a b", "1:2:3"])
def test_a_bad_host_alone(text):
    with pytest.raises(ValueError):
        parse_host(text)


def test_manage_host_filter_takes_ipv6_bare_or_bracketed():
    assert check_host("::1") == check_host("[::1]") == check_host("0::1") == "::1"
    assert check_host("10.0.0.5") == "10.0.0.5"


# -- the client id and the control function -----------------------------------------------

@pytest.mark.parametrize("ip, client_id, control", [
    ("10.0.0.5", "w1:10.0.0.5:1234:3", "geartask.control:w1:10.0.0.5:1234"),  # the IPv4 form, as before
    ("::1", "w1:[::1]:1234:3", "geartask.control:w1:[::1]:1234"),
    ("2001:db8::7", "w1:[2001:db8::7]:1234:3", "geartask.control:w1:[2001:db8::7]:1234"),
])
def test_client_id_carries_the_ip_and_reads_back(ip, client_id, control):
    ident = WorkerIdentity("w1", ip, 1234, 3)
    assert ident.client_id == client_id
    assert ident.control_function == control
    assert parse_client_id(client_id) == ident
    assert parse_control_function(control) == WorkerIdentity("w1", ip, 1234)
    fleet = WorkerIdentity("w1", ip, 1234, 3, "prod")
    assert fleet.client_id == client_id + ":prod"
    assert parse_client_id(fleet.client_id) == fleet


@pytest.mark.parametrize("text", [
    "w1:::1:1234:3",  # an IPv6 address written bare: not a geartask client id
    "w1:[web3]:1234:3", "w1:[::1:1234:3", "w1:10.0.0.5:12x:3", "w1:10.0.0.5:1234", "-", "",
    "w1:[::1]:1234:3:bad fleet",
])
def test_client_ids_of_another_form_are_not_guessed(text):
    assert parse_client_id(text) is None


def test_workers_reply_of_an_ipv6_peer():
    """What gearmand 1.1.20 really prints for workers on [::1] (measured): the IP column is
    garbled (the port's digits as address bytes, a made-up scope id), so it reads '-'; the
    worker's own address comes from its client id."""
    lines = ["38 ::%2533699104 - :",
             "39 ::3433:3930:3800:0%2533699104 w1:[::1]:4881:1 : shell eg.reverse",
             "40 ::3433:3930:3900:0%2533699104 w1:[::1]:4881:0 : geartask.control:w1:[::1]:4881",
             "41 10.0.0.5 w2:10.0.0.5:77:0 : shell",
             "42 fd00:77::3435:3032:3000:0 w3:[fd00:77::b]:15221:1 : shell"]  # a namespace host's, port 45020
    conns = parse_workers(lines)
    assert [c.ip for c in conns] == ["-", "-", "-", "10.0.0.5", "-"]
    assert (conns[4].worker_ip, conns[4].pid) == ("fd00:77::b", 15221)
    assert (conns[1].name, conns[1].worker_ip, conns[1].pid, conns[1].thread) == ("w1", "::1", 4881, 1)
    assert conns[1].functions == ["shell", "eg.reverse"]
    assert (conns[3].worker_ip, conns[3].pid) == ("10.0.0.5", 77)
    assert peer_ip("fe80::1%2") == "fe80::1%2"  # a real zone on a link-local address stays
    assert peer_ip("2001:db8::1") == "2001:db8::1" and peer_ip("::1") == "::1"


# -- config and `geartask check` ----------------------------------------------------------

@pytest.mark.parametrize("entry, ok", [
    ('"[::1]:4731"', True), ('"2001:db8::1"', True), ('"tls://[2001:db8::1]:4731"', True),
    ('"2001:db8:::1"', False), ('"[gear]:1"', False), ('"h:1:2"', False),
])
def test_check_accepts_what_the_runtime_uses_and_rejects_the_rest(tmp_path, entry, ok):
    path = tmp_path / "config.yaml"
    path.write_text(f"servers:\n  - {entry}\n")
    if ok:
        load_config(path)
    else:
        with pytest.raises(ConfigError) as exc:
            load_config(path)
        assert str(exc.value).startswith(f"{path}: servers[0]: ")
    proc = subprocess.run([sys.executable, "-m", "geartask", "--config", str(path), "check"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert "Traceback" not in proc.stderr
    if not ok:
        assert proc.returncode == 2, proc.stderr
        assert f"{path}: servers[0]: " in proc.stderr
    else:
        assert "servers[0]" not in proc.stderr


def test_bare_ipv6_server_is_its_whole_host(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text('servers:\n  - "2001:db8::1"\n  - "[::1]:4731"\n  - "10.0.0.5:4732"\n')
    cfg = load_config(path)
    assert [tuple(a) for a in cfg.server_addresses] == [("2001:db8::1", 4730), ("::1", 4731), ("10.0.0.5", 4732)]
    assert [str(a) for a in cfg.server_addresses] == ["[2001:db8::1]:4730", "[::1]:4731", "10.0.0.5:4732"]

    proc = subprocess.run([sys.executable, "-m", "geartask", "--config", str(path), "check"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert "servers: 2001:db8::1 (read as [2001:db8::1]:4730), [::1]:4731, 10.0.0.5:4732" in proc.stdout, proc.stdout


@pytest.mark.parametrize("entry", ["[2001:db8::1]", "[::1]:4730"])
def test_an_unquoted_bracketed_address_in_yaml_says_to_quote_it(tmp_path, entry):
    """YAML reads '- [::1]' as a list and '- [::1]:4730' as a syntax error: the message says to quote."""
    path = tmp_path / "config.yaml"
    path.write_text(f"servers:\n  - {entry}\n")
    with pytest.raises(ConfigError, match=r'quote a bracketed IPv6 address in YAML, as "\[2001:db8::1\]:4730"'):
        load_config(path)
