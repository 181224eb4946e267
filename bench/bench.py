"""geartask benchmarks: every workload against every system, in one run, on one machine state.

    python bench/bench.py                 # full run (about 5-10 minutes on 2 cores)
    python bench/bench.py --smoke         # tiny counts: proves the benchmark still works (CI)
    python bench/bench.py --only geartask,pygearman --workloads W1,W2 --out /tmp/b

Starts its own gearmand (no persistent queue) and, for Celery and RQ, its own redis-server on
free loopback ports, and ends every process it started by pid. Writes OUT/benchmarks.json,
OUT/benchmarks.md and OUT/benchmarks.png (OUT defaults to docs/). A system that is not
installed is reported as skipped with the reason; a system that fails is reported as an
error with the reason and the run goes on. Exit status: 0 when every system ran or was
skipped, 1 when some run failed, 2 on bad arguments.

Workloads (issue 6): W1 no-op batch, W2 sequential latency, W3 background enqueue, W4 shell
jobs, W5 idle cost. Figures are only compared within one run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `bench` and geartask importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench.common import (REPO, BenchError, Env, Skip, System, Workers, cpu_seconds, latency_summary,  # noqa: E402
                          rss_mb, which)

WORKLOADS = ("W1", "W2", "W3", "W4", "W5")

PROFILES = {
    # repeat: W1 and W4 runs per configuration on the gearman systems (the median is reported)
    "full": dict(w1=5000, w1_queue=5000, scaling=[1, 2, 4, 8], repeat=5, w2=1000, w2_queue=1000, w3=20000,
                 w3_queue=5000, w4=2000, w4_queue=1000, w5_seconds=20.0, warmup=200, timeout=180.0),
    "smoke": dict(w1=40, w1_queue=20, scaling=[1, 2], repeat=1, w2=10, w2_queue=5, w3=60, w3_queue=20,
                  w4=8, w4_queue=4, w5_seconds=1.0, warmup=4, timeout=60.0),
}


def all_systems() -> list[System]:
    from bench.sys_c import CReference
    from bench.sys_celery import Celery
    from bench.sys_geartask import Geartask
    from bench.sys_geartask_tls import GeartaskTLS
    from bench.sys_noqueue import NoQueue
    from bench.sys_pygearman import PyGearman
    from bench.sys_rq import RQ
    return [Geartask(), Geartask("warning"), GeartaskTLS(), PyGearman(), CReference(), Celery(), RQ(), NoQueue()]


def optional_systems() -> list[System]:
    """Not in the default run; only with --only (measurements of alternatives)."""
    from bench.sys_geartask_haproxy import GeartaskHAProxy
    return [GeartaskHAProxy(), GeartaskHAProxy(threads=1)]


TRUST_KEYS = ("geartask-tls", "geartask-haproxy", "geartask-haproxy-1t")  # trust's cost: throughput, latency, shell jobs (issue 19)


# Which systems take part in which workload. The log-level variant is a diagnostic for W1/W4
# (the per-job log line); the no-queue reference exists only for W4.
def takes_part(system: System, workload: str) -> bool:
    if system.key == "noqueue":
        return workload == "W4"
    if system.key.startswith("geartask-log"):
        return workload in ("W1", "W4")
    if system.key in TRUST_KEYS:
        return workload in ("W1", "W2", "W4")
    return True


def is_queue(system: System) -> bool:
    return system.key in ("celery", "rq")


class Runner:
    def __init__(self, env: Env, systems: list[System], workloads: list[str], profile: dict,
                 say=print):
        self.env, self.systems, self.workloads, self.p = env, systems, workloads, profile
        self.say = say
        self.results: dict[str, dict[str, dict]] = {w: {} for w in workloads}
        self.failed = False

    def record(self, workload: str, system: System, entry: dict) -> None:
        self.results[workload][system.key] = {"label": system.label, **entry}
        status = entry.get("status")
        brief = entry.get("reason") or {k: v for k, v in entry.items() if k not in ("status", "runs", "samples")}
        self.say(f"  {workload} {system.label}: {status} {brief}")

    def guarded(self, workloads: list[str], system: System, fn) -> None:
        """Run fn(); a Skip or failure is recorded for every workload in ``workloads``."""
        try:
            fn()
        except Skip as e:
            for w in workloads:
                if system.key not in self.results[w]:
                    self.record(w, system, {"status": "skipped", "reason": str(e)})
        except Exception as e:  # a failing system must not stop the others' runs
            self.failed = True
            reason = f"{type(e).__name__}: {e}"
            if not isinstance(e, BenchError):
                reason += " | " + traceback.format_exc(limit=3).replace("\n", " ")[-600:]
            for w in workloads:
                if system.key not in self.results[w]:
                    self.record(w, system, {"status": "error", "reason": reason})

    def run(self) -> None:
        for system in self.systems:
            mine = [w for w in self.workloads if takes_part(system, w)]
            if not mine:
                continue
            self.say(f"{system.label}:")
            try:
                system.check(self.env)
            except Skip as e:
                for w in mine:
                    self.record(w, system, {"status": "skipped", "reason": str(e)})
                continue
            try:
                reverse = [w for w in mine if w in ("W1", "W2", "W3")]
                if reverse:
                    self.guarded(reverse, system, lambda: self.reverse_workloads(system, reverse))
                if "W4" in mine:
                    self.guarded(["W4"], system, lambda: self.w4(system))
            finally:
                system.close()
        if "W5" in self.workloads:
            self.w5([s for s in self.systems if takes_part(s, "W5")])

    # -- W1, W2, W3 on one set of workers (1 process x 4 threads), then W1's scaling curve --------------
    def reverse_workloads(self, system: System, mine: list[str]) -> None:
        p, env = self.p, self.env
        queue = is_queue(system)
        timeout = p["timeout"]
        with system.start(env, "reverse", 1, 4) as workers:
            system.batch(env, p["warmup"], timeout)  # connections, imports, caches
            if "W1" in mine:
                n = p["w1_queue"] if queue else p["w1"]
                runs = [self.w1_once(system, workers, n, 1, 4, 1 if queue else p["repeat"])]
            if "W2" in mine:
                n = p["w2_queue"] if queue else p["w2"]
                lat = system.sequential(env, n, timeout)
                workers.check_alive()
                self.record("W2", system, {"status": "ok", **latency_summary(lat)})
            if "W3" in mine:
                n = p["w3_queue"] if queue else p["w3"]
                t0 = time.perf_counter()
                system.background(env, n, timeout)
                submit = time.perf_counter() - t0
                drain = system.drained(env, timeout)
                workers.check_alive()
                self.record("W3", system, {"status": "ok", "jobs": n, "submit_seconds": round(submit, 4),
                                           "submit_per_s": round(n / submit, 1),
                                           "drain_seconds_after_submit": round(drain, 4),
                                           "total_seconds": round(submit + drain, 4)})
        if "W1" not in mine:
            return
        if not queue and not system.key.startswith(("geartask-log", *TRUST_KEYS)):
            for procs in p["scaling"]:
                with system.start(env, "reverse", procs, 1) as workers:
                    system.batch(env, p["warmup"], timeout)
                    runs.append(self.w1_once(system, workers, p["w1"], procs, 1, p["repeat"]))
        self.record("W1", system, {"status": "ok", "jobs": runs[0]["jobs"], "jobs_per_s": runs[0]["jobs_per_s"],
                                   "runs": runs})

    def w1_once(self, system: System, workers: Workers, n: int, procs: int, threads: int, repeat: int) -> dict:
        samples = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            system.batch(self.env, n, self.p["timeout"])
            samples.append(n / (time.perf_counter() - t0))
            workers.check_alive()
        rate = statistics.median(samples)
        self.say(f"    W1 {system.label} {procs}x{threads}: {rate:,.0f} jobs/s")
        return {"processes": procs, "threads": threads, "jobs": n, "jobs_per_s": round(rate, 1),
                "samples": [round(s, 1) for s in samples]}

    # -- W4 -------------------------------------------------------------------------------------
    def w4(self, system: System) -> None:
        env, p = self.env, self.p
        n = p["w4_queue"] if is_queue(system) else p["w4"]
        samples = []
        with system.start(env, "shell", 1, 4) as workers:
            system.shell_batch(env, max(2, p["warmup"] // 10), p["timeout"])
            for _ in range(1 if is_queue(system) else p["repeat"]):
                t0 = time.perf_counter()
                system.shell_batch(env, n, p["timeout"])
                samples.append(n / (time.perf_counter() - t0))
                workers.check_alive()
        self.record("W4", system, {"status": "ok", "jobs": n, "jobs_per_s": round(statistics.median(samples), 1),
                                   "samples": [round(x, 1) for x in samples]})

    # -- W5: every system's idle workers at once, measured over the same seconds -----------------
    def w5(self, systems: list[System]) -> None:
        self.say("W5 (all systems idle at once):")
        started: list[tuple[System, Workers]] = []
        try:
            for system in systems:
                def go(system=system):
                    system.check(self.env)
                    started.append((system, system.start(self.env, "idle", 1, 10)))
                self.guarded(["W5"], system, go)
            time.sleep(min(2.0, self.p["w5_seconds"]))  # let start-up work settle
            before = {}
            for system, workers in started:
                self.guarded(["W5"], system, lambda s=system, w=workers: before.__setitem__(
                    s.key, sum(cpu_seconds(pid) for pid in w.pids)))
            t0 = time.monotonic()
            time.sleep(self.p["w5_seconds"])
            wall = time.monotonic() - t0
            for system, workers in started:
                if system.key not in before:
                    continue

                def measure(system=system, workers=workers):
                    workers.check_alive()
                    cpu = sum(cpu_seconds(pid) for pid in workers.pids) - before[system.key]
                    rss = sum(rss_mb(pid) for pid in workers.pids)
                    self.record("W5", system, {"status": "ok", "seconds": round(wall, 2),
                                               "processes": len(workers.pids), "cpu_seconds": round(cpu, 3),
                                               "cpu_percent_of_core": round(100 * cpu / wall, 3),
                                               "rss_mb": round(rss, 1)})
                self.guarded(["W5"], system, measure)
        finally:
            for _system, workers in started:
                workers.stop()
            for system in systems:
                system.close()


# -- the environment: gearmand and redis-server of our own -----------------------------------------
def start_gearmand(run_dir: Path):
    from geartask.server import LocalServer, free_port
    server = LocalServer(host="127.0.0.1", port=free_port(), run_dir=run_dir, queue_type="none")
    server.start()
    return server


class ExternalServer:
    """A gearmand someone else runs (--gearmand): used as it is, never stopped by us."""

    def __init__(self, address: str):
        from geartask.address import split_address
        self.host, self.port = split_address(address)  # [v6]:port too
        self.address = address

    def stop(self) -> None:
        pass


class Redis:
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.proc = None
        self.url = None
        self.version = ""

    def start(self) -> None:
        from bench.common import spawn, wait_until
        from geartask.server import free_port
        exe = which("redis-server")
        if exe is None:
            raise Skip("redis-server is not installed (scripts/install-bench.sh installs it)")
        port = free_port()
        self.proc = spawn("redis-server", [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                           "--appendonly", "no", "--dir", str(self.run_dir),
                                           "--protected-mode", "yes"], self.run_dir)

        def pong():
            if not self.proc.alive():
                raise BenchError(f"redis-server exited: {self.proc.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    return s.recv(16).startswith(b"+PONG")
            except OSError:
                return False
        wait_until(pong, 15, "redis-server to answer", 0.05)
        self.url = f"redis://127.0.0.1:{port}/0"
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
        self.version = out.split(" v=")[1].split()[0] if " v=" in out else out.strip()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(10)


def machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": mem, "kernel": platform.release(),
            "os": _os_name(), "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in load] if load else None}


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()


def gearmand_version() -> str:
    try:
        out = subprocess.run([which("gearmand") or "gearmand", "--version"], capture_output=True, text=True,
                             timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError):
        return "?"


# -- main -------------------------------------------------------------------------------------------
def parse_args(argv):
    ap = argparse.ArgumentParser(prog="bench", description="geartask benchmarks (issue 6)")
    ap.add_argument("--smoke", action="store_true", help="tiny counts; proves the benchmark runs (CI)")
    ap.add_argument("--out", type=Path, default=REPO / "docs",
                    help="folder for benchmarks.json/.md/.png (default: docs/)")
    ap.add_argument("--only", help="comma-separated system keys (geartask, geartask-log-warning, pygearman, "
                                   "c, celery, rq, noqueue; geartask-haproxy only this way)")
    ap.add_argument("--workloads", help="comma-separated workloads (default: W1,W2,W3,W4,W5)")
    ap.add_argument("--no-chart", action="store_true", help="skip the PNG")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite benchmarks.md/.png from OUT/benchmarks.json (after editing bench/findings.md)")
    ap.add_argument("--gearmand", metavar="HOST:PORT",
                    help="use this running gearmand instead of starting one (bench/net.py: across the test network)")
    ap.add_argument("--worker-prefix", default="", metavar="CMD",
                    help="put CMD before every worker command, e.g. 'ip netns exec NS' (bench/net.py)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a count of the profile, e.g. --set w1=1000 --set repeat=1 (development)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    if args.report_only:
        from bench.report import write_outputs
        try:
            doc = json.loads((args.out / "benchmarks.json").read_text())
        except (OSError, ValueError) as e:
            print(f"bench: --report-only: cannot read {args.out / 'benchmarks.json'}: {e}", file=sys.stderr)
            return 2
        print("wrote " + ", ".join(str(p) for p in write_outputs(doc, args.out, chart=not args.no_chart)))
        return 0
    profile = dict(PROFILES["smoke" if args.smoke else "full"])
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in profile:
            print(f"bench: --set: unknown key {key!r} (use {', '.join(profile)})", file=sys.stderr)
            return 2
        try:
            profile[key] = json.loads(value) if key == "scaling" else type(profile[key])(value)
        except ValueError:
            print(f"bench: --set {item}: not a valid value", file=sys.stderr)
            return 2
    workloads = list(WORKLOADS)
    if args.workloads:
        workloads = [w.strip().upper() for w in args.workloads.split(",") if w.strip()]
        bad = [w for w in workloads if w not in WORKLOADS]
        if bad:
            print(f"bench: unknown workload(s) {', '.join(bad)} (use {', '.join(WORKLOADS)})", file=sys.stderr)
            return 2
    if args.gearmand:
        from geartask.address import split_address
        try:
            split_address(args.gearmand)
        except ValueError as e:
            print(f"bench: --gearmand {args.gearmand!r}: {e} (expected HOST:PORT or [V6]:PORT)", file=sys.stderr)
            return 2
    import shlex
    from bench import common
    common.COMMAND_PREFIX[:] = shlex.split(args.worker_prefix)
    systems = all_systems()
    if args.only:
        systems += optional_systems()
        keys = [k.strip() for k in args.only.split(",") if k.strip()]
        unknown = [k for k in keys if k not in {s.key for s in systems}]
        if unknown:
            print(f"bench: unknown system(s) {', '.join(unknown)} "
                  f"(use {', '.join(s.key for s in systems)})", file=sys.stderr)
            return 2
        systems = [s for s in systems if s.key in keys]

    # SIGTERM must unwind through the finally blocks that stop our processes.
    def on_term(signum, frame):
        raise KeyboardInterrupt
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)

    started = dt.datetime.now(dt.timezone.utc)
    machine_at_start = machine()  # the load average then, not after our own run
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="geartask-bench-") as tmp:
        run_dir = Path(tmp)
        gearmand = ExternalServer(args.gearmand) if args.gearmand else start_gearmand(run_dir)
        redis = Redis(run_dir)
        env = Env(run_dir=run_dir, gearmand=gearmand, smoke=args.smoke)
        try:
            if any(s.key in ("celery", "rq") for s in systems):
                try:
                    try:
                        import redis as _redis_py  # noqa: F401  (Celery's and RQ's client)
                    except ImportError:
                        raise Skip("redis-py is not installed (pip install -e '.[bench]')") from None
                    redis.start()
                    env.redis_url = redis.url
                except (Skip, BenchError) as e:
                    env.redis_reason = str(e)
            print(f"gearmand on {gearmand.address}" + (f", redis on {redis.url}" if redis.url else
                                                        f", no redis ({env.redis_reason})"), flush=True)
            runner = Runner(env, systems, workloads, profile, say=lambda m: print(m, flush=True))
            runner.run()
        finally:
            redis.stop()
            gearmand.stop()
    versions = {"gearmand": gearmand_version(), "redis-server": redis.version or None}
    for s in systems:
        try:
            v = s.version()
        except Exception:
            v = ""
        if v:
            versions[s.key] = v
    from bench.report import targets, write_outputs
    doc = {"generated": started.isoformat(timespec="seconds"), "mode": "smoke" if args.smoke else "full",
           "duration_seconds": round(time.monotonic() - t_start, 1), "machine": machine_at_start, "versions": versions,
           "profile": profile, "workloads": workloads, "systems": {s.key: {"label": s.label, "note": s.note}
                                                                 for s in systems},
           "results": runner.results}
    doc["targets"] = targets(doc)
    written = write_outputs(doc, args.out, chart=not args.no_chart)
    print("wrote " + ", ".join(str(p) for p in written))
    return 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main())
