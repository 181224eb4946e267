"""The dashboard's Workers page shows each worker's host name and labels (issue 23 Must 1; issue
22's "hosts by name, not only IP"): real gearmand, a real worker process, the real dashboard."""

from __future__ import annotations

from dashboards import DashboardProc
from helpers import wait_until
from test_dashboard import dashboards  # noqa: F401
from test_dashboard_browser import _text, browser  # noqa: F401
from workers import WorkerProc


def test_workers_page_lists_hosts_and_labels(fresh_gearmand, make_config, dashboards):  # noqa: F811
    srv = fresh_gearmand
    worker_path, _ = make_config(srv, "worker:\n  host: db1.test\n  labels: [db]\n", name="worker.yaml")
    path, _ = make_config(srv)
    w = WorkerProc(worker_path, "fw", 1, "--label", "eu-west").wait_attached([srv.address])
    try:
        d = dashboards(path, refresh=0.5)

        def procs():
            return [p for h in d.get_json("/workers")["hosts"] for p in h["processes"] if p["name"] == "fw"]
        wait_until(lambda: procs() and procs()[0]["hostname"] == "db1.test", 15, message="the worker's host shown")
        (p,) = procs()
        assert p["labels"] == ["db", "eu-west"]
        assert not [f for f in p["functions"] if "@" in f]  # the targeted forms are the host and labels
        (host,) = [h for h in d.get_json("/workers")["hosts"] if any(x["name"] == "fw" for x in h["processes"])]
        assert host["names"] == ["db1.test"]
        html = d.get("/workers").text
        assert '<span class="hostname">db1.test</span>' in html and '<td class="labels">db, eu-west</td>' in html
    finally:
        w.stop()


def test_workers_page_in_a_browser_shows_host_names_and_labels(browser, fresh_gearmand, make_config):  # noqa: F811
    srv = fresh_gearmand
    worker_path, _ = make_config(srv, "worker:\n  host: db2.test\n  labels: [db]\n", name="worker.yaml")
    path, _ = make_config(srv)
    w = WorkerProc(worker_path, "bw", 1).wait_attached([srv.address])
    d = DashboardProc(path, refresh=1.0).wait_ready()
    try:
        browser.get(d.url + "/workers")
        wait_until(lambda: _text(browser, "section.host h2 .hostname") == "db2.test", 15, message="host name shown")
        assert _text(browser, 'tr[data-name="bw"] td.labels') == "db"
        assert "@" not in _text(browser, 'tr[data-name="bw"] td.fns')
    finally:
        d.stop()
        w.stop()
