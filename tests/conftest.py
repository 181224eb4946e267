"""Fixtures: real gearmand processes on free loopback ports, each with its own sqlite queue."""

from __future__ import annotations

import itertools
import shutil
import uuid
from pathlib import Path

import pytest

from geartask.config import load_config
from geartask.errors import LocalServerError
from geartask.server import LocalServer, free_port

from helpers import write_config
from pgserver import pg_server, pg_url  # noqa: F401  (fixtures: a real PostgreSQL)

if shutil.which("gearmand") is None:  # pragma: no cover - the README's test command installs it
    raise pytest.UsageError("gearmand not found: run 'apt-get install -y gearman-job-server gearman-tools'")

_counter = itertools.count()


def _start_server(base: Path, queue: str = "sqlite") -> LocalServer:
    # Another test process (an xdist worker, another run) may take the free port before this
    # gearmand binds it: then gearmand exits at start, and a fresh port is tried.
    for attempt in range(3):
        port = free_port()
        run_dir = base / f"gearmand-{port}-{next(_counter)}"
        server = LocalServer(host="127.0.0.1", port=port, run_dir=run_dir, queue_type=queue,
                             queue_path=run_dir / "queue.sqlite")
        try:
            server.start()
        except LocalServerError:
            if attempt == 2:
                raise
            continue
        return server
    raise AssertionError("unreachable")


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
def dashboards():
    """dashboards(config, *extra, **kw) -> a running DashboardProc (tests/dashboards.py), ready;
    every one started is stopped afterwards."""
    from dashboards import DashboardProc
    started: list[DashboardProc] = []

    def start(config, *extra, **kw) -> DashboardProc:
        d = DashboardProc(config, *extra, **kw)
        started.append(d)
        return d.wait_ready()

    yield start
    for d in started:
        d.stop()


def _restore_tls(before: dict) -> None:
    from geartask.gearman import registered_tls, use_tls
    now = registered_tls()
    for host, port in set(now) | set(before):
        if now.get((host, port)) is not before.get((host, port)):
            use_tls(host, port, before.get((host, port)))


@pytest.fixture(autouse=True)
def tls_registrations_stay_in_their_test():
    """Loading a config with tls:// servers registers them for this whole process. A later test
    whose plain gearmand got the same free port (xdist workers live long) would then try TLS on
    it and see it closed: what a test (or its module's fixtures) registered goes with it."""
    from geartask.gearman import registered_tls
    before = registered_tls()
    yield
    _restore_tls(before)


@pytest.fixture(autouse=True, scope="module")
def tls_registrations_stay_in_their_module():
    from geartask.gearman import registered_tls
    before = registered_tls()
    yield
    _restore_tls(before)


@pytest.fixture
def netlab(tmp_path, request):
    """A test network (tests/netlab.py): hosts as namespaces on a bridge, torn down afterwards.
    Skipped where namespaces can't be made (not root); in CI that is a failure instead.
    ``@pytest.mark.parametrize("netlab", ["ipv4", "ipv6"], indirect=True)`` runs a test on both."""
    import netlab as lab_module
    with lab_module.open_lab(tmp_path, ipv6=getattr(request, "param", "ipv4") == "ipv6") as lab:
        yield lab


