"""A test network on one machine: hosts are Linux network namespaces joined by a bridge.

Loopback hides what real networks do (split streams, half-open connections, silent peers,
several addresses per host). ``NetLab`` builds hosts that behave like separate machines:

- the bridge ``br0`` lives in a namespace of its own (the *observer*, 10.77.0.1), so nothing
  touches the machine's own network; each host is a namespace with a veth pair, ``eth0``
  inside, ``b-NAME`` on the bridge, addresses in 10.77.0.0/24 and no default route;
- every name carries a per-run prefix with the test process's pid (``gtn<pid>-<n>-``);
  ``cleanup_stale()`` runs first and removes what earlier runs left behind, but only runs whose
  process is gone: other test runs (and the other pytest-xdist workers of this run, each a
  process of its own) may be using the machine at the same time;
- processes run on a host with ``ip netns exec``; every one is recorded and stopped by its pid
  at teardown, then the namespaces are deleted (which deletes their veths too);
- faults: ``cut``/``restore`` a host's link on the bridge side (silent: no RST, no FIN),
  ``blackhole``/``unblackhole`` one path from one host, and delay or slicing with the TCP
  proxy of tests/netproxy.py run on a host (this kernel has no netem qdisc).

The test process itself talks to the hosts from the observer namespace: ``observe(fn)``
runs ``fn`` in a thread that has entered that namespace (setns applies per thread), and the
sockets it makes stay there.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import fcntl
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest

from geartask.address import format_address, split_address
from geartask.gearman import admin_command, forget_tls
from geartask.server import LocalServer, pid_alive, port_open

from helpers import REPO, wait_until, write_config
from workers import WorkerProc, worker_connections

PREFIX = "gtn"
SUBNET = "10.77.0"  # a private /24; .1 is the observer (the bridge's namespace)
SUBNET6 = "fd00:77::"  # an IPv6 lab (NetLab(ipv6=True)): a ULA /64, ::1 the observer, hosts from ::a
NOWHERE, NOWHERE_MAC = f"{SUBNET}.254", "02:00:00:00:00:fe"  # a neighbour no host is: see partition()
NOWHERE6 = f"{SUBNET6}fe"  # the same in an IPv6 lab (a static neighbour entry instead of ARP)
TESTPLUGINS = Path(__file__).resolve().parent / "testplugins"
NETPROXY = Path(__file__).resolve().parent / "netproxy.py"
SENDER = REPO / "send_job_client" / "send_job_client.py"
MANAGER = REPO / "manage_client" / "manage_client.py"
# gearmand's TCP keepalive for these tests: a silent peer is dropped after idle + interval * count.
KEEPALIVE = (30, 10, 3)

_OWNER = re.compile(rf"^{PREFIX}(\d+)-")
_HOST_NAME = re.compile(r"^[a-z][a-z0-9]{0,12}$")  # b-NAME must fit IFNAMSIZ (15 characters)
_labs = itertools.count()
# cleanup_stale() of several test processes at once (xdist workers, other runs) take turns
_CLEANUP_LOCK = Path("/run/gtn-netns-cleanup.lock")
_cleanup_holds = 0
_cleanup_fd: int | None = None
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _one(address: str) -> str:
    """A route to this one address: /32, or /128 for IPv6."""
    return f"{address}/128" if ":" in address else f"{address}/32"


class NetLabError(RuntimeError):
    """The test network could not be built or changed."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise NetLabError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


