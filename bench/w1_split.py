"""W1 1 x 4 split: which end bounds the no-op batch rate? Each sender against each worker.

    python bench/w1_split.py --jobs 5000 --rounds 3

Senders: geartask's JobSender and libgearman's client (C); workers: one geartask worker
process x 4 threads, and 4 C `gearman -w` processes. For each pair: jobs/s and CPU µs per job
of the worker(s), gearmand and the sender, from /proc around each batch. Starts its own
gearmand and workers and ends each by pid (docs/benchmarks.md, "W1 1 x 4").
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench.bench import start_gearmand  # noqa: E402
from bench.common import Env, payloads  # noqa: E402
from bench.cpu_per_job import cpu, own_cpu  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--pairs", default="gg,gc,cg,cc", help="sender+worker: g = geartask, c = C")
    args = ap.parse_args(argv)
    from bench.sys_c import TASK as C_TASK, CClient, CReference
    from bench.sys_geartask import TASK as G_TASK, Geartask
    with tempfile.TemporaryDirectory(prefix="geartask-split-") as tmp:
        gearmand = start_gearmand(Path(tmp))
        env = Env(run_dir=Path(tmp), gearmand=gearmand)
        g, c = Geartask(), CReference()
        started = []
        try:
            gw = g.start(env, "reverse", 1, args.threads)
            started.append(gw)
            cw = c.start(env, "reverse", 1, args.threads)
            started.append(cw)
            sender = g.sender(env)
            client = CClient(env.host, env.port)
            fn = {"g": G_TASK, "c": C_TASK}
            pids = {"g": [p.pid for p in gw.procs], "c": [p.pid for p in cw.procs]}

            def send(who: str, task: str, n: int) -> None:
                if who == "g":
                    res = sender.submit_many([{"task": task, "data": p} for p in payloads(n)], wait=True,
                                             timeout=120)
                    bad = [r for r in res if r.state != "complete"]
                    if bad:
                        raise SystemExit(f"{len(bad)} jobs not complete: {bad[0].state} {bad[0].error}")
                else:
                    client.run_batch(task.encode(), [p.encode() for p in payloads(n)])

            for pair in args.pairs.split(","):
                s, w = pair[0], pair[1]
                send(s, fn[w], 200)  # warm-up
                rates, cw_us, gd_us, s_us = [], [], [], []
                for _ in range(args.rounds):
                    b = (sum(cpu(p) for p in pids[w]), cpu(gearmand.pid()), own_cpu())
                    t0 = time.perf_counter()
                    send(s, fn[w], args.jobs)
                    dt = time.perf_counter() - t0
                    a = (sum(cpu(p) for p in pids[w]), cpu(gearmand.pid()), own_cpu())
                    rates.append(args.jobs / dt)
                    cw_us.append((a[0] - b[0]) / args.jobs * 1e6)
                    gd_us.append((a[1] - b[1]) / args.jobs * 1e6)
                    s_us.append((a[2] - b[2]) / args.jobs * 1e6)
                med = statistics.median
                names = {"g": "geartask", "c": "C"}
                print(f"sender {names[s]:8} worker {names[w]:8}: {med(rates):7,.0f} jobs/s "
                      f"({', '.join(f'{r:,.0f}' for r in rates)}); CPU µs/job: worker {med(cw_us):.0f}, "
                      f"gearmand {med(gd_us):.0f}, sender {med(s_us):.0f} (load {os.getloadavg()[0]:.1f})",
                      flush=True)
            client.close()
        finally:
            for w in started:
                w.stop()
            g.close()
            gearmand.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
