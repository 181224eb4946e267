"""TLS refusals as every role reports them: real stunnel in front of real gearmand, real
worker, collector, scheduler, dashboard and command-line processes. Each says one line naming
the server and the reason (unknown CA, name mismatch, no client certificate, expired); a
long-running role says it at error level once per outage, never "server unreachable", and the
line that ends the outage counts the tries it hid. A worker whose certificate every server
refuses does not start (exit 2); one that refuses a server's certificate keeps running and
attaches by itself once the server's certificate is renewed (docs/security.md)."""

from __future__ import annotations

import datetime
import ipaddress
import json
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from geartask import gearman as gp
from geartask.errors import ServerError
from geartask.gearman.backoff import REFUSED_EVENT, OutageLog
from geartask.server import free_port
from geartask.server.stunnel import Stunnel
from geartask.trust import certs

from helpers import PYTHON, wait_until, write_config
from workers import RUNWORKERS, WorkerProc, worker_connections

pytestmark = pytest.mark.skipif(shutil.which("stunnel") is None and shutil.which("stunnel4") is None,
                                reason="needs stunnel (Debian's stunnel4; scripts/install.sh installs it)")

GEARTASK = str(Path(sys.executable).parent / "geartask")
UNKNOWN_CA_OURS = "TLS: unknown CA (the server does not trust our certificate)"
EXPIRED_OURS = "TLS: certificate expired (the server says ours is)"
EXPIRED_THEIRS = "TLS: certificate expired (the server's)"
MISMATCH = "TLS: name mismatch (the server's certificate is not for 127.0.0.1)"
NO_CERT = "TLS: no client certificate"


# -- pure: the outage log and the refusal test, with a fake clock ----------------------------------

def test_an_outage_is_said_once_and_a_refusal_once_more_at_most():
    o = OutageLog()
    assert o.recovered(0.0) is None  # no outage: nothing to say
    assert [o.failed(False, t) for t in (1.0, 2.0, 3.0)] == ["down", None, None]
    assert o.failed(True, 4.0) == "refused"  # it came back refusing us: said, though the outage was
    assert [o.failed(True, t) for t in (5.0, 6.0)] == [None, None]
    assert o.recovered(10.0) == (6, 9.0)
    assert o.recovered(11.0) is None
    assert [o.failed(True, t) for t in (12.0, 13.0)] == ["refused", None]  # a new outage: said again
    assert o.recovered(20.0) == (2, 8.0)


class Recorder:
    """Takes the place of a module's logger: (level, event, fields) of each line."""

    def __init__(self):
        self.lines = []

    def __getattr__(self, level):
        return lambda event, **fields: self.lines.append((level, event, fields))


def test_the_workers_outage_says_a_refusal_once_at_error_level(monkeypatch):
    from geartask.worker import grab as worker_grab
    rec = Recorder()
    monkeypatch.setattr(worker_grab, "log", rec)
    outage = worker_grab.Outage()
    outage.failed("s:1", 1, "s:1: cannot connect: Connection refused")  # down first: an outage
    for thread in (1, 2, 3):
        for _ in range(3):
            outage.failed("s:1", thread, f"s:1: {UNKNOWN_CA_OURS}", refusal=True)  # then it refuses us
    assert [(level, event) for level, event, _ in rec.lines] == [
        ("warning", "server unreachable; retrying with backoff"), ("error", REFUSED_EVENT)]
    assert rec.lines[1][2] == {"server": "s:1", "reason": UNKNOWN_CA_OURS}
    for thread in (1, 2, 3):
        outage.recovered("s:1", thread)
    assert rec.lines[-1][1] == "server reachable again" and rec.lines[-1][2]["failures"] == 10
    outage.failed("s:1", 1, f"s:1: {UNKNOWN_CA_OURS}", refusal=True)  # a new outage: said again
    assert [level for level, _, _ in rec.lines[-1:]] == ["error"] and len(rec.lines) == 4


