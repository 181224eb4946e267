"""The grab machine's adaptive hello deadline on a slow path (a real gearmand, a real worker
process, the delaying proxy of tests/netproxy.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import gearclient as gc
from helpers import REPO, wait_until, write_config
from netproxy import SliceProxy
from workers import worker_connections

THREADS = int(os.environ.get("GEARTASK_TEST_SLOW_PATH_THREADS", "600"))


def test_many_threads_register_through_a_slow_path_without_a_reconnect_storm(gearmand_factory, tmp_path):
    """600 threads through a proxy that holds every chunk 50 ms each way. Before, each hello
    had a fixed 5 s to be answered, a swamped path missed it, and every miss was a reconnect
    adding to the backlog (1,000 threads: 2,895 reconnects, 210 s). Now the deadline follows
    the measured round trip and doubles on each miss: the threads register with few
    reconnects (measured on this machine: 19 reconnects for 600 threads before, 0 after), and
    an outage line that hid some counts them."""
    srv = gearmand_factory(queue="none")
    with SliceProxy(srv.address, slice_down=False, slice_up=False, delay=0.05) as proxy:
        cfg = write_config(tmp_path / "slow.yaml", [proxy.address], "worker:\n  poll_timeout: 30\n",
                           plugin_paths=[REPO / "plugins"])
        err = tmp_path / "slow.err"
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, str(REPO / "worker_client" / "runworkers.py"), "--config", str(cfg),
                                 "--name", "slowpath", "--threads", str(THREADS)], stdout=subprocess.DEVNULL,
                                stderr=err.open("w"), cwd=tmp_path)
        try:
            wait_until(lambda: len([line for line in worker_connections(srv.address) if " slowpath:" in line])
                       >= THREADS + 1 or proc.poll() is not None, 150,
                       message=f"{THREADS} threads registered through the slow path")
            assert proc.poll() is None
            took = time.monotonic() - t0
            reconnects = proxy.connections - (THREADS + 1)  # every connection past one per thread
            outs = gc.run(srv.address, "eg.reverse", [f"x{i}" for i in range(20)], timeout=60)
            assert all(o.state == "complete" for o in outs)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    lines = [json.loads(line) for f in tmp_path.rglob("*.log") for line in f.read_text().splitlines()
             if line.startswith("{")]
    back = [e for e in lines if e.get("event") == "server reachable again"]
    print(f"{THREADS} threads: {reconnects} reconnects, registered in {took:.1f}s; outage lines: {back}")
    # A storm is several reconnects per thread (1,000 threads: 2,895), each one adding to the
    # backlog. On a machine loaded by other tests (xdist) hellos still miss the 5 s floor once
    # before the deadline grows, and the proxy runs in this loaded process: idle 0, under load
    # up to 69 seen, and once 314 (ci28, registered in 8.2 s all the same). So the bound is one
    # reconnect per thread: what a storm exceeds at once, and load alone has not.
    assert reconnects <= THREADS, f"{reconnects} reconnects for {THREADS} threads in {took:.1f}s"
    for e in back:  # an outage line says how many failed tries it stands for
        assert e["failures"] >= 1
