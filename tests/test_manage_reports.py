"""`manage` commands that change things: they ask before stopping everything, take repeated
filters, and report what really happened when a job server dies under them (issue 22)."""

from __future__ import annotations

import io
import os
import signal
import threading

from geartask import fleet
from geartask.admin.cli import main
from geartask.gearman import CAN_DO, Connection
from helpers import wait_until
from test_manager import _Terminal, manage, queued, submit_bg, wait_registered, workers  # noqa: F401 (fixture)


def test_shutdown_without_a_filter_asks_on_a_terminal_and_names_repeat(gearmand_factory, make_config, workers):
    srv = gearmand_factory(queue="none")
    path, _ = make_config(srv)
    w1, w2, w3 = workers(path, "w1", 1), workers(path, "w2", 1), workers(path, "w3", 1)
    for name, proc in (("w1", w1), ("w2", w2), ("w3", w3)):
        wait_registered([srv], name, proc)

    out, err = io.StringIO(), io.StringIO()
    assert main(["shutdown", "--config", str(path)], stdout=out, stderr=err, stdin=_Terminal("n\n")) == 1
    assert f"Stop every worker process on {srv.address} (3 found)?" in out.getvalue()
    assert "nothing stopped" in err.getvalue()
    assert all(p.poll() is None for p in (w1, w2, w3))

    # --name repeats: both named processes stop, the third keeps running (no question: a filter)
    r = manage("shutdown", "--name", "w1", "--name", "w2", "--config", str(path))
    assert r.returncode == 0, r.stderr
    assert w1.wait(10) == 0 and w2.wait(10) == 0
    assert w3.poll() is None

    out = io.StringIO()
    assert main(["shutdown", "--config", str(path)], stdout=out, stderr=err, stdin=_Terminal("y\n")) == 0
    assert w3.wait(10) == 0


def test_shutdown_does_not_call_a_worker_stopped_when_its_server_died(fresh_gearmand):
    """A worker in its grace period and a server killed during --wait: 'unknown', not 'stopped'."""
    conn = Connection(fresh_gearmand.host, fresh_gearmand.port).connect()
    conn.send(CAN_DO, task="geartask.control:slow:127.0.0.9:4242")  # registered, never takes its job
    conn.echo()
    adm = fleet.Admin([(fresh_gearmand.host, fresh_gearmand.port)], timeout=2)
    reports = []
    t = threading.Thread(target=lambda: reports.append(adm.shutdown(name="slow", wait=4, poll=0.05)))
    t.start()
    try:
        wait_until(lambda: queued(fresh_gearmand, "geartask.control:slow:127.0.0.9:4242"), 10,
                   message="the shutdown job queued")
        os.kill(fresh_gearmand.pid(), signal.SIGKILL)
        t.join(30)
    finally:
        conn.close()
    (p,) = reports[0].processes
    assert p.outcome == "unknown", p
    assert any("server gone" in e for e in p.errors)
    assert not reports[0].ok


def test_clear_interrupted_by_the_server_dying_reports_what_it_removed(fresh_gearmand, make_config):
    srv = fresh_gearmand  # the sqlite queue: each removal costs a row delete, so the clear takes seconds
    path, _ = make_config(srv)
    submit_bg(srv, "t.clear.dies", 3000, "d")
    out, err = io.StringIO(), io.StringIO()
    status = []
    t = threading.Thread(target=lambda: status.append(
        main(["clear", "t.clear.dies", "--yes", "--config", str(path)], stdout=out, stderr=err,
             stdin=io.StringIO())))
    t.start()
    wait_until(lambda: queued(srv, "t.clear.dies") <= 2500, 30, interval=0.01, message="the clear under way")
    os.kill(srv.pid(), signal.SIGKILL)
    t.join(60)
    assert status == [1]
    cleared = int(out.getvalue().strip().splitlines()[-1].split()[0])
    assert 500 <= cleared < 3000, out.getvalue()
    assert f"{cleared} of them were removed before a server failed" in err.getvalue()


def test_status_text_leaves_out_idle_targeted_names_and_says_so():
    """Every worker registers TASK@host:H and TASK@label:L beside TASK: listing the idle ones
    would repeat each task per host and label; one with jobs is shown."""
    from geartask.admin.cli import status_text

    def fn(name, queued=0, running=0, workers=1):
        return {"function": name, "queued": queued, "running": running, "workers": workers}

    funcs = [fn("shell"), fn("shell@host:web1"), fn("shell@label:db"), fn("shell@host:web2", queued=2)]
    data = {"servers": [{"server": "127.0.0.1:4730", "reachable": True, "version": "1.1.20", "rtt_ms": 0.2,
                         "error": None, "functions": funcs}], "totals": funcs}
    text = status_text(data)
    rows = [line.split()[0] for line in text.splitlines() if line.strip()]
    assert "shell" in rows and "shell@host:web2" in rows
    assert "shell@host:web1" not in rows and "shell@label:db" not in rows
    assert "(2 targeted names (TASK@host:, TASK@label:) with no jobs not shown; --json lists them)" in text