@pytest.mark.parametrize("text, refusal", [
    (f"127.0.0.1:1: {UNKNOWN_CA_OURS}", True),
    (f"no job server reachable; tried 127.0.0.1:1 ({EXPIRED_THEIRS})", True),
    (f"x: {MISMATCH}", True),
    (f"x: {NO_CERT} (the server requires one: set tls.cert and tls.key)", True),
    ("x: connection lost: TLS: connection closed during the TLS handshake (not a TLS server, or one that "
     "refused us)", False),
    ("x: cannot connect: Connection refused", False),
    ("x: cannot connect: TLS handshake: Connection reset by peer", False),
])
def test_a_refusal_is_told_from_an_outage_by_its_text(text, refusal):
    assert gp.is_refusal(text) is refusal


# -- a fleet: a CA, host certificates (some expired, one for another name), stunnel tunnels --------

def _expired(folder: Path, name: str, ips: tuple[str, ...] = ()) -> None:
    """NAME.pem/.key in ``folder``, signed by its CA, valid from ten days ago until yesterday."""
    ca_cert, ca_key = certs.load_ca(folder)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    sans = [x509.IPAddress(ipaddress.ip_address(i)) for i in ips] or [x509.DNSName(name)]
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=10)).not_valid_after(now - datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    (folder / f"{name}.key").chmod(0o600)


class Fleet:
    def __init__(self, base: Path, backend: str):
        self.base, self.backend = base, backend
        self.pki, self.other = base / "pki", base / "other"
        certs.make_ca(self.pki)
        certs.make_ca(self.other, name="someone else's CA")
        certs.issue(self.pki, "server", ips=["127.0.0.1"])
        certs.issue(self.pki, "client")
        certs.issue(self.pki, "elsewhere", dns=["elsewhere.example"])  # a server certificate for another name
        certs.issue(self.other, "stranger")
        _expired(self.pki, "oldserver", ("127.0.0.1",))
        _expired(self.pki, "oldclient")
        self.tunnels: list[Stunnel] = []

    def tunnel(self, cert: str, port: int | None = None) -> Stunnel:
        """stunnel on 127.0.0.1 presenting the fleet's ``cert``, requiring a client certificate
        of the fleet's CA, in front of the shared gearmand."""
        port = port or free_port()
        t = Stunnel("127.0.0.1", port, int(self.backend.rsplit(":", 1)[1]), self.pki / "ca.pem",
                    self.pki / f"{cert}.pem", self.pki / f"{cert}.key", self.base / f"run-{port}-{len(self.tunnels)}")
        t.start()
        self.tunnels.append(t)
        return t

    def config(self, folder: str, tunnel: Stunnel | list[Stunnel], cert: str = "client", ca_dir: Path | None = None,
               extra: str = "", connect_timeout: float = 1) -> Path:
        tunnels = tunnel if isinstance(tunnel, list) else [tunnel]
        d = ca_dir or self.pki
        return write_config(self.base / folder / "config.yaml", [f"tls://127.0.0.1:{t.port}" for t in tunnels],
                            f"tls:\n  ca: {self.pki / 'ca.pem'}\n  cert: {d / (cert + '.pem')}\n"
                            f"  key: {d / (cert + '.key')}\nsender:\n  connect_timeout: {connect_timeout}\n{extra}")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, gearmand):
    f = Fleet(tmp_path_factory.mktemp("refusals"), gearmand.address)
    f.good, f.good2 = f.tunnel("server"), f.tunnel("server")
    f.old, f.elsewhere = f.tunnel("oldserver"), f.tunnel("elsewhere")
    yield f
    for t in f.tunnels:
        t.stop()


def _refusal(tunnel: Stunnel, ctx: ssl.SSLContext) -> gp.TLSError:
    conn = gp.Connection("127.0.0.1", tunnel.port, tls=ctx, connect_timeout=10)
    with pytest.raises(ServerError) as e:
        conn.connect().echo(10)  # TLS 1.3 refuses a client's certificate at the first read
    conn.close()
    assert isinstance(e.value, gp.TLSError), e.value
    return e.value