# -- running in parallel (pytest-xdist, as scripts/test.sh does) ---------------------------------
# Seconds the longest tests took in a serial run on the 2-core machine (--durations). Under xdist
# they are handed out first, so no worker is left with a long test after the others ran out of
# work. A test missing here (new, renamed) runs in file order among the short ones; a figure
# that is off only costs a few seconds of wall time, never a result.
LONGEST = {
    "test_network.py::test_silent_worker_host_jobs_run_elsewhere": 127,
    "test_network.py::test_twenty_batches_across_the_bridge_never_stall": 57,
    "test_hostile_sender.py::test_memory_is_flat_in_the_number_of_jobs": 48,
    "test_network.py::test_every_role_through_the_slicing_proxy": 36,
    "test_sender_network.py::test_2000_background_jobs_and_status_through_slicing_proxies": 32,
    "test_scheduler.py::test_three_schedulers_run_each_slot_once_even_when_two_die": 31,
    "test_outcomes_collector.py::test_2000_outcomes_survive_a_stopped_collector_and_a_killed_gearmand": 30,
    "test_network.py::test_sender_partitioned_from_a_live_server": 29,
    "test_logs.py::test_a_process_exits_while_threads_log": 26,
    "test_scheduler.py::test_a_missed_slot_runs_once_under_latest_and_not_at_all_under_skip": 21,
    "test_trust_network.py::test_a_silent_worker_host_behind_stunnel_gives_its_jobs_back": 20,
    "test_sender_network.py::test_a_15s_cut_to_a_live_server_mid_batch_runs_nothing_twice": 17,
    "test_fleet_commands.py::test_a_host_killed_during_an_all_run_is_reported_and_the_others_complete": 17,
    "test_bench_smoke.py::test_dashboard_idle_bench_runs_and_stays_within_budget": 15,
    "test_install.py": 12,  # the module's pip install into a fresh venv (one fixture: one group)
    "test_worker.py::test_two_servers_one_killed_mid_run_every_job_completes": 12,
    "test_worker_outcomes.py::test_a_worker_killed_right_after_background_jobs_loses_no_outcome": 11,
    "test_bench_smoke.py::test_bench_smoke_writes_results_for_every_workload_and_system": 11,
    "test_worker_network.py::test_a_result_finished_during_a_cut_is_delivered_after_it": 11,
    "test_outcomes_collector.py::test_failed_list_show_requeue_purge_and_import_end_to_end": 10,
    "test_network.py::test_ten_ms_round_trip": 10,
    "test_worker_outcomes.py::test_outcomes_gearmand_refuses_are_kept_in_the_dead_letter_file": 8,
    "test_scheduler.py::test_once_from_two_processes_at_the_same_moment_runs_each_slot_once": 7,
    "test_worker_network.py::test_a_late_server_does_not_hold_up_the_others_and_its_late_job_is_served": 7,
    "test_sender_network.py::test_the_same_unique_from_another_process_meets_the_original": 7,
    "test_worker_outcomes.py::test_a_failed_background_job_is_failed_everywhere_and_a_requeue_runs_it_again": 7,
    "test_dashboard.py::test_pages_never_hang_on_a_server_that_does_not_answer": 6,
    "test_network.py::test_shutdown_by_either_address_of_a_two_address_host": 6,
    "test_manager.py::test_clear_without_workers_stays_cleared_after_kill_and_restart": 6,
}


# Tests kept on one xdist worker, one after the other (the scheduler below): test_install.py's
# module fixture (one pip install into a fresh venv) serves both its tests; the two tests that
# keep a core busy the whole time (100,000 and 400,000 jobs) never run together, so the
# timing-sensitive tests beside them keep the other core. (xdist's own xdist_group marks do not
# work with pytest 9: xdist renames the node id through an attribute pytest no longer reads.)
GROUPS = {
    "test_install.py": "install",
    "test_network.py::test_twenty_batches_across_the_bridge_never_stall": "cpu-heavy",
    "test_hostile_sender.py::test_memory_is_flat_in_the_number_of_jobs": "cpu-heavy",
    "test_grab_network.py::test_many_threads_register_through_a_slow_path_without_a_reconnect_storm": "cpu-heavy",
}


def _key(nodeid: str) -> tuple[str, str]:
    """("file.py::test_name", "file.py") of a node id, parameters left out."""
    path, _, name = nodeid.partition("::")
    file = path.rsplit("/", 1)[-1]
    return f"{file}::{name.split('[', 1)[0]}", file


def _lookup(table: dict, nodeid: str, default=None):
    test, file = _key(nodeid)
    return table.get(test, table.get(file, default))


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: absent under -p no:xdist
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """--dist loadgroup with the GROUPS above as groups; every other test is a unit of its own."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    class GroupScheduling(LoadGroupScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _lookup(GROUPS, nodeid) or super()._split_scope(nodeid)

    return GroupScheduling(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist (each worker collects; all must agree on the order): the longest tests first,
    so the scheduler hands them out first. A serial run keeps file order."""
    if hasattr(config, "workerinput"):
        items.sort(key=lambda item: _lookup(LONGEST, item.nodeid, 0), reverse=True)  # stable
