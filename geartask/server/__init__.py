"""A local gearmand: start, check and stop it from the config's ``server`` section.

Development and tests use the same code. The server binds to loopback unless told
otherwise (gearmand has no authentication) and keeps background jobs in a sqlite
queue, so they survive a crash and a restart. We only ever signal the pid we started,
recorded in the pid file, and only after checking it is still a gearmand.
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

from ..address import format_address
from ..errors import LocalServerError, ServerError
from ..gearman import Connection

if TYPE_CHECKING:
    from ..config import Config


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        conn = Connection(host, port, connect_timeout=timeout).connect()
    except ServerError:
        return False
    try:
        conn.echo(timeout)
        return True
    except ServerError:
        return False
    finally:
        conn.close()


def runs_program(pid: int, name: str) -> bool:
    """Process ``pid`` runs a program whose file name contains ``name`` (a pid file may be stale
    and its pid reused by anything)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and name in Path(cmdline[0].decode(errors="replace")).name


def started_pid(process: subprocess.Popen | None, pid_file: Path, name: str) -> int | None:
    """The pid of the daemon we started (``process``) or that ``pid_file`` names, if it still runs ``name``."""
    if process is not None and process.poll() is None:
        return process.pid
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) and runs_program(pid, name) else None


def wait_gone(process: subprocess.Popen | None, pid: int, timeout: float) -> bool:
    """Until ``pid`` has ended (reaped, when it is our child ``process``); False at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.pid == pid:
            if process.poll() is not None:
                return True
        elif not pid_alive(pid):
            return True
        time.sleep(0.02)
    return False


def log_tail(path: Path) -> str:
    """The last line of a daemon's log (for a start that failed), or ""."""
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours is dead for every purpose here.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def libpq_conninfo(url: str) -> tuple[str, str | None]:
    """(the URL without its password, the password or None): gearmand gets the password from
    the environment, so it never shows in its command line."""
    from urllib.parse import unquote, urlsplit, urlunsplit
    parts = urlsplit(url)
    if parts.password is None:
        return url, None
    host = parts.netloc.rpartition("@")[2]
    user = parts.netloc.rpartition("@")[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}")), unquote(parts.password)