def _ctx(fleet: Fleet, cert: str | None, folder: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(fleet.pki / "ca.pem")
    if cert:
        d = folder or fleet.pki
        ctx.load_cert_chain(d / f"{cert}.pem", d / f"{cert}.key")
    return ctx


def test_each_refusal_says_whose_certificate_was_refused(fleet):
    """The four reasons, and whether it is our certificate the server refused (only a new one
    here cures that) or we the server's."""
    cases = {  # what -> (tunnel, context, words, ours)
        "no client certificate": (fleet.good, _ctx(fleet, None), NO_CERT, True),
        "another CA's certificate": (fleet.good, _ctx(fleet, "stranger", fleet.other), UNKNOWN_CA_OURS, True),
        "our certificate expired": (fleet.good, _ctx(fleet, "oldclient"), EXPIRED_OURS, True),
        "the server's expired": (fleet.old, _ctx(fleet, "client"), EXPIRED_THEIRS, False),
        "the server's for another name": (fleet.elsewhere, _ctx(fleet, "client"), MISMATCH, False),
    }
    for what, (tunnel, ctx, words, ours) in cases.items():
        e = _refusal(tunnel, ctx)
        assert str(e).startswith(f"127.0.0.1:{tunnel.port}: {words}") and "\n" not in str(e), (what, str(e))
        assert e.ours is ours and gp.is_refusal(str(e)), what


# -- command-line roles: one line naming the server and the reason ----------------------------------

@pytest.mark.parametrize("cert, words", [("stranger", UNKNOWN_CA_OURS), ("oldclient", EXPIRED_OURS),
                                         ("old-tunnel", EXPIRED_THEIRS), ("elsewhere-tunnel", MISMATCH)])
def test_command_line_roles_say_the_reason_in_one_line(fleet, cert, words):
    if cert.endswith("-tunnel"):
        tunnel = getattr(fleet, cert.removesuffix("-tunnel"))
        cfg = fleet.config(f"cli-{cert}", tunnel)
    else:
        cfg = fleet.config(f"cli-{cert}", fleet.good, cert, fleet.other if cert == "stranger" else None)
        tunnel = fleet.good
    for args in (["manage", "status"], ["manage", "workers"], ["manage", "maxqueue", "t.x", "1"],
                 ["send", "job", "shell", '{"argv": ["true"]}'], ["send", "result", "nosuchjob"],
                 ["manage", "failed", "list"]):
        r = subprocess.run([GEARTASK, "--config", str(cfg), *args], capture_output=True,
                           text=True, timeout=60, cwd=cfg.parent)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
        assert r.returncode == 1 and len(errors) == 1, (args, r.returncode, r.stderr)
        assert f"127.0.0.1:{tunnel.port}" in errors[0] and words in errors[0], (args, errors)
        assert "Traceback" not in r.stderr and "is `geartask manage outcomes serve` running" not in r.stderr, args


def test_a_sender_every_server_refuses_fails_at_once(fleet):
    """Certificates do not change while it waits: no sender.connect_timeout for a server to come up."""
    cfg = fleet.config("sender-at-once", [fleet.good, fleet.good2], "stranger", fleet.other, connect_timeout=60)
    t0 = time.monotonic()
    r = subprocess.run([GEARTASK, "--config", str(cfg), "send", "job", "shell", '{"argv": ["true"]}'],
                       capture_output=True, text=True, timeout=90, cwd=cfg.parent)
    assert r.returncode == 1 and UNKNOWN_CA_OURS in r.stderr, r.stderr
    assert time.monotonic() - t0 < 20


# -- the worker -----------------------------------------------------------------------------------

@pytest.mark.parametrize("cert, words", [("stranger", UNKNOWN_CA_OURS), ("oldclient", EXPIRED_OURS)])
def test_a_worker_whose_certificate_every_server_refuses_does_not_start(fleet, cert, words):
    """Its certificate is loaded once, at start: retrying cannot help, and exit 2 is what the
    systemd unit does not restart in a loop (RestartPreventExitStatus=2)."""
    cfg = fleet.config(f"w-{cert}", [fleet.good, fleet.good2], cert, fleet.other if cert == "stranger" else None)
    t0 = time.monotonic()
    r = subprocess.run([PYTHON, str(RUNWORKERS), "--config", str(cfg), "--name", "refused", "--threads", "2"],
                       capture_output=True, text=True, timeout=60, cwd=cfg.parent)
    took = time.monotonic() - t0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith(f"error: {cfg}: tls.cert: every server refuses this host's "
                                                   "certificate: "), lines
    for tunnel in (fleet.good, fleet.good2):
        assert f"127.0.0.1:{tunnel.port}: {words}" in lines[0]
    assert took < 20, took
    assert not [line for line in worker_connections(fleet.backend) if " refused:" in line]


def test_a_worker_refused_by_one_server_and_refusing_another_starts(fleet):
    """Not every server refuses its certificate (the other one's certificate is what is
    refused): the worker starts, and says each refusal once, at error level."""
    cfg = fleet.config("w-mixed", [fleet.good, fleet.old], "stranger", fleet.other)
    worker = WorkerProc(cfg, "mixed", 2)
    try:
        refused = wait_until(lambda: len(r := [line for line in worker.log_lines()
                                               if line.get("event") == REFUSED_EVENT]) >= 2 and r, 30,
                             message="both refusals said")
        assert {(line["server"], line["reason"]) for line in refused} == {
            (f"127.0.0.1:{fleet.good.port}", UNKNOWN_CA_OURS), (f"127.0.0.1:{fleet.old.port}", EXPIRED_THEIRS)}
        assert worker.proc.poll() is None, worker.text()[-2000:]
    finally:
        worker.stop()
    assert len([line for line in worker.log_lines() if line.get("event") == REFUSED_EVENT]) == 2


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]


