"""A real PostgreSQL for tests: Debian's postgresql binaries, a cluster made by initdb in a
temp dir, one postgres process on a free loopback port (TCP only, trust auth for loopback),
stopped by its pid at the end of the session. Each test that needs isolation gets a database
of its own (``pg_url``). postgres refuses to run as root, so as root the cluster belongs to
the ``postgres`` OS user (Debian's package makes it) and is run with runuser.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from geartask.server import free_port

STARTUP = 30.0  # seconds initdb + the first connection may take on a loaded machine
_dbs = itertools.count()


def pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    return found[-1] if found else None


class PgServer:
    def __init__(self, base: Path):
        self.base = base
        self.data = base / "data"
        self.port = free_port()
        self.host = "127.0.0.1"
        self.user = "postgres"
        self.process: subprocess.Popen | None = None
        self.log = base / "postgres.log"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", "postgres", "--"]
            pw = pwd.getpwnam("postgres")
            os.chown(base, pw.pw_uid, pw.pw_gid)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{db}"

    def start(self) -> None:
        initdb, postgres = pg_bin("initdb"), pg_bin("postgres")
        if initdb is None or postgres is None:
            raise pytest.UsageError("PostgreSQL not found: run scripts/install.sh (apt-get install -y postgresql)")
        user = ["-U", self.user]
        subprocess.run([*self.as_user, initdb, "-D", str(self.data), "-A", "trust", *user, "-E", "UTF8",
                        "--no-sync"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
        out = open(self.log, "ab")
        self.process = subprocess.Popen(
            [*self.as_user, postgres, "-D", str(self.data), "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
             "-c", "unix_socket_directories=", "-c", "fsync=off", "-c", "max_connections=200",
             "-c", "shared_buffers=32MB"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        out.close()
        deadline = time.monotonic() + STARTUP
        import psycopg
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.process.returncode}: {self.log.read_text()[-500:]}")
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                pass  # not listening yet, or "the database system is starting up"
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"postgres did not accept connections within {STARTUP:g}s; see {self.log}")
            time.sleep(0.1)

    def create_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg
        name = f"t{next(_dbs)}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        """SIGTERM the postgres we started (runuser passes it on), by its pid; SIGKILL if it hangs."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # runuser and postgres: its own session
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)


@pytest.fixture(scope="session")
def pg_server():
    """One PostgreSQL for the whole session (use ``pg_url`` for a database of a test's own)."""
    base = Path(tempfile.mkdtemp(prefix="geartask-pg-"))  # not under pytest's 0700 root tmp: postgres reads it
    server = PgServer(base)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server) -> str:
    """The URL of a fresh, empty database on the session's PostgreSQL."""
    return pg_server.create_database()