@dataclass
class LocalServer:
    host: str
    port: int
    run_dir: Path  # pid file and gearmand log live here
    queue_type: str = "sqlite"
    queue_path: Path | None = None
    gearmand: str = "gearmand"
    threads: int = 4
    # gearmand's TCP keepalive (idle, interval, count): a silent peer's connection is dropped,
    # and its running jobs requeued, after idle + interval x count seconds. None: gearmand's
    # default, keepalive off (the kernel would take about 2 h 11 min).
    keepalive: tuple[int, int, int] | None = (30, 10, 3)
    process: subprocess.Popen | None = None
    # gearmand's log is rotated past this size (log.max_bytes), log_backups old files kept:
    # at start, and whenever start or status finds it running (see rotate_log).
    max_log_bytes: int = 10 * 1024 * 1024
    log_backups: int = 5
    queue_url: str = ""  # queue_type postgresql: libpq URL (its password goes by PGPASSWORD, not argv)
    queue_table: str = "gearmand_queue"

    @classmethod
    def from_config(cls, config: Config) -> "LocalServer":
        s = config.server
        if getattr(s, "tls", False):  # stunnel in front, gearmand behind it (geartask/server/stunnel.py)
            from .stunnel import TlsFrontedServer
            return TlsFrontedServer.from_config(config)  # type: ignore[return-value]
        return cls(host=s.host, port=s.port, run_dir=Path(config.log.dir), queue_type=s.queue.type,
                   queue_path=Path(s.queue.path), gearmand=s.gearmand, threads=s.threads,
                   keepalive=(s.keepalive.idle, s.keepalive.interval, s.keepalive.count),
                   max_log_bytes=config.log.max_bytes, log_backups=config.log.backups,
                   queue_url=s.queue.url, queue_table=s.queue.table)

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    @property
    def pid_file(self) -> Path:
        return Path(self.run_dir) / f"gearmand-{self.port}.pid"

    @property
    def log_file(self) -> Path:
        return Path(self.run_dir) / f"gearmand-{self.port}.log"

    def command(self) -> list[str]:
        exe = shutil.which(self.gearmand) or (self.gearmand if Path(self.gearmand).exists() else None)
        if exe is None:
            raise LocalServerError(f"{self.gearmand!r} not found: install it with "
                                   "'apt-get install -y gearman-job-server' (Debian) or set server.gearmand")
        cmd = [exe, "--listen", self.host, "--port", str(self.port), "--threads", str(self.threads),
               "--pid-file", str(self.pid_file), "--log-file", str(self.log_file), "--verbose", "INFO"]
        if self.keepalive is not None:
            idle, interval, count = self.keepalive
            cmd += ["--keepalive", "--keepalive-idle", str(idle), "--keepalive-interval", str(interval),
                    "--keepalive-count", str(count)]
        if self.queue_type == "sqlite":
            assert self.queue_path is not None
            cmd += ["--queue-type", "libsqlite3", "--libsqlite3-db", str(self.queue_path)]
        elif self.queue_type == "postgresql":  # docs/gearmand.md: a standby server on the same table
            cmd += ["--queue-type", "Postgres", "--libpq-conninfo", libpq_conninfo(self.queue_url)[0],
                    "--libpq-table", self.queue_table]
        return cmd

    def pid(self) -> int | None:
        """The pid of the gearmand we started here, if it is still running."""
        return started_pid(self.process, self.pid_file, "gearmand")

    def running(self) -> bool:
        return self.pid() is not None and port_open(self.host, self.port)

    def start(self, timeout: float = 10.0) -> int:
        """Start gearmand (detached, in its own session) and wait until it answers. Returns its pid."""
        pid = self.pid()
        if pid is not None and port_open(self.host, self.port):
            self.rotate_log()
            return pid
        if port_open(self.host, self.port):
            raise LocalServerError(f"something else already serves {self.address}")
        Path(self.run_dir).mkdir(parents=True, exist_ok=True)
        self.rotate_log()
        if self.queue_path is not None:
            Path(self.queue_path).parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        env = None
        password = libpq_conninfo(self.queue_url)[1] if self.queue_type == "postgresql" else None
        if password is not None:
            env = {**os.environ, "PGPASSWORD": password}  # argv is public (ps)
        with open(self.log_file, "ab") as out:
            self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                            start_new_session=True, env=env)
        self.pid_file.write_text(f"{self.process.pid}\n")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LocalServerError(f"gearmand exited at start with status {self.process.returncode}; "
                                       f"see {self.log_file}: {self._log_tail()}")
            if port_open(self.host, self.port, 0.2):
                return self.process.pid
            time.sleep(0.05)
        self.kill()
        raise LocalServerError(f"gearmand did not answer on {self.address} within {timeout:g}s; see {self.log_file}")

    def rotate_log(self) -> bool:
        """Rotate gearmand's log once it is past ``max_log_bytes``: .log -> .log.1 -> .log.2 ...,
        ``log_backups`` kept (0: emptied in place). gearmand has no rotation of its own, but
        reopens its --log-file on SIGHUP, so a running one (ours, by its pid) gets one. Returns
        whether it rotated. Lines gearmand writes between the rename and the SIGHUP land in .1."""
        try:
            if self.max_log_bytes <= 0 or self.log_file.stat().st_size <= self.max_log_bytes:
                return False
            if self.log_backups <= 0:
                os.truncate(self.log_file, 0)  # gearmand appends (O_APPEND): it goes on at the start
                return True
            for i in range(self.log_backups - 1, 0, -1):
                older = self.log_file.with_name(f"{self.log_file.name}.{i}")
                if older.exists():
                    older.replace(self.log_file.with_name(f"{self.log_file.name}.{i + 1}"))
            self.log_file.replace(self.log_file.with_name(f"{self.log_file.name}.1"))
        except OSError:
            return False  # a log that can't be rotated never stops the server
        pid = self.pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGHUP)
            except OSError:
                pass
        return True

    def _log_tail(self) -> str:
        return log_tail(self.log_file)

    def _signal_and_wait(self, sig: int, timeout: float) -> bool:
        pid = self.pid()
        if pid is None:
            return True
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        return wait_gone(self.process, pid, timeout)

    def stop(self, timeout: float = 10.0) -> bool:
        """SIGTERM, then SIGKILL after ``timeout``. Returns False when nothing was running."""
        if self.pid() is None:
            return False
        if not self._signal_and_wait(signal.SIGTERM, timeout):
            self._signal_and_wait(signal.SIGKILL, 5.0)
        self.pid_file.unlink(missing_ok=True)
        return True

    def kill(self) -> None:
        """kill -9, as a crash would: the sqlite queue is all that remains."""
        self._signal_and_wait(signal.SIGKILL, 5.0)
        self.pid_file.unlink(missing_ok=True)

    def status(self) -> dict:
        pid = self.pid()
        if pid is not None:
            self.rotate_log()
        return {"address": self.address, "pid": pid, "running": pid is not None and port_open(self.host, self.port),
                "queue": self.queue_type, "queue_path": str(self.queue_path) if self.queue_type == "sqlite" else None,
                "log": str(self.log_file)}
