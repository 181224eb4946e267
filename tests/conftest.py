"""Fixtures: real gearmand processes on free loopback ports, each with its own sqlite queue."""

from __future__ import annotations

import itertools
import shutil
import uuid
from pathlib import Path

import pytest

from geartask.config import load_config
from geartask.server import LocalServer, free_port

from helpers import write_config
from pgserver import pg_server, pg_url  # noqa: F401  (fixtures: a real PostgreSQL)

if shutil.which("gearmand") is None:  # pragma: no cover - the README's test command installs it
    raise pytest.UsageError("gearmand not found: run 'apt-get install -y gearman-job-server gearman-tools'")

_counter = itertools.count()


def _start_server(base: Path, queue: str = "sqlite") -> LocalServer:
    port = free_port()
    run_dir = base / f"gearmand-{port}-{next(_counter)}"
    server = LocalServer(host="127.0.0.1", port=port, run_dir=run_dir, queue_type=queue,
                         queue_path=run_dir / "queue.sqlite")
    server.start()
    return server


@pytest.fixture(scope="session")
def gearmand(tmp_path_factory) -> LocalServer:
    """One gearmand shared by the whole test session: use unique function names (``fname``)."""
    server = _start_server(tmp_path_factory.mktemp("shared-gearmand"))
    yield server
    server.stop()


@pytest.fixture
def gearmand_factory(tmp_path):
    """Start as many private gearmand servers as a test needs; all are stopped afterwards."""
    started: list[LocalServer] = []

    def start(queue: str = "sqlite") -> LocalServer:
        server = _start_server(tmp_path, queue)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(timeout=5)


@pytest.fixture
def fresh_gearmand(gearmand_factory) -> LocalServer:
    """A private gearmand for a test that kills or restarts it."""
    return gearmand_factory()


@pytest.fixture
def fname(request) -> str:
    """A function name no other test uses, so tests on a shared server don't see each other's jobs."""
    return f"t.{request.node.name[:40]}.{uuid.uuid4().hex[:8]}".replace("[", "_").replace("]", "_")


@pytest.fixture
def make_config(tmp_path):
    """make_config(servers, extra_yaml='') -> (path, Config) for a test's own config file."""
    def make(servers, extra: str = "", name: str = "config.yaml"):
        if isinstance(servers, LocalServer):
            servers = [servers]
        addrs = [s.address if isinstance(s, LocalServer) else s for s in servers]
        path = write_config(tmp_path / name, addrs, extra)
        return path, load_config(path)
    return make


@pytest.fixture
def netlab(tmp_path):
    """A test network (tests/netlab.py): hosts as namespaces on a bridge, torn down afterwards.
    Skipped where namespaces can't be made (not root); in CI that is a failure instead."""
    import netlab as lab_module
    with lab_module.open_lab(tmp_path) as lab:
        yield lab
