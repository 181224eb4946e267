"""geartask (tls+signed) with HAProxy as the TLS terminator instead of stunnel: a measurement
of the alternative docs/security.md gives (TCP mode, ``verify required ca-file``), not a
product path. Everything else is bench/sys_geartask_tls.py's. Opt-in: ``bench.py --only
geartask-haproxy`` (``geartask-haproxy-1t``: with ``nbthread 1``) (not part of the default run); skipped when haproxy is not installed
(``apt-get install -y haproxy``, scripts/install-bench.sh)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from .common import BenchError, Env, Skip
from .sys_geartask_tls import GeartaskTLS


def _haproxy() -> str | None:
    return shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if os.path.isfile(p)), None)


def _listening(port: int) -> bool:
    """A TCP listener is there (a Gearman echo would speak plaintext to a TLS port)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def haproxy_version() -> str:
    out = subprocess.run([_haproxy() or "haproxy", "-v"], capture_output=True, text=True, timeout=10).stdout
    return out.split("\n", 1)[0].split(" - ")[0].strip()


class HAProxy:
    """One haproxy process (foreground, no master) that the bench started and stops by its pid."""

    def __init__(self, port: int, backend_port: int, ca: Path, cert: Path, key: Path, run_dir: Path,
                 threads: int | None = None):
        self.port, self.run_dir = port, Path(run_dir)
        self.pem = self.run_dir / f"haproxy-{port}.pem"  # HAProxy's crt: certificate, then its key
        self.pem.write_bytes(Path(cert).read_bytes() + Path(key).read_bytes())
        os.chmod(self.pem, 0o600)
        self.conf = self.run_dir / f"haproxy-{port}.cfg"
        # docs/security.md's frontend and backend, on loopback, plus what a foreground run needs.
        nbthread = f"    nbthread {threads}\n" if threads else ""  # default: one per core
        self.conf.write_text(f"""global
    maxconn 4096
{nbthread}defaults
    mode tcp
    timeout connect 5s
    timeout client 12h
    timeout server 12h
frontend gearman_tls
    bind 127.0.0.1:{port} ssl crt {self.pem} ca-file {ca} verify required ssl-min-ver TLSv1.2
    default_backend gearmand
backend gearmand
    server local 127.0.0.1:{backend_port}
""")
        self.log = self.run_dir / f"haproxy-{port}.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen([_haproxy() or "haproxy", "-db", "-f", str(self.conf)],
                                            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BenchError(f"haproxy exited at start with status {self.process.returncode}; see {self.log}")
            if _listening(self.port):
                return
            time.sleep(0.05)
        self.stop()
        raise BenchError(f"haproxy did not listen on 127.0.0.1:{self.port} within {timeout:g}s; see {self.log}")

    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.poll() is None else None

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


class GeartaskHAProxy(GeartaskTLS):
    key = "geartask-haproxy"
    label = "geartask (tls+signed, haproxy)"
    note = "as geartask (tls+signed), with HAProxy (TCP mode, verify required) in place of stunnel"
    subdir = "haproxy"

    def __init__(self, threads: int | None = None):
        super().__init__()
        self.key, self.label, self.threads = GeartaskHAProxy.key, GeartaskHAProxy.label, threads
        if threads:  # HAProxy's nbthread (default: one thread per core)
            self.key, self.label = f"{self.key}-{threads}t", f"geartask (tls+signed, haproxy nbthread {threads})"
            self.subdir = f"haproxy-{threads}t"

    def check(self, env: Env) -> None:
        super(GeartaskTLS, self).check(env)  # geartask's own checks; stunnel is not needed here
        if _haproxy() is None:
            raise Skip("needs haproxy (apt-get install -y haproxy; scripts/install-bench.sh installs it)")

    def version(self) -> str:
        try:
            return f"{super().version()}, {haproxy_version()}"
        except (OSError, subprocess.SubprocessError):
            return super().version()

    def _start_terminator(self, env: Env, base: Path, port: int):
        haproxy = HAProxy(port, env.port, base / "pki" / "ca.pem", base / "pki" / "server.pem",
                          base / "pki" / "server.key", base, threads=self.threads)
        haproxy.start()
        return haproxy
