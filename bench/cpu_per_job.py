"""CPU time per job, process by process: the worker, the commands it ran, gearmand, the sender
(and the terminator with trust: stunnel, or haproxy), for W1, W2 or W4 on geartask or geartask (tls+signed).

    python bench/cpu_per_job.py W4 --jobs 2000 --rounds 3
    python bench/cpu_per_job.py W2 --system tls --jobs 500

Wall-clock rates on a shared 2-core machine move by 20 % and more between runs; CPU seconds
per job (user + system, from /proc around each batch) move far less, so they tell where a
job's cost goes and whether a change cut it (docs/benchmarks.md, "Shell jobs, part by part").
Starts its own gearmand, one worker process x --threads and, for tls, stunnel (haproxy: HAProxy); ends each by pid.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench.bench import start_gearmand  # noqa: E402
from bench.common import CLK_TCK, Env  # noqa: E402


def cpu(pid: int, children: bool = False) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12]) + ((int(fields[13]) + int(fields[14])) if children else 0)
    return ticks / CLK_TCK


def own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workload", choices=["W1", "W2", "W4"])
    ap.add_argument("--system", choices=["plain", "tls", "haproxy", "haproxy-1t"], default="plain")
    ap.add_argument("--jobs", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=4)
    args = ap.parse_args(argv)
    from bench.sys_geartask import Geartask
    from bench.sys_geartask_haproxy import GeartaskHAProxy
    from bench.sys_geartask_tls import GeartaskTLS
    with tempfile.TemporaryDirectory(prefix="geartask-cpu-") as tmp:
        gearmand = start_gearmand(Path(tmp))
        env = Env(run_dir=Path(tmp), gearmand=gearmand)
        system = {"tls": GeartaskTLS, "haproxy": GeartaskHAProxy, "haproxy-1t": lambda: GeartaskHAProxy(threads=1),
                  }.get(args.system, Geartask)()
        workers = None
        try:
            workers = system.start(env, "shell" if args.workload == "W4" else "reverse", 1, args.threads)
            worker = workers.procs[0].pid
            stunnel = [system.terminator_pid()] if args.system != "plain" else []  # stunnel or haproxy
            system.batch(env, 200, 60)  # connections, imports, caches
            if args.workload == "W4":
                system.shell_batch(env, 100, 60)
            for _ in range(args.rounds):
                before = (cpu(worker), cpu(worker, True), cpu(gearmand.pid()), own_cpu(), [cpu(p) for p in stunnel])
                t0 = time.perf_counter()
                latencies = None
                if args.workload == "W4":
                    system.shell_batch(env, args.jobs, 300)
                elif args.workload == "W2":
                    latencies = sorted(system.sequential(env, args.jobs, 300))
                else:
                    system.batch(env, args.jobs, 300)
                seconds = time.perf_counter() - t0
                after = (cpu(worker), cpu(worker, True), cpu(gearmand.pid()), own_cpu(), [cpu(p) for p in stunnel])

                def us(i: int) -> float:
                    return (after[i] - before[i]) / args.jobs * 1e6
                line = (f"{args.system} {args.workload}: {args.jobs / seconds:,.0f} jobs/s; CPU per job: worker "
                        f"{us(0):.0f} µs, commands {us(1) - us(0):.0f} µs, gearmand {us(2):.0f} µs, "
                        f"sender {us(3):.0f} µs")
                if stunnel:
                    name = "stunnel" if args.system == "tls" else "haproxy"
                    line += f", {name} {(after[4][0] - before[4][0]) / args.jobs * 1e6:.0f} µs"
                if latencies:
                    line += f"; p50 {latencies[len(latencies) // 2] * 1e3:.3f} ms"
                print(line + f" (load {os.getloadavg()[0]:.1f})", flush=True)
        finally:
            if workers is not None:
                workers.stop()
            system.close()
            gearmand.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
