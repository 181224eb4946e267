"""The dashboard's own cost when the fleet is idle (issue 14: under 1% of a core and 80 MB).

    python bench/dashboard_idle.py                # 2 gearmand, 2 worker processes, 60 s measured
    python bench/dashboard_idle.py --seconds 10   # shorter (the smoke test)

Starts two gearmand (sqlite queue), worker processes attached to both, and the dashboard with
its defaults (refresh 2 s, collector in-process) on free loopback ports; after a warm-up it
measures the dashboard process's CPU (user + system, its threads) and resident memory, with
an open browser tab simulated by fetching the overview's live part every refresh, and
/metrics scraped every 15 s like Prometheus would. Prints one JSON object; ends every
process it started by pid. Exit status 0, or 1 when something failed to start.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` and geartask importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench.common import REPO, BenchError, cpu_seconds, rss_mb, spawn, wait_until  # noqa: E402
from geartask.server import LocalServer, free_port  # noqa: E402

PY = sys.executable


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def fetch(url: str) -> None:
    with urllib.request.urlopen(url, timeout=10) as r:
        r.read()


def measure(seconds: float, warmup: float, workers: int, threads: int, refresh: float, run_dir: Path) -> dict:
    servers, procs = [], []
    try:
        for i in range(2):
            d = run_dir / f"gearmand-{i}"
            s = LocalServer(host="127.0.0.1", port=free_port(), run_dir=d, queue_type="sqlite",
                            queue_path=d / "queue.sqlite")
            s.start()
            servers.append(s)
        config = run_dir / "config.yaml"
        config.write_text("servers: [" + ", ".join(s.address for s in servers) + "]\n"
                          f"log: {{dir: {run_dir / 'logs'}, format: json}}\n"
                          f"plugins: {{paths: [{REPO / 'plugins'}]}}\n"
                          f"outcomes: {{path: {run_dir / 'outcomes.sqlite'}}}\n")
        for i in range(workers):
            procs.append(spawn(f"worker-{i}", [PY, str(REPO / "worker_client" / "runworkers.py"), "--config",
                                               str(config), "--name", f"bw{i}", "--threads", str(threads)], run_dir))
        port = free_port()
        dash = spawn("dashboard", [PY, str(REPO / "manage_client" / "manage_client.py"), "--config", str(config),
                                   "dashboard", "--listen", f"127.0.0.1:{port}", "--refresh", str(refresh)], run_dir)
        procs.append(dash)
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            if not dash.alive():
                raise BenchError(f"the dashboard exited: {dash.tail()}")
            try:
                fetch(url + "/metrics")
                return True
            except OSError:
                return False
        wait_until(up, 30, "the dashboard answers", 0.2)
        wait_until(lambda: json.loads(urllib.request.urlopen(url + "/?format=json", timeout=10).read())
                   ["totals"]["workers"] == workers, 30, "every worker process listed", 0.5)
        time.sleep(warmup)
        cpu0, t0 = cpu_seconds(dash.pid), time.monotonic()
        next_scrape = t0
        while time.monotonic() - t0 < seconds:
            fetch(url + "/?fragment=1")  # an open tab
            if time.monotonic() >= next_scrape:
                fetch(url + "/metrics")
                next_scrape += 15
            time.sleep(refresh)
        cpu1, t1 = cpu_seconds(dash.pid), time.monotonic()
        return {"workload": "dashboard idle", "seconds": round(t1 - t0, 1), "refresh": refresh,
                "servers": len(servers), "worker_processes": workers, "threads_each": threads,
                "cpu_percent_of_a_core": round(100 * (cpu1 - cpu0) / (t1 - t0), 3),
                "rss_mb": round(rss_mb(dash.pid), 1), "peak_rss_mb": round(peak_rss_mb(dash.pid), 1),
                "budget": {"cpu_percent_of_a_core": 1.0, "rss_mb": 80}}
    finally:
        for p in reversed(procs):
            p.stop()
        for s in servers:
            s.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="measured time (default 60)")
    ap.add_argument("--warmup", type=float, default=10.0, help="seconds before measuring (default 10)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--threads", type=int, default=4, help="threads per worker process (default 4)")
    ap.add_argument("--refresh", type=float, default=2.0, help="dashboard refresh (default 2, its default)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="geartask-dash-bench-") as tmp:
        try:
            result = measure(args.seconds, args.warmup, args.workers, args.threads, args.refresh, Path(tmp))
        except BenchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
