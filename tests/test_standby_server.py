"""A cold standby job server (docs/gearmand.md): gearmand's libpq queue on a real PostgreSQL
(tests/pgserver.py), servers started with `manage_client.py server start`, real workers."""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from geartask import JobSender, load_config
from geartask.server import LocalServer, free_port, port_open
from helpers import REPO, run_script, wait_until, write_config
from test_worker import TEST_PLUGINS
from workers import WorkerProc

MANAGE = "manage_client/manage_client.py"
TABLE = "standby_queue"


def server_config(tmp_path: Path, name: str, port: int, servers: list[str], url: str) -> Path:
    return write_config(tmp_path / name / "config.yaml", servers,
                        f"server:\n  host: 127.0.0.1\n  port: {port}\n  queue:\n    type: postgresql\n"
                        f"    url: {url}\n    table: {TABLE}\n")


def start(config: Path) -> LocalServer:
    r = run_script(MANAGE, "--config", str(config), "server", "start", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return LocalServer.from_config(load_config(config))


def queued_rows(url: str) -> int:
    with psycopg.connect(url, connect_timeout=5) as conn:
        return conn.execute(f"SELECT COUNT(*) FROM {TABLE} WHERE function_name = 't.record'").fetchone()[0]


def runs(path: Path) -> Counter:
    if not path.exists():
        return Counter()
    return Counter(json.loads(line)["unique"] for line in path.read_text().splitlines() if line.strip())


@pytest.fixture
def pair(tmp_path, pg_url):
    """Servers A and B on one queue table; both addresses in every config. Yields
    (configs, addresses, servers started) and stops whatever still runs afterwards."""
    ports = [free_port(), free_port()]
    addresses = [f"127.0.0.1:{p}" for p in ports]
    configs = [server_config(tmp_path, n, p, addresses, pg_url) for n, p in zip("AB", ports, strict=False)]
    started: list[LocalServer] = []
    yield configs, addresses, started
    for srv in started:
        srv.stop(5)


def test_standby_runs_each_of_1000_background_jobs_of_a_killed_server_once(tmp_path, pg_url, pair):
    """1,000 background jobs queued on A (no workers); A killed -9, B started on the same
    table; workers listing both addresses run all 1,000, none twice."""
    configs, addresses, started = pair
    a = start(configs[0])
    started.append(a)
    ran = tmp_path / "ran.jsonl"
    jobs = [{"task": "t.record", "data": {"file": str(ran), "id": i}, "unique": f"sb-{i}", "background": True}
            for i in range(1000)]
    with JobSender(load_config(configs[0])) as sender:  # B is down: every job goes to A
        results = sender.submit_many(jobs, wait=False)
    assert all(r.state == "queued" and r.server == addresses[0] for r in results), \
        Counter((r.state, r.server) for r in results)
    wait_until(lambda: queued_rows(pg_url) == 1000, 20, message="1000 rows in the queue table")

    os.kill(a.pid(), signal.SIGKILL)  # the crash; fencing in the test is: A is dead before B starts
    wait_until(lambda: not port_open(*addresses[0].split(":")[:1], int(addresses[0].split(":")[1]), 0.2), 10,
               message="A gone")
    b = start(configs[1])
    started.append(b)

    wcfg = write_config(tmp_path / "w" / "config.yaml", addresses, "worker:\n  poll_timeout: 1\noutcomes:\n  report: false\n",
                        plugin_paths=[REPO / "plugins", TEST_PLUGINS])
    worker = WorkerProc(wcfg, "sbw", 8)
    try:
        worker.wait_attached([addresses[1]], 30)
        wait_until(lambda: len(runs(ran)) == 1000, 180, 0.2, message="1000 jobs run on B")
        wait_until(lambda: queued_rows(pg_url) == 0, 30, message="the queue table emptied")
        counted = runs(ran)
        assert len(counted) == 1000 and max(counted.values()) == 1, \
            [u for u, n in counted.items() if n > 1][:10]
    finally:
        worker.stop()


def test_two_servers_on_one_table_at_once_run_the_jobs_twice(tmp_path, pg_url, pair):
    """What fencing prevents: B started while A still runs loads A's queued jobs too, and with
    workers on both, every job runs twice (docs/gearmand.md)."""
    configs, addresses, started = pair
    a = start(configs[0])
    started.append(a)
    ran = tmp_path / "ran.jsonl"
    with JobSender(load_config(configs[0])) as sender:
        results = sender.submit_many([{"task": "t.record", "data": {"file": str(ran), "id": i}, "unique": f"dup-{i}",
                                       "background": True} for i in range(50)], wait=False)
    assert all(r.server == addresses[0] for r in results)
    wait_until(lambda: queued_rows(pg_url) == 50, 20, message="50 rows in the queue table")
    started.append(start(configs[1]))  # no fencing: A is alive
    wcfg = write_config(tmp_path / "w" / "config.yaml", addresses, "worker:\n  poll_timeout: 1\noutcomes:\n  report: false\n",
                        plugin_paths=[REPO / "plugins", TEST_PLUGINS])
    worker = WorkerProc(wcfg, "dupw", 4)
    try:
        worker.wait_attached(addresses, 30)
        wait_until(lambda: sum(runs(ran).values()) >= 100, 60, 0.2, message="each job run on both servers")
        assert set(runs(ran).values()) == {2}
    finally:
        worker.stop()


def test_a_postgresql_queue_gives_gearmand_the_libpq_options_and_keeps_the_password_off_argv(tmp_path):
    cfg = load_config(server_config(tmp_path, "C", 4999, ["127.0.0.1:4999"], "postgresql://g:s3cret@db:5432/jobs"))
    cmd = LocalServer.from_config(cfg).command()
    i = cmd.index("--queue-type")
    assert cmd[i:i + 6] == ["--queue-type", "Postgres", "--libpq-conninfo", "postgresql://g@db:5432/jobs",
                            "--libpq-table", TABLE]
    assert not any("s3cret" in part for part in cmd)
