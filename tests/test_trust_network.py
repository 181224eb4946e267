"""Trust end to end across the test network (issue 19, "Must show"): real stunnel in front of
real gearmand (`manage server start` with server.tls), real workers with require_signed, a real
collector and the real sender, each on its own host (network namespaces on a bridge,
tests/netlab.py). What the receiving side refuses without TLS is in test_trust_worker.py; here
it is all over TLS, from other hosts, through the sender's own signing.

Needs root and stunnel (skipped without them, a failure in CI for root).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from geartask import gearman as gp
from geartask.address import format_address, split_address
from geartask.config import load_config
from geartask.errors import ServerError
from geartask.outcomes.client import OutcomeClient
from geartask.outcomes.errors import RogueAnswerError
from geartask.outcomes.record import OUTCOME_FUNCTION, QUERY_FUNCTION, make_record, outcome_jobs
from geartask.trust import certs, signing
from geartask.trust.keys import new_key
from geartask.trust.tls import client_context, install

import netlab as nl
from helpers import wait_until
from netlab import NetLab, marker_runs

pytestmark = pytest.mark.skipif(shutil.which("stunnel") is None and shutil.which("stunnel4") is None,
                                reason="needs stunnel (Debian's stunnel4; scripts/install.sh installs it)")

PORT, BACKEND = 4730, 4731
# Issue 23 Must 7: the same tests on an IPv6 network: stunnel on [fd00:77::a]:4730, servers
# named tls://[v6]:4730, the server certificate's IP SAN an IPv6 address.
BOTH = pytest.mark.parametrize("netlab", ["ipv4", "ipv6"], indirect=True)
MAY = {"fleet": ["*", "control", "report", "answer"], "ops": ["reports.*"]}


@dataclass
class Fleet:
    lab: NetLab
    base: Path
    srv: nl.Host
    address: str  # stunnel: tls://address in every config
    configs: dict  # name -> config path
    worker: nl.NetWorker | None = None

    def config(self, name: str, *, cert: str = "host", ca: str = "pki", key: str | None = "fleet",
               servers: list[str] | None = None, extra: str = "") -> Path:
        """A config on the fleet's network: tls:// servers, a certificate (``cert`` from the
        ``ca`` folder; None: none) and a signing key (``key``; None: none)."""
        lines = ["tls:", f"  ca: {self.base / 'pki' / 'ca.pem'}"]
        if cert:
            lines += [f"  cert: {self.base / ca / (cert + '.pem')}", f"  key: {self.base / ca / (cert + '.key')}"]
        lines += ["security:", "  require_signed: true", "  max_job_age: 3600"]
        if key:
            lines.append(f"  key: {self.base / 'keys' / (key + '.key')}")
        lines.append("  trust:")
        for name_, may in MAY.items():
            lines += [f"    - name: {name_}", f"      public_key: \"{self.public[name_]}\"",
                      f"      may: {json.dumps(may)}"]
        path = self.lab.config(name, servers or [f"tls://{self.address}"], "\n".join(lines) + "\n" + extra)
        self.configs[name] = path
        return path

    public: dict = None  # type: ignore[assignment]


def build_fleet(lab: NetLab, base: Path, *, extra_server_ips: tuple[str, ...] = (),
                server_extra: str = "") -> Fleet:
    """A CA (pki) with a server certificate for srv and one client certificate for every fleet
    host, another CA (other) with its own client certificate, keys fleet/ops/rogue; srv runs
    `manage server start` (stunnel + gearmand) and the collector."""
    srv = lab.add_host("srv")
    certs.make_ca(base / "pki")
    certs.issue(base / "pki", "server", ips=[srv.ip, *extra_server_ips])
    certs.issue(base / "pki", "host")
    certs.make_ca(base / "other", name="someone else's CA")
    certs.issue(base / "other", "host")
    public = {}
    for name in ("fleet", "ops", "rogue"):
        (base / "keys").mkdir(exist_ok=True)
        public[name] = new_key(base / "keys" / f"{name}.key")[1]
    fleet = Fleet(lab, base, srv, format_address(srv.ip, PORT), {})  # [fd00:77::a]:4730 on IPv6
    fleet.public = public
    server_extra = (f"server:\n  host: {json.dumps(srv.ip)}\n  port: {PORT}\n  backend_port: {BACKEND}\n  tls: true\n"
                    f"  queue: {{path: {base / 'queue.sqlite'}}}\n{server_extra}")
    cfg = fleet.config("server", extra=server_extra)
    # the server's config presents the server certificate to clients (stunnel)
    text = cfg.read_text().replace(str(base / "pki" / "host.pem"), str(base / "pki" / "server.pem"))
    cfg.write_text(text.replace(str(base / "pki" / "host.key"), str(base / "pki" / "server.key")))
    r = lab.manage(srv, cfg, "server", "start")
    assert r.returncode == 0, r.stderr
    lab.run(srv, nl.MANAGER, fleet.config("collector", cert="host"), "outcomes", "serve", label="collector")
    install(load_config(fleet.config("observer")))  # this process (the observer) reaches srv over TLS too
    wait_until(lambda: "geartask.outcomes.query" in " ".join(observe_status(fleet)), 30,
               message="the collector attached over TLS")
    return fleet


def observe_status(fleet: Fleet) -> list[str]:
    host, port = split_address(fleet.address)
    try:
        return fleet.lab.observe(gp.admin_command, host, int(port), "status", 5)
    except ServerError:
        return []


def start_worker(fleet: Fleet, name: str = "wk", threads: int = 4) -> nl.NetWorker:
    host = fleet.lab.add_host(name)
    cfg = fleet.config(name, extra="worker:\n  poll_timeout: 1\n  shell:\n    allow: [touch]\n")
    fleet.worker = fleet.lab.worker(host, cfg, name, threads).wait_attached([fleet.address], timeout=30)
    return fleet.worker


def one_line_error(r: subprocess.CompletedProcess) -> str:
    err = r.stderr
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "no error said"
    return lines[-1]


def outcome(fleet: Fleet, unique: str, timeout: float = 20) -> dict:
    client = OutcomeClient(load_config(fleet.configs["observer"]), timeout=10)
    found: list = []
    wait_until(lambda: found.append(fleet.lab.observe(lambda: client.latest(unique=unique))) or found[-1],
               timeout, interval=0.3, message=f"the outcome of {unique}")
    return found[-1]


def raw_submit(fleet: Fleet, ctx: ssl.SSLContext | None, task: str, unique: str, payload: bytes,
               background: bool = True) -> gp.Packet:
    """One job with exactly these bytes, over TLS with ``ctx``, from the observer."""
    host, port = split_address(fleet.address)

    def go() -> gp.Packet:
        conn = gp.Connection(host, int(port), tls=ctx)
        try:
            conn.connect()
            return conn.request(gp.submit_command("normal", background), gp.JOB_CREATED, 10, task=task,
                                unique=unique, data=payload)
        finally:
            conn.close()
    return fleet.lab.observe(go)


# -- a host without a fleet certificate ---------------------------------------------------------

@BOTH
def test_hosts_without_a_fleet_certificate_get_nothing(netlab: NetLab, tmp_path):
    """No certificate, or one from another CA: no submit, no grab, no admin command, and each
    says why in one line; plain TCP to the TLS port gets nothing either."""
    fleet = build_fleet(netlab, tmp_path)
    host, port = split_address(fleet.address)
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.load_verify_locations(str(tmp_path / "pki" / "ca.pem"))

    def refused(fn):
        try:
            fn()
        except ServerError as e:
            return str(e)
        return None

    # Our own connection layer, without a client certificate: submit, grab, admin commands.
    for what, fn in {
        "submit": lambda: raw_submit(fleet, no_cert, "t.record", "nocert", b"{}"),
        "grab": lambda: netlab.observe(lambda: gp.Connection(host, int(port), tls=no_cert).connect().request(
            gp.GRAB_JOB_UNIQ, {gp.NO_JOB, gp.JOB_ASSIGN_UNIQ}, 10)),
        **{cmd: (lambda c=cmd: netlab.observe(lambda: gp.admin_command(host, int(port), c, 5, tls=no_cert)))
           for cmd in ("status", "workers", "maxqueue t.record 5")},
    }.items():
        why = refused(fn)
        assert why is not None and "no client certificate" in why and fleet.address in why, (what, why)

    # The real roles on a host whose certificate another CA signed (it trusts the fleet's CA).
    rogue = netlab.add_host("rogue")
    other = fleet.config("other", cert="host", ca="other")
    for args in (("status",), ("workers",), ("maxqueue", "t.record", "5")):
        r = netlab.manage(rogue, other, *args)
        line = one_line_error(r) if r.returncode else ""
        assert r.returncode != 0 and "unknown CA" in line, (args, r.returncode, line)
        print(f"[trust] manage {args[0]} with another CA's certificate: {line}")
    r = netlab.run(rogue, nl.SENDER, other, "job", "t.record", "{}", label="sender")
    assert r.wait(60) != 0
    assert "unknown CA" in r.stderr + r.stdout
    # A worker with that certificate does not start: every server refuses it, and only a new
    # certificate (and a restart) cures that (docs/security.md); it never grabs.
    w = netlab.worker(rogue, other, "rw", 2)
    assert w.proc.wait(60) == 2, w.text()[-2000:]
    said = [line for line in w.text().splitlines() if line.strip()]
    assert len(said) == 1 and "every server refuses this host's certificate" in said[0], said
    assert f"{fleet.address}: TLS: unknown CA" in said[0], said
    raw_submit(fleet, client_context(load_config(fleet.configs["observer"])), "t.record", "waits",
               json.dumps({"file": str(tmp_path / "never"), "sleep": 0, "id": 0}).encode())
    status = {line.split("\t")[0]: line.split("\t")[1:] for line in observe_status(fleet) if "\t" in line}
    assert status["t.record"][:3] == ["1", "0", "0"], status  # queued, nobody running or able to
    assert not (tmp_path / "never").exists()

    # Plain TCP to the TLS port: not one byte of the Gearman protocol.
    def plain() -> bytes:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(b"status\n")
            s.settimeout(5)
            try:
                return s.recv(100)
            except OSError:
                return b""
    assert b"\0RES" not in netlab.observe(plain) and b"t.record" not in netlab.observe(plain)


# -- a capture on the bridge ------------------------------------------------------------------------

def capture(ns: str, stop: threading.Event, out: bytearray) -> None:
    """Every frame on every port of the bridge (AF_PACKET, all interfaces of its namespace: br0
    itself sees only what is flooded) until ``stop``; the bytes into ``out``."""
    def body() -> None:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
        s.settimeout(0.2)
        try:
            while not stop.is_set() and len(out) < 200_000_000:
                try:
                    out.extend(s.recv(65536))
                except socket.timeout:
                    continue
        finally:
            s.close()
    nl.run_in_netns(ns, body)


@BOTH
def test_a_capture_on_the_bridge_sees_no_payload_in_clear(netlab: NetLab, tmp_path):
    fleet = build_fleet(netlab, tmp_path)
    start_worker(fleet)
    snd = netlab.add_host("snd")
    stop, frames = threading.Event(), bytearray()
    t = threading.Thread(target=capture, args=(netlab.bridge_ns, stop, frames), daemon=True)
    t.start()
    marker = tmp_path / "PAYLOAD-MARKER-7f3a"
    sender = netlab.send_jobs(snd, fleet.config("sender"), marker, 300, "cap")
    assert sender.wait(120) == 0, sender.stderr[-2000:]
    stop.set()
    t.join(10)
    assert sum(marker_runs(marker).values()) == 300
    assert len(frames) > 100_000, len(frames)  # the batch crossed the bridge and was seen
    for clear in (b"PAYLOAD-MARKER-7f3a", b"t.record", b"cap-17", b"\0REQ", b"\0RES"):
        assert clear not in frames, clear
    assert b"\x17\x03\x03" in frames  # TLS application data records


# -- a certified host without a trusted key ---------------------------------------------------------

@BOTH
def test_a_certified_host_without_a_trusted_key_runs_nothing(netlab: NetLab, tmp_path):
    """It reaches the server (its certificate is the fleet's) but its key is nobody's: its shell
    job never runs and the refusal is an outcome; it can't stop the worker, can't forge an
    outcome, and an answer it gives to outcome queries is reported, never believed."""
    fleet = build_fleet(netlab, tmp_path)
    worker = start_worker(fleet)
    rogue = netlab.add_host("rogue")
    cfg = fleet.config("rogue", key="rogue")

    marker = tmp_path / "rogue-ran"
    r = netlab.run(rogue, nl.SENDER, cfg, "shell", "--json", "--", "touch", str(marker), label="sender")
    assert r.wait(60) != 0
    answer = r.json_lines()[0]
    assert answer["state"] == "failed" and "unknown signer" in json.dumps(answer), answer
    rec = outcome(fleet, answer["unique"])
    assert rec["state"] == "failed" and rec["reason"]["error"] == "unknown signer" and rec["attempts"] == 0, rec
    assert not marker.exists()

    # shutdown: the worker hears it, refuses it (unsigned by a trusted key) and keeps serving
    r = netlab.manage(rogue, cfg, "shutdown", "--name", "wk", "--now", "--wait", "3")
    wait_until(lambda: any(line.get("event") == "control job refused" for line in worker.log_lines()), 20,
               message="the worker refused the control command")
    assert worker.proc.poll() is None

    # a forged outcome: a report signed by the rogue key is counted, never stored
    forged = make_record(task="t.record", state="failed", handle="H:x:1", server=fleet.address,
                         unique="forged-1", finished_at=time.time(), reason="forged")
    rogue_key = signing_key_at(tmp_path / "keys" / "rogue.key")
    ctx = client_context(load_config(cfg))
    for unique, payload in outcome_jobs([forged]):
        raw_submit(fleet, ctx, OUTCOME_FUNCTION, unique, signing.sign_message("report", payload, rogue_key))
    time.sleep(1.0)
    client = OutcomeClient(load_config(fleet.configs["observer"]), timeout=10)
    assert netlab.observe(lambda: client.latest(unique="forged-1")) is None

    # a rogue answerer: a process of the rogue host serving the query function answers first
    forged_answer = signing.sign_message("answer", json.dumps({"ok": True, "result": None}).encode(), rogue_key)
    stop = threading.Event()
    rogue_thread = threading.Thread(target=lambda: rogue.call(rogue_answerer, fleet.address, ctx, forged_answer,
                                                              stop), daemon=True)
    # the real collector is stopped for this part so the rogue one surely answers
    for pid in collector_pids(fleet):
        os.kill(pid, 15)
    wait_until(lambda: "geartask.outcomes.query\t0\t0\t0" in "\n".join(observe_status(fleet)) or
               all(QUERY_FUNCTION not in line for line in observe_status(fleet)), 20, message="collector gone")
    rogue_thread.start()
    wait_until(lambda: any(line.startswith(QUERY_FUNCTION + "\t") and line.split("\t")[3] != "0"
                           for line in observe_status(fleet)), 20, message="the rogue answerer attached")
    with pytest.raises(RogueAnswerError, match="rogue answerer"):
        netlab.observe(lambda: client.latest(unique=answer["unique"]))
    r = netlab.run(netlab.add_host("op"), nl.SENDER, fleet.configs["observer"], "result", answer["unique"],
                   label="sender")
    assert r.wait(60) != 0
    err = r.stderr
    assert "rogue answerer" in err and "Traceback" not in err, err
    stop.set()
    rogue_thread.join(15)


def signing_key_at(path: Path):
    from geartask.trust.keys import load_private
    return load_private(path)


def collector_pids(fleet: Fleet) -> list[int]:
    out = []
    for pid in nl._netns_pids(fleet.srv.ns):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"outcomes" in argv and b"serve" in argv:
            out.append(pid)
    return out


def rogue_answerer(address: str, ctx: ssl.SSLContext, answer: bytes, stop: threading.Event) -> None:
    """A worker of the query function that answers every query with ``answer``."""
    host, port = split_address(address)
    conn = gp.Connection(host, int(port), tls=ctx).connect()
    try:
        conn.send(gp.CAN_DO, task=QUERY_FUNCTION)
        while not stop.is_set():
            conn.send(gp.GRAB_JOB_UNIQ)
            pkt = conn.expect({gp.NO_JOB, gp.JOB_ASSIGN_UNIQ}, 10)
            if pkt.cmd == gp.NO_JOB:
                conn.send(gp.PRE_SLEEP)
                conn.recv(0.5)
                continue
            conn.send(gp.WORK_COMPLETE, job_handle=pkt["job_handle"], data=answer)
    finally:
        conn.close()


# -- signers and their limits, through the real sender -----------------------------------------------

@BOTH
def test_signers_limits_age_and_tampering_over_tls(netlab: NetLab, tmp_path):
    """A signer allowed reports.* only can't run shell through the real sender; a job signed
    longer ago than max_job_age and a tampered one are refused; a fleet-signed one runs and its
    outcome names the signer."""
    fleet = build_fleet(netlab, tmp_path)
    start_worker(fleet)
    snd = netlab.add_host("snd")
    ops = fleet.config("ops", key="ops")
    marker = tmp_path / "ops-ran"
    r = netlab.run(snd, nl.SENDER, ops, "shell", "--background", "--json", "--", "touch", str(marker),
                   label="sender")
    assert r.wait(60) == 0, r.stderr
    unique = r.json_lines()[0]["unique"]
    rec = outcome(fleet, unique)
    assert rec["reason"]["error"] == "signer ops may not run shell" and rec["attempts"] == 0, rec

    fleet_key = signing_key_at(tmp_path / "keys" / "fleet.key")
    ctx = client_context(load_config(fleet.configs["observer"]))
    touch = lambda name: json.dumps({"cmd": ["touch", str(tmp_path / name)]}).encode()  # noqa: E731
    raw_submit(fleet, ctx, "shell", "old", signing.sign_job("shell", "old", touch("old"), fleet_key,
                                                               t=time.time() - 7200))
    raw_submit(fleet, ctx, "shell", "tampered", signing.sign_job("shell", "tampered", touch("ta"), fleet_key)
               .replace(b'"ta', b'"tb').replace(str(tmp_path / "ta").encode(), str(tmp_path / "tb").encode()))
    assert outcome(fleet, "old")["reason"]["error"] == "too old"
    assert outcome(fleet, "tampered")["reason"]["error"] == "bad signature"

    good = tmp_path / "fleet-ran"
    r = netlab.run(snd, nl.SENDER, fleet.config("sender"), "shell", "--background", "--json", "--", "touch",
                   str(good), label="sender")
    assert r.wait(60) == 0, r.stderr
    unique = r.json_lines()[0]["unique"]
    rec = outcome(fleet, unique)
    assert rec["state"] == "complete" and rec["signer"] == "fleet", rec
    r = netlab.run(snd, nl.SENDER, fleet.configs["sender"], "result", unique, "--json", label="sender")
    assert r.wait(60) == 0 and r.json_lines()[0]["signer"] == "fleet"
    # send status resolves finished background jobs from the collector's signed answers too
    r = netlab.run(snd, nl.SENDER, fleet.configs["sender"], "status", "--json", label="sender")
    assert r.wait(60) == 0, r.stderr
    states = {line.get("unique"): line.get("state") for line in r.json_lines()}
    assert states.get(unique) == "complete", (states, r.stderr)
    for name in ("ops-ran", "old", "ta", "tb"):
        assert not (tmp_path / name).exists(), name
    assert good.exists()


# -- a worker host cut off behind stunnel -------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_silent_worker_host_behind_stunnel_gives_its_jobs_back(netlab: NetLab, tmp_path):
    """With server.tls gearmand's peer is stunnel's loopback connection, which never goes
    silent. A worker host holding 4 jobs is cut off (no RST, no FIN): stunnel's keepalive
    (server.keepalive idle 4, interval 2, count 3: 10 s) drops it and closes its side to
    gearmand, which requeues the jobs; a second worker host runs all 4 and the sender (no
    --timeout) finishes. Before, stunnel held the connection for TIMEOUTidle, 12 hours."""
    fleet = build_fleet(netlab, tmp_path, server_extra="  keepalive: {idle: 4, interval: 2, count: 3}\n")
    first = start_worker(fleet, "w1")
    snd = netlab.add_host("snd")
    marker = tmp_path / "silent.marker"
    sender = netlab.send_jobs(snd, fleet.config("sender"), marker, 4, "held", sleep=8)

    def running() -> int:
        rows = [line for line in observe_status(fleet) if line.startswith("t.record\t")]
        return int(rows[0].split("\t")[2]) if rows else 0

    wait_until(lambda: running() == 4, 60, message="w1 to hold all 4 jobs")
    time.sleep(1)  # w1 acknowledges the last JOB_ASSIGN: keepalive covers idle connections only
    netlab.cut(netlab.hosts["w1"])
    cut_at = time.monotonic()
    second = netlab.worker(netlab.add_host("w2"), fleet.config("w2", extra="worker:\n  poll_timeout: 1\n"),
                           "w2", 4).wait_attached([fleet.address], timeout=30)
    try:
        assert sender.wait(10 + 8 + 40) == 0, sender.stderr[-2000:]
        done_after = time.monotonic() - cut_at
    finally:
        netlab.restore(netlab.hosts["w1"])
    text = marker.read_text()
    runs = [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]
    on_second = {r["unique"] for r in runs if r["pid"] == second.pid}
    assert on_second == {f"held-{i}" for i in range(4)}, (runs, done_after)
    assert first.proc.poll() is None  # w1 itself never stopped: only its link went quiet


# -- the slicing proxy in front of the TLS port ---------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(900)
@BOTH
def test_two_thousand_jobs_through_a_slicing_proxy_in_front_of_tls(netlab: NetLab, tmp_path):
    """Worker and sender reach stunnel only through a proxy that slices the server's direction
    into 1-48-byte pieces (TLS records arrive in slices, handshakes too): 2,000 jobs complete,
    none runs twice. The client's direction is not sliced: stunnel 5.68 drops a connection
    whose client records arrive sliced (docs/testing-network.md)."""
    px = netlab.add_host("px")  # added first: its address goes into the server's certificate
    fleet = build_fleet(netlab, tmp_path, extra_server_ips=(px.ip,))
    proxy = netlab.proxy(px, fleet.address, PORT, sliced_down=True)
    wk = netlab.add_host("wk")
    cfg = fleet.config("wk", servers=[f"tls://{proxy}"], extra="worker:\n  poll_timeout: 1\n")
    worker = netlab.worker(wk, cfg, "wk", 8).wait_attached([fleet.address], timeout=60)
    snd = netlab.add_host("snd")
    marker = tmp_path / "sliced.marker"
    sender = netlab.send_jobs(snd, fleet.config("sender", servers=[f"tls://{proxy}"]), marker, 2000, "sl")
    assert sender.wait(600) == 0, sender.stderr[-2000:]
    runs = marker_runs(marker)
    print(f"[netlab] TLS through the slicing proxy: {netlab.stop_proxy(proxy)}")
    assert len(runs) == 2000 and max(runs.values()) == 1, (len(runs), runs.most_common(3))
    assert worker.proc.poll() is None


# -- geartask init --secure: the quick start, end to end ---------------------------------------------

def test_init_secure_then_the_quick_start_works(tmp_path):
    """`geartask init --secure DIR`, then the quick start's commands from DIR: the server
    starts behind stunnel, a worker attaches over TLS, the sender's signed jobs run, and the
    collector's signed answer says who signed them. (Loopback only: one host.)"""
    from geartask.server import free_port
    geartask = str(Path(sys.executable).parent / "geartask")
    folder = tmp_path / "fleet"
    r = subprocess.run([geartask, "init", "--secure", str(folder)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "geartask manage server start" in r.stdout
    port = free_port()
    cfg = folder / "config.yaml"
    # one pass: a chained replace would rewrite the "4731" inside a free port such as 47317
    ports = {"4730": str(port), "4731": str(free_port())}
    cfg.write_text(re.sub(r"\b473[01]\b", lambda m: ports[m.group()], cfg.read_text()))

    def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([geartask, *args], capture_output=True, text=True, timeout=timeout, cwd=folder)

    check = run("check")
    assert check.returncode == 0, check.stdout + check.stderr
    r = run("manage", "server", "start")
    assert r.returncode == 0, r.stderr
    procs = []
    try:
        for args in (("worker", "--name", "w1"), ("manage", "outcomes", "serve")):
            procs.append(subprocess.Popen([geartask, *args], cwd=folder, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL))
        wait_until(lambda: "example.hello" in run("manage", "status").stdout and
                   "geartask.outcomes.query" in run("manage", "status").stdout, 30,
                   interval=0.5, message="the worker and the collector attached")
        r = run("send", "plugin", "example", "--background", "--json")
        assert r.returncode == 0, r.stderr
        unique = json.loads(r.stdout.splitlines()[0])["unique"]
        r = run("send", "result", unique, "--wait", "20", "--json")
        assert r.returncode == 0, r.stderr
        answer = json.loads(r.stdout)
        assert answer["state"] == "complete" and answer["signer"], answer
        # the plain port of gearmand is on loopback behind stunnel; the config's port is TLS only
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"status\n")
            s.settimeout(5)
            try:
                got = s.recv(100)
            except OSError:
                got = b""
        assert b"example.hello" not in got
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, 15)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, 9)
                p.wait(10)
        run("manage", "server", "stop")