def namespaces() -> list[str]:
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_pids(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _netns_pids(ns: str) -> list[int]:
    return [int(p) for p in ip("netns", "pids", ns, check=False).stdout.split() if p.isdigit()]


def stop_process(*procs: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM each process (ours, by pid), then SIGKILL those still there after ``grace`` seconds."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in live:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)


@contextlib.contextmanager
def cleanup_held() -> Iterator[None]:
    """Hold the machine-wide lock cleanup_stale() takes: no other test process removes leftovers
    meanwhile (a test that plants a leftover and cleans it up itself needs that). Reentrant."""
    global _cleanup_holds, _cleanup_fd
    if _cleanup_holds == 0:
        fd = os.open(_CLEANUP_LOCK, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        _cleanup_fd = fd
    _cleanup_holds += 1
    try:
        yield
    finally:
        _cleanup_holds -= 1
        if _cleanup_holds == 0 and _cleanup_fd is not None:
            os.close(_cleanup_fd)  # releases the lock
            _cleanup_fd = None


def cleanup_stale() -> list[str]:
    """Delete the namespaces (and end the processes in them) of earlier runs whose test process
    is gone. Namespaces of a live process are never touched, whoever owns them."""
    removed = []
    with cleanup_held():
        for ns in namespaces():
            m = _OWNER.match(ns)
            if not m or pid_alive(int(m.group(1))):
                continue
            _kill_pids(_netns_pids(ns))  # only what an earlier run of these tests started there
            if ip("netns", "del", ns, check=False).returncode == 0:
                removed.append(ns)
    return removed


_reason: list[str | None] = []


def unavailable_reason() -> str | None:
    """Why namespaces can't be made here (None when they can); checked once per process."""
    if not _reason:
        _reason.append(_probe())
    return _reason[0]


def _probe() -> str | None:
    if os.geteuid() != 0:
        return "the test network needs root (it creates network namespaces)"
    try:
        probe = f"{PREFIX}{os.getpid()}-probe"
        ip("netns", "add", probe)
        ip("netns", "del", probe)
    except FileNotFoundError:
        return "the test network needs the 'ip' command (apt-get install iproute2; scripts/install.sh does)"
    except NetLabError as e:
        return f"cannot create a network namespace: {e}"
    return None


def run_in_netns(ns: str, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in a new thread that has entered namespace ``ns``; returns or raises what fn did."""
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise NetLabError(f"setns {ns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            out["value"] = fn(*args)
        except BaseException as e:  # handed to the caller's thread
            out["error"] = e

    t = threading.Thread(target=body, name=f"netns-{ns}", daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out.get("value")


@dataclass
class Host:
    """One machine of the test network."""
    lab: "NetLab"
    name: str
    ns: str
    addresses: list[str] = field(default_factory=list)

    @property
    def ip(self) -> str:
        if not self.addresses:
            raise NetLabError(f"host {self.name} has no address yet")
        return self.addresses[0]

    @property
    def prefix(self) -> list[str]:
        """Put before a command to run it on this host."""
        return ["ip", "netns", "exec", self.ns]

    @property
    def bridge_port(self) -> str:
        return f"b-{self.name}"

    def add_address(self, address: str | None = None) -> str:
        address = address or self.lab.next_address()
        if ":" in address:  # nodad: usable at once, not 'tentative' for a second of duplicate detection
            ip("-n", self.ns, "addr", "add", f"{address}/64", "dev", "eth0", "nodad")
        else:
            ip("-n", self.ns, "addr", "add", f"{address}/24", "dev", "eth0")
        self.addresses.append(address)
        return address

    def prefer_source(self, target: str, source: str) -> None:
        """Reach ``target`` from ``source`` (one of this host's addresses) instead of the first."""
        ip("-n", self.ns, "route", "add", _one(target), "dev", "eth0", "src", source)

    def tcp_timers(self, peer: str) -> list[str]:
        """The kernel's timer of each TCP connection of this host with ``peer`` (``ss -o``):
        keepalive (idle, probing) or on (retransmitting unacknowledged data)."""
        out = subprocess.run([*self.prefix, "ss", "-tnoH", "state", "established", "dst", peer],
                             capture_output=True, text=True, timeout=30).stdout
        return [line.split("timer:", 1)[1].split()[0] if "timer:" in line else "-" for line in out.splitlines()]

    def popen(self, cmd: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start ``cmd`` on this host; the lab stops it by pid at teardown."""
        return self.lab.track(subprocess.Popen([*self.prefix, *cmd], **kw))

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return run_in_netns(self.ns, fn, *args)


class NetWorker(WorkerProc):
    """A runworkers.py process on a host; attachment is checked from the observer."""

    def __init__(self, lab: "NetLab", host: Host, config: Path, name: str, threads: int, *extra: str):
        self.lab, self.host = lab, host
        super().__init__(config, name, threads, *extra, prefix=host.prefix)
        lab.track(self.proc)

    def connections(self, address: str) -> list[str]:
        return self.lab.observe(worker_connections, address)


@dataclass
class NetProc:
    """A process started on a host with its stdout and stderr in files."""
    proc: subprocess.Popen
    stdout_path: Path
    stderr_path: Path
    started: float

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def json_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.startswith("{")]


class NetLab:
    """The hosts, bridge and processes of one test; ``close()`` removes all of it."""

    def __init__(self, tmp: Path, ipv6: bool = False):
        self.tmp = Path(tmp)
        self.ipv6 = ipv6  # hosts get addresses in SUBNET6 instead of SUBNET
        self.tag = f"{PREFIX}{os.getpid()}-{next(_labs)}"
        self.bridge_ns = f"{self.tag}-br"
        self.hosts: dict[str, Host] = {}
        self._procs: list[subprocess.Popen] = []
        self._next_host_octet = 10
        self._made: list[str] = []
        self._proxies: dict[str, tuple[subprocess.Popen, Path]] = {}

    # -- building -------------------------------------------------------------------------
    def start(self) -> "NetLab":
        cleanup_stale()
        self._add_ns(self.bridge_ns)
        ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        ip("-n", self.bridge_ns, "addr", "add", f"{SUBNET}.1/24", "dev", "br0")
        if self.ipv6:
            ip("-n", self.bridge_ns, "addr", "add", f"{SUBNET6}1/64", "dev", "br0", "nodad")
        ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        return self

    def _add_ns(self, ns: str) -> None:
        ip("netns", "add", ns)
        self._made.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")

    def next_address(self) -> str:
        if self._next_host_octet >= 254:
            raise NetLabError(f"no address left in {SUBNET}.0/24")
        self._next_host_octet += 1
        if self.ipv6:
            return f"{SUBNET6}{self._next_host_octet - 1:x}"
        return f"{SUBNET}.{self._next_host_octet - 1}"

    def add_host(self, name: str, addresses: int = 1) -> Host:
        """A host on the bridge with ``addresses`` addresses (0: none yet, see Host.add_address)."""
        if not _HOST_NAME.match(name):
            raise NetLabError(f"host name {name!r}: 1-13 lower-case letters and digits, starting with a letter")
        if name in self.hosts or name == "br":
            raise NetLabError(f"host name {name!r} is taken")
        host = Host(self, name, f"{self.tag}-{name}")
        self._add_ns(host.ns)
        ip("-n", self.bridge_ns, "link", "add", host.bridge_port, "type", "veth", "peer", "name", "eth0",
           "netns", host.ns)
        ip("-n", self.bridge_ns, "link", "set", host.bridge_port, "master", "br0", "up")
        ip("-n", host.ns, "link", "set", "eth0", "up")
        for _ in range(addresses):
            host.add_address()
        self.hosts[name] = host
        return host

    def observe(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) run from the observer (10.77.0.1, on the bridge): how the test sees the hosts."""
        return run_in_netns(self.bridge_ns, fn, *args)

    # -- faults ---------------------------------------------------------------------------
    def cut(self, host: Host) -> None:
        """Silently cut the host off, as a dead cable beyond its switch port would: its port leaves
        the bridge, packets vanish both ways, nobody gets a RST. (Setting the port down would
        also drop the carrier of the host's eth0, and the host would see its connects fail.)"""
        ip("-n", self.bridge_ns, "link", "set", host.bridge_port, "nomaster")

    def restore(self, host: Host) -> None:
        ip("-n", self.bridge_ns, "link", "set", host.bridge_port, "master", "br0")

    def partition(self, a: Host, b: Host) -> None:
        """Cut the path between two hosts only, silently both ways: each sends the other's packets
        to a neighbour that does not exist (a static ARP entry for NOWHERE), so the frames die on
        the bridge, no host gets an error, and both stay reachable from everyone else."""
        nowhere = NOWHERE6 if self.ipv6 else NOWHERE
        for src, dst in ((a, b), (b, a)):
            ip("-n", src.ns, "neigh", "replace", nowhere, "lladdr", NOWHERE_MAC, "dev", "eth0", "nud", "permanent")
            for address in dst.addresses:
                ip("-n", src.ns, "route", "add", _one(address), "via", nowhere, "dev", "eth0")

    def heal(self, a: Host, b: Host) -> None:
        for src, dst in ((a, b), (b, a)):
            for address in dst.addresses:
                ip("-n", src.ns, "route", "del", _one(address), "via", NOWHERE6 if self.ipv6 else NOWHERE, "dev", "eth0")

    def blackhole(self, host: Host, target: str) -> None:
        """A blackhole route on ``host`` to ``target``: packets of existing connections vanish, but
        a new connect fails at once with EINVAL on ``host`` (not silent there: see partition)."""
        ip("-n", host.ns, "route", "add", "blackhole", _one(target))

    def unblackhole(self, host: Host, target: str) -> None:
        ip("-n", host.ns, "route", "del", "blackhole", _one(target))

    # -- processes ------------------------------------------------------------------------
    def track(self, proc: subprocess.Popen) -> subprocess.Popen:
        self._procs.append(proc)
        return proc

    def folder(self, name: str) -> Path:
        path = self.tmp / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def gearmand(self, host: Host, port: int = 4730, keepalive: tuple[int, int, int] | None = KEEPALIVE,
                 address: str | None = None) -> LocalServer:
        """gearmand on ``host`` bound to its address, with a private sqlite queue. ``keepalive``
        is (idle, interval, count) seconds: a silent peer is dropped after idle + interval * count."""
        address = address or host.ip
        run_dir = self.folder(f"gearmand-{host.name}-{port}")
        server = LocalServer(host=address, port=port, run_dir=run_dir, queue_type="sqlite",
                             queue_path=run_dir / "queue.sqlite", keepalive=keepalive)
        cmd = server.command()
        with open(server.log_file, "ab") as out:
            server.process = host.popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                        start_new_session=True)
        server.pid_file.write_text(f"{server.process.pid}\n")
        wait_until(lambda: server.process.poll() is not None or self.observe(port_open, address, port, 0.5),
                   15, message=f"gearmand on {server.address}")
        if server.process.poll() is not None:
            raise NetLabError(f"gearmand on {server.address} exited with {server.process.returncode}; "
                              f"see {server.log_file}")
        return server

    def proxy(self, host: Host, target: str, port: int, *, sliced: bool = False, delay: float = 0.0,
              sliced_down: bool = False) -> str:
        """tests/netproxy.py on ``host``, listening on host.ip:port; returns its address.
        ``sliced_down``: slice only what the target sends (stunnel drops client records in slices)."""
        listen = format_address(host.ip, port)
        out = self.folder("proxies") / f"{host.name}-{port}.out"
        cmd = [sys.executable, str(NETPROXY), "--listen", listen, "--target", target, "--delay", str(delay)]
        if sliced:
            cmd.append("--slice")
        elif sliced_down:
            cmd.append("--slice-down")
        with open(out, "w") as f:
            proc = host.popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        wait_until(lambda: proc.poll() is not None or "listening on" in out.read_text(), 15,
                   message=f"proxy {listen} -> {target}")
        if proc.poll() is not None:
            raise NetLabError(f"proxy {listen} exited with {proc.returncode}: {out.read_text()[-500:]}")
        self._proxies[listen] = (proc, out)
        return listen

    def stop_proxy(self, address: str) -> str:
        """Stop the proxy at ``address``; its last line (connections, bytes and slices forwarded)."""
        proc, out = self._proxies.pop(address)
        stop_process(proc)
        return out.read_text().strip().splitlines()[-1]

    def config(self, name: str, servers: Sequence[str], extra: str = "") -> Path:
        """A config file in its own folder (so each role's logs stay apart), with the test plugins."""
        return write_config(self.folder(name) / "config.yaml", list(servers), extra, plugin_paths=[TESTPLUGINS])

    def worker(self, host: Host, config: Path, name: str, threads: int, *extra: str) -> NetWorker:
        return NetWorker(self, host, config, name, threads, *extra)

    def run(self, host: Host, script: Path, config: Path, *args: str, env: dict | None = None,
            label: str = "proc") -> NetProc:
        """A role script (sender, manager) on ``host``, in the background; output in files."""
        folder = config.parent
        n = len(list(folder.glob(f"{label}-*.out")))
        stdout, stderr = folder / f"{label}-{n}.out", folder / f"{label}-{n}.err"
        full_env = {**os.environ, **(env or {})}
        with open(stdout, "w") as out, open(stderr, "w") as err:
            proc = host.popen([sys.executable, str(script), "--config", str(config), *args], stdout=out,
                              stderr=err, stdin=subprocess.DEVNULL, env=full_env, cwd=folder)
        return NetProc(proc, stdout, stderr, time.monotonic())

    def sender(self, host: Host, config: Path, *args: str, env: dict | None = None) -> NetProc:
        return self.run(host, SENDER, config, *args, env=env, label="sender")

    def send_jobs(self, host: Host, config: Path, marker: Path, count: int, tag: str, *args: str,
                  sleep: float = 0.0, task: str = "t.record") -> NetProc:
        """The sender sends ``count`` t.record jobs (tests/testplugins/netjobs.py) with --json."""
        env = {"NETJOBS_COUNT": str(count), "NETJOBS_MARKER": str(marker), "NETJOBS_TAG": tag,
               "NETJOBS_SLEEP": str(sleep), "NETJOBS_TASK": task}
        return self.sender(host, config, "plugin", "netjobs", "--json", *args, env=env)

    def manage(self, host: Host, config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """manage_client.py on ``host``, run to its end."""
        proc = self.run(host, MANAGER, config, *args, label="manager")
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            raise AssertionError(f"manage_client {' '.join(args)} did not finish within {timeout}s") from None
        return subprocess.CompletedProcess(proc.proc.args, code, proc.stdout, proc.stderr)

    # -- teardown -------------------------------------------------------------------------
    def stop_all(self) -> None:
        """Stop every process we started, by pid: SIGTERM, then SIGKILL for those that linger."""
        stop_process(*self._procs)

    def close(self) -> None:
        self.stop_all()
        # Every lab's hosts have the same addresses: a TLS server this test registered in this
        # process (tls.install) must not make the next test's plain gearmand look closed.
        for host in self.hosts.values():
            for address in host.addresses:
                forget_tls(address)
        for ns in reversed(self._made):
            _kill_pids(_netns_pids(ns))  # children of our processes (e.g. shell commands), nothing else
            ip("netns", "del", ns, check=False)
        self._made.clear()


@contextlib.contextmanager
def open_lab(tmp: Path, ipv6: bool = False) -> Iterator[NetLab]:
    """The lab for one test: skipped where namespaces can't be made, failed instead in CI."""
    reason = unavailable_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the network tests: {reason}", pytrace=False)
        pytest.skip(reason)
    lab = NetLab(tmp, ipv6)
    try:
        yield lab.start()
    finally:
        lab.close()


# -- what a scenario records -------------------------------------------------------------

def admin_status(address: str) -> list[str]:
    """gearmand's text `status` lines (function, queued, running, workers), tab-separated."""
    host, port = split_address(address)
    return admin_command(host, port, "status", timeout=5)


def marker_runs(marker: Path) -> collections.Counter:
    """unique -> how many times a job ran (each run of t.record appends one line)."""
    if not marker.exists():
        return collections.Counter()
    text = marker.read_text()
    complete = text[:text.rfind("\n") + 1]
    return collections.Counter(json.loads(line)["unique"] for line in complete.splitlines() if line.strip())


@dataclass
class Outcome:
    """Per scenario: what the sender reported and what the marker file says really ran."""
    scenario: str
    jobs: int
    completed: int
    failed: int
    other: int  # states other than complete/failed (timeout, queued), per the sender
    never_ran: int
    ran_twice: int
    resubmitted: int  # jobs the sender submitted more than once (attempts > 1)
    seconds: float
    sender_exit: int | None
    note: str = ""

    def line(self) -> str:
        return (f"[netlab] {self.scenario}: {self.jobs} jobs, {self.completed} completed, {self.failed} failed, "
                f"{self.other} other, {self.never_ran} never ran, {self.ran_twice} ran twice, "
                f"{self.resubmitted} resubmitted, {self.seconds:.1f}s, sender exit {self.sender_exit}"
                + (f"; {self.note}" if self.note else ""))

    def report(self) -> "Outcome":
        print("\n" + self.line(), flush=True)
        path = os.environ.get("NETLAB_REPORT")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(self.__dict__) + "\n")
        return self


def outcome(scenario: str, sender: NetProc, marker: Path, uniques: Sequence[str], seconds: float,
            note: str = "", background: bool = False) -> Outcome:
    results = sender.json_lines()
    states = collections.Counter(r.get("state") for r in results)
    ok_state = "queued" if background else "complete"
    runs = marker_runs(marker)
    return Outcome(scenario, len(uniques), states.get(ok_state, 0), states.get("failed", 0),
                   sum(n for s, n in states.items() if s not in (ok_state, "failed")),
                   sum(1 for u in uniques if runs[u] == 0), sum(1 for u in uniques if runs[u] > 1),
                   sum(1 for r in results if (r.get("attempts") or 1) > 1), seconds, sender.proc.returncode,
                   note)
