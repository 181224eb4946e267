"""stunnel in front of the local gearmand: ``server.tls: true``.

gearmand has no working TLS and never asks a client who it is (docs/security.md), so a
terminator does both: stunnel listens on ``server.host:server.port``, speaks TLS 1.2 or newer,
demands a client certificate signed by ``tls.ca`` (``verifyChain``, ``requireCert``), and
forwards each accepted connection to gearmand on ``127.0.0.1:server.backend_port``. A client
without such a certificate never reaches gearmand, so it gets no byte of the Gearman protocol,
the admin protocol included. Its config is written into the run dir (``log.dir``) next to
gearmand's pid and log files; like gearmand, it is started detached and stopped by its pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..address import format_address, format_last_colon
from ..errors import ConfigError, LocalServerError
from . import LocalServer, log_tail, started_pid, wait_gone

if TYPE_CHECKING:
    from ..config import Config


def _listening(host: str, port: int, timeout: float = 0.2) -> bool:
    """A TCP listener is there (not server.port_open's Gearman echo: that would speak TLS to us)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _conf_value(value: str, what: str) -> str:
    if any(c in value for c in "\n\r\0"):
        raise LocalServerError(f"{what} {value!r} can't be written into stunnel's config (a line break)")
    return value


def _start_error(log_file: Path, offset: int) -> str:
    """Why stunnel did not start, in one line, from what this start wrote (the log from
    ``offset``): its first error ('[!] ...') with the notice just before it when there is one
    (a failed bind says why only there); else the log's last line (which is only a cleanup
    note such as 'Deallocating section')."""
    try:
        with open(log_file, "rb") as f:
            f.seek(offset)
            lines = f.read(1 << 20).decode(errors="replace").splitlines()
    except OSError:
        lines = []
    for i, line in enumerate(lines):
        if line.startswith("[!]"):
            before = lines[i - 1] if i and lines[i - 1].startswith("[.]") else ""
            return "; ".join(x[3:].strip() for x in (before, line) if x)
    return log_tail(log_file)


@dataclass
class Stunnel:
    host: str  # where clients connect
    port: int
    backend_port: int  # gearmand, on 127.0.0.1
    ca: Path
    cert: Path
    key: Path
    run_dir: Path
    program: str = "stunnel"
    process: subprocess.Popen | None = None
    # TCP keepalive (idle, interval, count) on the connections stunnel accepts: gearmand's own
    # (server.keepalive) only sees stunnel's loopback connection, which never goes silent.
    keepalive: tuple[int, int, int] | None = (30, 10, 3)

    @property
    def conf_file(self) -> Path:
        return Path(self.run_dir) / f"stunnel-{self.port}.conf"

    @property
    def pid_file(self) -> Path:
        return Path(self.run_dir) / f"stunnel-{self.port}.pid"

    @property
    def log_file(self) -> Path:
        return Path(self.run_dir) / f"stunnel-{self.port}.log"

    def config_text(self) -> str:
        return "\n".join([
            "; written by geartask manage server start (server.tls: true); rewritten at every start",
            "foreground = yes",
            "pid =",  # none of stunnel's own: geartask writes stunnel-PORT.pid, like gearmand's
            "syslog = no",
            "debug = notice",
            "",
            "[gearman]",
            # stunnel splits at the last ':' and resolves what is before it as written:
            # an IPv6 host goes in bare (::1:4730), never bracketed as in geartask's own names.
            f"accept = {_conf_value(format_last_colon(self.host, self.port), 'server.host')}",
            f"connect = {format_last_colon('127.0.0.1', self.backend_port)}",
            f"cert = {_conf_value(str(self.cert), 'tls.cert')}",
            f"key = {_conf_value(str(self.key), 'tls.key')}",
            f"CAfile = {_conf_value(str(self.ca), 'tls.ca')}",
            "verifyChain = yes",  # the client's certificate must chain to tls.ca
            "requireCert = yes",  # no certificate, no connection
            "sslVersionMin = TLSv1.2",
            # No Nagle delay either side: a job is one small packet each way, as on geartask's
            # own sockets (without it a job's answer can wait for the peer's delayed ACK).
            "socket = l:TCP_NODELAY=1",
            "socket = r:TCP_NODELAY=1",
            "TIMEOUTbusy = 600",  # a sleeping worker's connection is quiet for a long time
            "TIMEOUTidle = 43200",
            # A peer that vanished without a word (host cut off, powered off): stunnel drops it
            # after idle + interval x count s and closes its side to gearmand, which requeues
            # the jobs that peer held (docs/gearmand.md, "Silent peers and TCP keepalive").
            *self._keepalive_lines(),
            "",
        ])

    def _keepalive_lines(self) -> list[str]:
        if self.keepalive is None:
            return []
        idle, interval, count = self.keepalive
        return ["socket = l:SO_KEEPALIVE=1", f"socket = l:TCP_KEEPIDLE={int(idle)}",
                f"socket = l:TCP_KEEPINTVL={int(interval)}", f"socket = l:TCP_KEEPCNT={int(count)}"]

    def command(self) -> list[str]:
        for name in (self.program, "stunnel4") if self.program == "stunnel" else (self.program,):
            exe = shutil.which(name) or (name if Path(name).is_file() else None)
            if exe:
                return [exe, str(self.conf_file)]
        raise LocalServerError(f"{self.program!r} not found: install it with 'apt-get install -y stunnel4' "
                               "(Debian) or set server.stunnel")

    def pid(self) -> int | None:
        return started_pid(self.process, self.pid_file, "stunnel")

    def start(self, timeout: float = 10.0) -> int:
        pid = self.pid()
        if pid is not None and _listening(self.host, self.port):
            return pid
        if _listening(self.host, self.port):
            raise LocalServerError(f"something else already listens on {format_address(self.host, self.port)}")
        cmd = self.command()
        Path(self.run_dir).mkdir(parents=True, exist_ok=True)
        fd = os.open(self.conf_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(self.config_text())
        with open(self.log_file, "ab") as out:
            log_start = out.seek(0, os.SEEK_END)  # this start's lines only, for the error below
            self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                            start_new_session=True)
        self.pid_file.write_text(f"{self.process.pid}\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise LocalServerError(f"stunnel exited at start with status {self.process.returncode}; "
                                       f"see {self.log_file}: {_start_error(self.log_file, log_start)}")
            if _listening(self.host, self.port):
                return self.process.pid
            time.sleep(0.05)
        self.stop()
        raise LocalServerError(f"stunnel did not listen on {format_address(self.host, self.port)} within {timeout:g}s; "
                               f"see {self.log_file}")

    def stop(self, timeout: float = 10.0) -> bool:
        """SIGTERM (SIGKILL after ``timeout``) to the stunnel we started; False if none ran."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            if wait_gone(self.process, pid, wait):
                break
        self.pid_file.unlink(missing_ok=True)
        return True


class TlsFrontedServer:
    """gearmand on 127.0.0.1:backend_port with stunnel on host:port: what ``manage server``
    starts, stops and reports when ``server.tls`` is on. It offers LocalServer's methods."""

    def __init__(self, gearmand: LocalServer, stunnel: Stunnel):
        self.gearmand, self.stunnel = gearmand, stunnel
        self.host, self.port = stunnel.host, stunnel.port

    @classmethod
    def from_config(cls, config: Config) -> "TlsFrontedServer":
        s, where = config.server, (str(config.source) if config.source else None)
        backend = s.backend_port or s.port + 1
        if backend > 65535:
            raise ConfigError("server.port + 1 is not a port; set server.backend_port", where, "server.backend_port")
        for name in ("ca", "cert", "key"):
            if not getattr(config.tls, name):
                raise ConfigError("needed by server.tls: true (the terminator's certificate and the CA it "
                                  "checks clients against)", where, f"tls.{name}")
        keepalive = (s.keepalive.idle, s.keepalive.interval, s.keepalive.count)
        gearmand = LocalServer(host="127.0.0.1", port=backend, run_dir=Path(config.log.dir),
                               queue_type=s.queue.type, queue_path=Path(s.queue.path), gearmand=s.gearmand,
                               threads=s.threads, keepalive=keepalive)
        stunnel = Stunnel(s.host, s.port, backend, Path(config.tls.ca), Path(config.tls.cert), Path(config.tls.key),
                          Path(config.log.dir), program=s.stunnel, keepalive=keepalive)
        return cls(gearmand, stunnel)

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    @property
    def log_file(self) -> Path:
        return self.gearmand.log_file

    @property
    def pid_file(self) -> Path:
        return self.gearmand.pid_file

    def pid(self) -> int | None:
        return self.gearmand.pid()

    def running(self) -> bool:
        return self.gearmand.running() and self.stunnel.pid() is not None and _listening(self.host, self.port)

    def start(self, timeout: float = 10.0) -> int:
        """Start gearmand, then stunnel; returns gearmand's pid. If stunnel fails, the gearmand
        started here is stopped again: half a server is not left behind."""
        self.stunnel.command()  # a missing program is reported before anything starts
        was_running = self.gearmand.pid() is not None
        pid = self.gearmand.start(timeout)
        try:
            self.stunnel.start(timeout)
        except Exception:
            if not was_running:
                self.gearmand.stop()
            raise
        return pid

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop stunnel first (no new clients), then gearmand."""
        stopped = self.stunnel.stop(timeout)
        return self.gearmand.stop(timeout) or stopped

    def kill(self) -> None:
        self.stunnel.stop(0.5)
        self.gearmand.kill()

    def status(self) -> dict:
        st = self.gearmand.status()
        stunnel_pid = self.stunnel.pid()
        st.update(address=self.address, backend=self.gearmand.address, tls=True, stunnel_pid=stunnel_pid,
                  stunnel_log=str(self.stunnel.log_file),
                  running=bool(st["running"] and stunnel_pid is not None and _listening(self.host, self.port)))
        return st