def test_refusing_a_servers_certificate_is_said_once_and_the_renewal_is_picked_up(fleet, tmp_path):
    """A worker and a collector reach one server whose certificate expired (and one that is
    fine, for the worker): each starts, says the refusal once at error level (never "server
    unreachable"), keeps serving the good server, and attaches by itself when the expired
    server's certificate is renewed, counting the tries it hid."""
    port = free_port()
    old = fleet.tunnel("oldserver", port)
    wcfg = fleet.config("renewal-worker", [fleet.good, old], extra="worker:\n  poll_timeout: 1\n")
    ccfg = fleet.config("renewal-collector", old,
                        extra=f"outcomes:\n  store: sqlite\n  path: {tmp_path / 'outcomes.sqlite'}\n")
    worker = WorkerProc(wcfg, "renewal", 2)
    collector = subprocess.Popen([GEARTASK, "--config", str(ccfg), "manage", "outcomes", "serve"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ccfg.parent)
    server = f"127.0.0.1:{port}"
    wlog = lambda: worker.log_lines()  # noqa: E731
    clog = lambda: _lines(ccfg.parent / "logs" / "collector.log")  # noqa: E731
    try:
        wait_until(lambda: any(line.get("event") == REFUSED_EVENT for line in wlog()), 30,
                   message="the worker said the refusal")
        wait_until(lambda: len([line for line in clog() if line.get("event") == REFUSED_EVENT]) == 2, 30,
                   message="the collector said the refusal (outcomes and queries)")
        # The worker serves the good server meanwhile: every thread and its control connection.
        wait_until(lambda: len([line for line in worker_connections(fleet.backend) if " renewal:" in line]) >= 3,
                   30, message="the worker attached through the good server")
        # Tries go on with backoff, each refused, none said: wait for several more than were said.
        wait_until(lambda: old.log_file.read_text().count("accepted connection") >= 8, 30,
                   message="more tries at the refusing server")
        old.stop()
        fleet.tunnels.remove(old)
        fleet.tunnel("server", port)  # the server's certificate renewed, same address
        back = wait_until(lambda: [line for line in wlog() if line.get("event") == "server reachable again"
                                   and line.get("server") == server], 30, message="the worker came back by itself")
        assert back[0]["failures"] >= 2, back
        attached = wait_until(lambda: [line for line in clog() if line.get("event") == "attached"
                                       and line.get("failures")], 30, message="the collector came back by itself")
        assert attached[0]["server"] == server
    finally:
        worker.stop()
        if collector.poll() is None:
            collector.terminate()
            collector.wait(15)
    for lines, who in ((wlog(), "worker"), (clog(), "collector")):
        about = [line for line in lines if line.get("server") == server and line.get("level") in ("warning", "error")]
        refused = [line for line in about if line.get("event") == REFUSED_EVENT]
        assert refused and all(line["level"] == "error" for line in refused), (who, about)
        assert all(EXPIRED_THEIRS in str(line.get("reason") or line.get("error")) for line in refused), (who, refused)
        assert not [line for line in about if "unreachable" in line["event"]], (who, about)
    wrefused = [line for line in wlog() if line.get("event") == REFUSED_EVENT]
    assert len(wrefused) == 1, wrefused  # once per outage, not once per thread and try
    assert len([line for line in clog() if line.get("event") == REFUSED_EVENT]) == 2  # one per function


# -- the scheduler and the dashboard ------------------------------------------------------------------

@pytest.mark.parametrize("cert, words", [("stranger", UNKNOWN_CA_OURS), ("oldclient", EXPIRED_OURS)])
def test_the_scheduler_says_the_reason_for_jobs_and_outcomes(fleet, cert, words):
    cfg = fleet.config(f"sched-{cert}", fleet.good, cert, fleet.other if cert == "stranger" else None,
                       extra='schedules:\n  - {"name": "tick", "every": 5, "task": "shell", '
                             '"data": {"argv": ["true"]}}\n')
    r = subprocess.run([GEARTASK, "--config", str(cfg), "send", "schedule", "--once"],
                       capture_output=True, text=True, timeout=60, cwd=cfg.parent)
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    shown = [line for line in r.stdout.splitlines() if "NOT sent" in line]
    assert shown and all(f"127.0.0.1:{fleet.good.port}" in line and words in line for line in shown), r.stdout
    logged = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    refused = [line for line in logged if line["event"] == REFUSED_EVENT]
    assert refused and all(line["level"] == "error" and words in line["error"] for line in refused), logged
    assert len({line["what"] for line in refused}) == len(refused)  # once each: job servers, outcomes


@pytest.mark.parametrize("cert, words", [("stranger", UNKNOWN_CA_OURS), ("oldclient", EXPIRED_OURS)])
def test_the_dashboard_shows_the_reason(fleet, dashboards, cert, words):
    cfg = fleet.config(f"dash-{cert}", fleet.good, cert, fleet.other if cert == "stranger" else None)
    d = dashboards(cfg)
    server = f"127.0.0.1:{fleet.good.port}"
    def front() -> str | None:
        text = d.get("/").text
        return text if words in text else None
    page = wait_until(front, 20, message="the front page names the refusal")
    assert server in page
    logged = wait_until(lambda: [json.loads(line) for line in d.text().splitlines()
                                 if line.startswith("{") and REFUSED_EVENT in line], 20,
                        message="the dashboard's collector logged the refusal")
    assert all(line["level"] == "error" and line["server"] == server and words in line["error"] for line in logged)
    # With the collector elsewhere, the Failed page asks it through the outcome client.
    remote = dashboards(cfg, "--no-collector")
    failed = remote.get("/failed").text
    assert f"TLS refused by every server: {server}: {words}" in failed, failed[-3000:]
