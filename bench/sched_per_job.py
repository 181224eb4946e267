"""Scheduler time per job, process by process: time on a CPU, time runnable but waiting for
one, and slices (context switches in), for W1 or W2 through one geartask worker process.

    python bench/sched_per_job.py W1 --rounds 3
    python bench/sched_per_job.py W2 --threads 4 --rounds 2

Reads /proc/<pid>/task/*/schedstat of the worker, gearmand and this process (the sender)
around each batch, and /proc/stat for how busy the whole machine was: on two shared cores a
job's threads often wait for a CPU rather than for gearmand or the GIL (docs/benchmarks.md,
"W1 1 x 4 against C"). Starts its own gearmand and worker and ends each by pid.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench.bench import start_gearmand  # noqa: E402
from bench.common import Env  # noqa: E402


def schedstat(pid: int) -> tuple[int, int, int]:
    """(ns on a CPU, ns runnable and waiting, slices), summed over the process's threads."""
    run = wait = slices = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            a, b, c = map(int, (task / "schedstat").read_text().split())
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
        run, wait, slices = run + a, wait + b, slices + c
    return run, wait, slices


def machine() -> tuple[int, int]:
    """(all jiffies, idle + iowait jiffies) from /proc/stat."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(v), v[3] + v[4]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workload", choices=["W1", "W2"])
    ap.add_argument("--jobs", type=int, help="per batch (W1: 5000, W2: 1000)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args(argv)
    n = args.jobs or (5000 if args.workload == "W1" else 1000)
    from bench.sys_geartask import Geartask
    with tempfile.TemporaryDirectory(prefix="geartask-sched-") as tmp:
        gearmand = start_gearmand(Path(tmp))
        env = Env(run_dir=Path(tmp), gearmand=gearmand)
        system = Geartask()
        workers = None
        try:
            workers = system.start(env, "reverse", 1, args.threads)
            system.batch(env, 500, 60)  # connections, imports, caches
            system.sequential(env, 50, 60)
            pids = {"worker": workers.procs[0].pid, "gearmand": gearmand.pid(), "sender": os.getpid()}
            for i in range(args.rounds):
                before, m0 = {k: schedstat(p) for k, p in pids.items()}, machine()
                t0 = time.perf_counter()
                extra = ""
                if args.workload == "W1":
                    system.batch(env, n, 300)
                else:
                    lat = sorted(system.sequential(env, n, 300))
                    extra = f" p50 {lat[len(lat) // 2] * 1e3:.3f} ms"
                seconds = time.perf_counter() - t0
                after, m1 = {k: schedstat(p) for k, p in pids.items()}, machine()
                busy = 1 - (m1[1] - m0[1]) / max(1, m1[0] - m0[0])
                parts = "; ".join(
                    f"{k} run {(after[k][0] - before[k][0]) / n / 1e3:.0f} µs, waiting "
                    f"{(after[k][1] - before[k][1]) / n / 1e3:.0f} µs, {(after[k][2] - before[k][2]) / n:.1f} slices"
                    for k in pids)
                print(f"{args.workload} 1x{args.threads} round {i}: {n / seconds:,.0f} jobs/s{extra} | per job: {parts} | "
                      f"machine {busy * 100:.0f}% busy, load {os.getloadavg()[0]:.1f}", flush=True)
        finally:
            if workers is not None:
                workers.stop()
            system.close()
            gearmand.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
