"""What reporting job outcomes costs the fleet, as ratios measured in one run (issue 13).

    python bench/outcomes_cost.py [--rounds 3] [--w1 5000] [--w3 20000] [--out docs/benchmarks-outcomes.json]

* W1: 5,000 foreground no-op jobs in one batch through one worker process (4 threads), on a
  gearmand without a persistent queue (as bench.py's W1): with outcome reporting off and no
  collector, against reporting on with the collector running. Foreground successes report
  nothing, so the ratio should be 1.
* W3-bg: 20,000 background no-op jobs queued on a gearmand with the sqlite queue, then one
  worker process (4 threads) started and timed until the queue is drained: reporting off,
  against reporting on with the collector attached (and the collector's CPU meanwhile).

Rounds alternate off/on so both see the same machine state. Every process is started here
(free loopback ports) and ended by its pid.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench.common import PY, REPO, cpu_seconds, spawn, wait_until  # noqa: E402
from geartask import JobSender, load_config  # noqa: E402
from geartask import fleet as admin  # noqa: E402
from geartask.server import LocalServer, free_port  # noqa: E402

RUNWORKERS = REPO / "worker_client" / "runworkers.py"
MANAGE = REPO / "manage_client" / "manage_client.py"


def config(folder: Path, server: LocalServer, report: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(f"servers: ['{server.address}']\nlog: {{dir: logs, level: info}}\n"
                    f"plugins: {{paths: ['{REPO / 'bench' / 'plugins'}']}}\n"
                    f"worker: {{threads: 4, poll_timeout: 1}}\n"
                    f"outcomes: {{report: {str(report).lower()}, path: outcomes.sqlite}}\n")
    return path


def queued(server: LocalServer, function: str) -> int:
    for f in admin.server_status(server.host, server.port)["functions"]:
        if f.function == function:
            return f.total
    return 0


def attached(server: LocalServer, function: str) -> bool:
    return any(f.function == function and f.workers > 0
               for f in admin.server_status(server.host, server.port)["functions"])


def round_w1(base: Path, n: int, report: bool, tag: str) -> float:
    server = LocalServer(host="127.0.0.1", port=free_port(), run_dir=base / f"g-{tag}", queue_type="none")
    server.start()
    procs = []
    try:
        cfg = config(base / tag, server, report)
        if report:
            procs.append(spawn(f"collector-{tag}", [PY, str(MANAGE), "--config", str(cfg), "outcomes", "serve"],
                               cfg.parent))
            wait_until(lambda: attached(server, "geartask.outcomes"), 30, "the collector")
        procs.append(spawn(f"worker-{tag}", [PY, str(RUNWORKERS), "--config", str(cfg), "--name", "w"], cfg.parent))
        wait_until(lambda: attached(server, "bench.reverse"), 30, "the worker")
        with JobSender(load_config(cfg)) as sender:
            sender.submit_many([{"task": "bench.reverse", "data": "warm"}] * 200)
            t0 = time.monotonic()
            results = sender.submit_many([{"task": "bench.reverse", "data": f"j{i}"} for i in range(n)])
            seconds = time.monotonic() - t0
        assert all(r.state == "complete" for r in results)
        return n / seconds
    finally:
        for p in reversed(procs):
            p.stop()
        server.stop()


NICE: list[str] = []  # --nice: the collector runs under `nice -n 10`, as a background service may


def round_w3(base: Path, n: int, report: bool, tag: str) -> dict:
    run_dir = base / f"g-{tag}"
    server = LocalServer(host="127.0.0.1", port=free_port(), run_dir=run_dir, queue_type="sqlite",
                         queue_path=run_dir / "queue.sqlite")
    server.start()
    procs = []
    try:
        cfg = config(base / tag, server, report)
        collector = None
        if report:
            collector = spawn(f"collector-{tag}", [*NICE, PY, str(MANAGE), "--config", str(cfg), "outcomes", "serve"],
                              cfg.parent)
            procs.append(collector)
            wait_until(lambda: attached(server, "geartask.outcomes"), 30, "the collector")
        with JobSender(load_config(cfg)) as sender:
            results = sender.submit_many([{"task": "bench.reverse", "data": f"j{i}"} for i in range(n)], wait=False)
        assert all(r.state == "queued" for r in results)
        c0 = cpu_seconds(collector.pid) if collector else 0.0
        t0 = time.monotonic()
        procs.append(spawn(f"worker-{tag}", [PY, str(RUNWORKERS), "--config", str(cfg), "--name", "w"], cfg.parent))
        wait_until(lambda: queued(server, "bench.reverse") == 0, 600, "the queue drained", interval=0.05)
        drain = time.monotonic() - t0
        out = {"drain_seconds": drain}
        if collector:
            wait_until(lambda: queued(server, "geartask.outcomes") == 0, 600, "every outcome stored", interval=0.05)
            out["stored_after_seconds"] = time.monotonic() - t0
            out["collector_cpu_per_100k"] = (cpu_seconds(collector.pid) - c0) * 100_000 / n
            store = cfg.parent / "outcomes.sqlite"
            size = sum(p.stat().st_size for p in cfg.parent.glob("outcomes.sqlite*"))
            out["store_bytes_per_100k"] = size * 100_000 / n if store.exists() else None
        return out
    finally:
        for p in reversed(procs):
            p.stop()
        server.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--w1", type=int, default=5000)
    ap.add_argument("--w3", type=int, default=20000)
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks-outcomes.json")
    ap.add_argument("--nice", action="store_true", help="run the collector under nice -n 10 in W3-bg")
    ap.add_argument("--only", choices=["w1", "w3"], help="one workload only")
    args = ap.parse_args(argv)
    if args.nice:
        NICE[:] = ["nice", "-n", "10"]
    base = Path(tempfile.mkdtemp(prefix="geartask-outcomes-cost-"))
    w1 = {"off": [], "on": []}
    w3 = {"off": [], "on": []}
    for r in range(args.rounds):
        for mode in ("off", "on") if args.only != "w3" else ():
            w1[mode].append(round_w1(base, args.w1, mode == "on", f"w1-{mode}-{r}"))
            print(f"W1 {mode} round {r + 1}: {w1[mode][-1]:.0f} jobs/s", flush=True)
        for mode in ("off", "on") if args.only != "w1" else ():
            w3[mode].append(round_w3(base, args.w3, mode == "on", f"w3-{mode}-{r}"))
            print(f"W3-bg {mode} round {r + 1}: {json.dumps(w3[mode][-1])}", flush=True)
    def med(values):
        values = list(values)
        return statistics.median(values) if values else None

    if args.only:
        print(json.dumps({"w1": w1, "w3": w3}, indent=2))
        return 0
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "w1_jobs": args.w1, "w3_jobs": args.w3, "rounds": args.rounds,
        "w1_off_jobs_per_s": med(w1["off"]), "w1_on_jobs_per_s": med(w1["on"]),
        "w1_ratio_on_over_off": med(w1["on"]) / med(w1["off"]),
        "w3_off_drain_s": med(x["drain_seconds"] for x in w3["off"]),
        "w3_on_drain_s": med(x["drain_seconds"] for x in w3["on"]),
        "w3_on_stored_s": med(x["stored_after_seconds"] for x in w3["on"]),
        "w3_ratio_on_over_off": med(x["drain_seconds"] for x in w3["on"]) / med(x["drain_seconds"] for x in w3["off"]),
        "collector_cpu_s_per_100k": med(x["collector_cpu_per_100k"] for x in w3["on"]),
        "store_mb_per_100k": med(x["store_bytes_per_100k"] for x in w3["on"]) / 1e6,
        "collector_nice": bool(NICE),
        "raw": {"w1": w1, "w3": w3},
    }
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "raw"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
