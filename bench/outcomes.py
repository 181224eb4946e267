"""What the outcomes collector costs: its CPU and the store's size per 100,000 outcomes.

    python bench/outcomes.py                      # 100k outcomes in jobs of 20, 20k in jobs of 1
    python bench/outcomes.py --runs 20:100000,1:20000 --mode live,backlog

Starts its own gearmand on a sqlite queue (free loopback port) and the real collector
(`manage_client.py outcomes serve`) for each run, and ends both by pid. Modes: ``live``, the
collector is attached while the outcomes are submitted (pipelined, as fast as gearmand takes
them); ``backlog``, they are submitted first and the collector started afterwards (it drains a
queue, as after an outage; the CPU of a collector that starts with nothing to do is measured
apart and taken off). Prints one JSON object per run and a table; figures scale to 100,000 outcomes.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench.common import PY, REPO, cpu_seconds, spawn, wait_until  # noqa: E402
from geartask import gearman as gp  # noqa: E402
from geartask import fleet as admin  # noqa: E402
from geartask.outcomes import OUTCOME_FUNCTION, make_record, outcome_jobs  # noqa: E402
from geartask.server import LocalServer, free_port  # noqa: E402

MANAGE = REPO / "manage_client" / "manage_client.py"


def outcome_payloads(server: str, count: int, per_job: int) -> list[tuple[str, bytes]]:
    """What a worker sends for ``count`` background no-op jobs: small results, ``per_job`` a job."""
    records = (make_record(server=server, handle=f"H:bench:{i}", task="bench.noop", state="complete",
                           unique=f"bench-{i:08d}", started_at=time.time(), background=True, attempts=1,
                           worker="bench:127.0.0.1:1", result=b"null") for i in range(count))
    return list(outcome_jobs(records, max_records=per_job))


def submit(server: LocalServer, payloads: list[tuple[str, bytes]]) -> float:
    conn = gp.Connection(server.host, server.port).connect()
    t0 = time.monotonic()
    cmd = gp.submit_command("normal", True)
    try:
        for i in range(0, len(payloads), 1000):
            part = payloads[i:i + 1000]
            conn.send_raw(b"".join(gp.pack(cmd, task=OUTCOME_FUNCTION, unique=u, data=p) for u, p in part))
            for _ in part:
                conn.expect(gp.JOB_CREATED, 120)
    finally:
        conn.close()
    return time.monotonic() - t0


def queued(server: LocalServer) -> int:
    for f in admin.server_status(server.host, server.port, timeout=30)["functions"]:
        if f.function == OUTCOME_FUNCTION:
            return f.total
    return 0


def attached(server: LocalServer, pid: int) -> bool:
    return any(w.client_id.endswith(f":{pid}") and OUTCOME_FUNCTION in w.functions
               for w in admin.server_workers(server.host, server.port, timeout=30))


def one_run(base: Path, per_job: int, count: int, mode: str) -> dict:
    run = base / f"{mode}-{per_job}"
    run.mkdir()
    server = LocalServer("127.0.0.1", free_port(), run, queue_path=run / "queue.sqlite")
    server.start()
    config = run / "config.yaml"
    config.write_text(f"servers: [{server.address}]\nlog: {{dir: logs, level: warning, format: json}}\n"
                      f"outcomes: {{path: outcomes.sqlite}}\n")
    payloads = outcome_payloads(server.address, count, per_job)
    collector = None
    try:
        def start_collector() -> tuple:
            proc = spawn("collector", [PY, str(MANAGE), "--config", str(config), "outcomes", "serve"], run)
            wait_until(lambda: attached(server, proc.pid), 60, "collector attached", 0.05)
            return proc, cpu_seconds(proc.pid)

        collector, cpu0 = start_collector()  # with nothing to do: what starting costs
        if mode == "live":
            g0 = cpu_seconds(server.pid())
            t0 = time.monotonic()
            submit_s = submit(server, payloads)
        else:
            collector.stop(30)
            submit_s = submit(server, payloads)
            g0 = cpu_seconds(server.pid())
            t0 = time.monotonic()
            collector, _ = start_collector()
        wait_until(lambda: queued(server) == 0, 3600, "outcomes drained", 0.2)
        wall = time.monotonic() - t0
        cpu = cpu_seconds(collector.pid) - cpu0
        gearmand_cpu = cpu_seconds(server.pid()) - g0
        collector.stop(30)
        store = run / "outcomes.sqlite"
        db = sqlite3.connect(store)
        stored = db.execute("SELECT COUNT(*) FROM outcomes").fetchone()[0]
        db.close()
        size = sum(p.stat().st_size for p in run.glob("outcomes.sqlite*"))
    finally:
        if collector is not None:
            collector.stop(30)
        server.stop()
    scale = 100_000 / count
    return {"mode": mode, "per_job": per_job, "outcomes": count, "stored": stored, "jobs": len(payloads),
            "submit_s": round(submit_s, 2), "drain_s": round(wall, 2),
            "collector_cpu_s": round(cpu, 2), "collector_cpu_s_per_100k": round(cpu * scale, 1),
            "gearmand_cpu_s_per_100k": round(gearmand_cpu * scale, 1),
            "store_bytes": size, "store_mb_per_100k": round(size * scale / 1e6, 1),
            "bytes_per_outcome": round(size / max(stored, 1))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="20:100000,1:20000", help="PER_JOB:COUNT,... (default %(default)s)")
    p.add_argument("--mode", default="live,backlog", help="live, backlog or both (default %(default)s)")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-outcomes-") as tmp:
        for mode in args.mode.split(","):
            for spec in args.runs.split(","):
                per_job, count = (int(x) for x in spec.split(":"))
                r = one_run(Path(tmp), per_job, count, mode)
                print(json.dumps(r), flush=True)
                results.append(r)
    print(f"\n{'mode':8} {'per job':>7} {'outcomes':>9} {'drain s':>8} {'collector CPU s/100k':>21} "
          f"{'gearmand CPU s/100k':>20} {'store MB/100k':>14} {'B/outcome':>10}")
    for r in results:
        print(f"{r['mode']:8} {r['per_job']:>7} {r['outcomes']:>9} {r['drain_s']:>8} "
              f"{r['collector_cpu_s_per_100k']:>21} {r['gearmand_cpu_s_per_100k']:>20} "
              f"{r['store_mb_per_100k']:>14} {r['bytes_per_outcome']:>10}")
    return 0 if all(r["stored"] == r["outcomes"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
