"""A fleet of worker processes against two job servers: throughput, failures, admin and shutdown times.

    python bench/fleet.py --processes 200 --threads 4 --jobs 3000 --runs 3 [--json OUT]

Starts two gearmand servers (queue type none, free loopback ports) and N runworkers processes
x T threads serving the bench's no-op task on both, in parallel batches, and waits until every
thread is registered on both servers before timing anything. Then, per run, J foreground jobs
through JobSender (jobs/s, failed jobs); the real `geartask manage workers` and `manage status`
against both servers (seconds each); the fleet's idle CPU over --idle seconds (per worker
process, from /proc/PID/stat) and each gearmand's; and finally `geartask manage shutdown` and
the seconds until every worker process has exited. Every process it starts is ended by its pid;
every wait has a deadline. Prints a JSON document (also written to --json). Exit 0 when no job
failed and the fleet shut down, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

from bench.common import PY, REPO, BenchError, Proc, cpu_seconds, rss_mb, spawn, wait_until  # noqa: E402
from geartask.errors import GeartaskError  # noqa: E402
from geartask.gearman import admin_command  # noqa: E402
from geartask.server import LocalServer, free_port  # noqa: E402

TASK = "bench.reverse"
GEARTASK = [PY, "-m", "geartask"]
BATCH = 20  # worker processes started at once: 2 cores, each import costs about half a second


def write_config(run_dir: Path, servers: list[LocalServer]) -> Path:
    path = run_dir / "fleet.yaml"
    path.write_text(f"""servers: [{', '.join(f'"{s.address}"' for s in servers)}]
log:
  dir: "{run_dir / 'logs'}"
  level: warning
  format: json
plugins:
  paths: ["{REPO / 'bench' / 'plugins'}"]
  enabled: [benchtasks]
worker:
  grace: 5
""")
    return path


def available(server: LocalServer) -> int:
    """Worker connections that can take TASK on this server (gearmand's 'status')."""
    try:
        for line in admin_command(server.host, server.port, "status", timeout=10):
            parts = line.split("\t")
            if len(parts) >= 4 and parts[0] == TASK:
                return int(parts[3])
    except (OSError, GeartaskError):  # not up yet, or too busy to answer: ask again
        return -1
    return 0


def manage(config: Path, *args: str, timeout: float = 120) -> tuple[float, subprocess.CompletedProcess]:
    """Run `geartask manage ARGS` as a user would; seconds until it answered, and its result
    (``proc.cpu_seconds``: the CPU the command used, so a loaded machine's waiting shows apart)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([*GEARTASK, "--config", str(config), "manage", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=str(REPO),
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc.cpu_seconds = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 3)
    return seconds, proc


def library_seconds(servers: list[LocalServer]) -> dict:
    """The admin library's own time for workers (with pings) and status, without the CLI's start."""
    from geartask.fleet import Admin
    admin = Admin([(s.host, s.port) for s in servers])
    out = {}
    for name, call in (("workers", admin.workers), ("status", admin.status)):
        t0 = time.perf_counter()
        results = call()
        out[f"{name}_library_seconds"] = round(time.perf_counter() - t0, 3)
        if not all(r.ok for r in results):
            out[f"{name}_library_error"] = next(r.error for r in results if not r.ok)
    return out


def start_fleet(config: Path, run_dir: Path, servers: list[LocalServer], processes: int, threads: int,
                timeout: float) -> list[Proc]:
    procs: list[Proc] = []
    deadline = time.monotonic() + timeout
    for first in range(0, processes, BATCH):
        for i in range(first, min(processes, first + BATCH)):
            procs.append(spawn(f"worker-{i}", [PY, str(REPO / "worker_client" / "runworkers.py"), "--config",
                                               str(config), "--name", f"fleet{i}", "--threads", str(threads)],
                               run_dir))
        want = len(procs) * threads

        def batch_registered():
            dead = [p for p in procs if not p.alive()]
            if dead:
                raise BenchError(f"{dead[0].name} exited with status {dead[0].popen.returncode}: {dead[0].tail()}")
            return all(available(s) >= want for s in servers)
        wait_until(batch_registered, max(1.0, deadline - time.monotonic()),
                   f"{want} worker threads registered on both servers", 0.2)
    return procs


def run_jobs(config: Path, jobs: int, timeout: float) -> dict:
    from geartask.config import load_config
    from geartask.sender.sender import JobSender
    sender = JobSender(load_config(config))
    try:
        batch = [{"task": TASK, "data": f"fleet-{i:06d}"} for i in range(jobs)]
        t0 = time.perf_counter()
        results = sender.submit_many(batch, wait=True, timeout=timeout)
        seconds = time.perf_counter() - t0
    finally:
        sender.close()
    failed = [r for r in results if r.state != "complete"]
    wrong = [r for r, j in zip(results, batch, strict=True) if r.state == "complete" and r.result != j["data"][::-1]]
    first = failed[0] if failed else None
    return {"jobs": jobs, "returned": len(results), "seconds": round(seconds, 3),
            "jobs_per_s": round(jobs / seconds, 1), "failed": len(failed) + len(wrong) + (jobs - len(results)),
            "first_failure": f"{first.state}: {first.error}" if first else None}


def idle_cpu(procs: list[Proc], servers: list[LocalServer], seconds: float) -> dict:
    pids = [p.pid for p in procs if p.alive()]
    gpids = [s.pid() for s in servers]
    before = {pid: cpu_seconds(pid) for pid in pids + gpids}
    time.sleep(seconds)  # measuring idleness: nothing to wait for
    used = {pid: cpu_seconds(pid) - before[pid] for pid in pids + gpids if Path(f"/proc/{pid}").exists()}
    per = sorted(100 * used[p] / seconds for p in pids if p in used)
    return {"seconds": seconds, "processes": len(per),
            "worker_percent_of_core_mean": round(statistics.mean(per), 3) if per else None,
            "worker_percent_of_core_max": round(per[-1], 3) if per else None,
            "fleet_percent_of_core_total": round(sum(per), 2),
            "worker_rss_mb_mean": round(statistics.mean(rss_mb(p) for p in pids), 1) if pids else None,
            "gearmand_percent_of_core": [round(100 * used.get(g, 0) / seconds, 3) for g in gpids]}


def shutdown(config: Path, procs: list[Proc], timeout: float) -> dict:
    gone0 = time.perf_counter()
    answered, proc = manage(config, "shutdown", "--wait", "0", timeout=timeout)
    try:
        wait_until(lambda: not any(p.alive() for p in procs), max(1.0, timeout - answered),
                   "every worker process to exit", 0.05)
        exited = time.perf_counter() - gone0
    except BenchError:
        exited = None
    return {"command_seconds": round(answered, 3), "command_status": proc.returncode,
            "all_exited_seconds": round(exited, 3) if exited is not None else None,
            "still_running": sum(p.alive() for p in procs), "statuses": sorted({p.popen.poll() for p in procs
                                                                                if not p.alive()})}


def run(args, run_dir: Path) -> dict:
    servers = [LocalServer("127.0.0.1", free_port(), run_dir, queue_type="none") for _ in range(2)]
    procs: list[Proc] = []
    out: dict = {"processes": args.processes, "threads": args.threads, "jobs_per_run": args.jobs,
                 "servers": [s.address for s in servers], "machine": {"cores": os.cpu_count(),
                                                                      "load_before": os.getloadavg()}}
    try:
        for s in servers:
            s.start()
        config = write_config(run_dir, servers)
        t0 = time.perf_counter()
        procs = start_fleet(config, run_dir, servers, args.processes, args.threads, args.start_timeout)
        out["start_seconds"] = round(time.perf_counter() - t0, 2)
        runs = []
        for _ in range(args.runs):
            r = run_jobs(config, args.jobs, args.job_timeout)
            w_s, w = manage(config, "--json", "workers")
            s_s, st = manage(config, "--json", "status")
            r.update(workers_seconds=round(w_s, 3), workers_cpu_seconds=w.cpu_seconds, workers_status=w.returncode,
                     status_seconds=round(s_s, 3), status_cpu_seconds=st.cpu_seconds, status_status=st.returncode,
                     **library_seconds(servers), load=round(os.getloadavg()[0], 1))
            if w.returncode != 0 or st.returncode != 0:
                r["manage_error"] = (w.stderr or st.stderr).strip()[-300:]
            runs.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
        out["runs"] = runs
        out["failed"] = sum(r["failed"] for r in runs)
        out["jobs_per_s_median"] = statistics.median(r["jobs_per_s"] for r in runs) if runs else None
        out["idle"] = idle_cpu(procs, servers, args.idle)
        out["shutdown"] = shutdown(config, procs, args.shutdown_timeout)
        out["machine"]["load_after"] = os.getloadavg()
        return out
    finally:
        for p in procs:  # those the shutdown missed (or all, after an error): SIGTERM, then SIGKILL
            if p.alive():
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in procs:
            p.stop(10)
        for s in servers:
            s.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/fleet.py", description=__doc__.split("\n")[0])
    ap.add_argument("--processes", type=int, default=200)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=3000, help="foreground jobs per run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measured")
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument("--job-timeout", type=float, default=300.0)
    ap.add_argument("--shutdown-timeout", type=float, default=120.0)
    ap.add_argument("--json", type=Path, dest="json_out", help="also write the result here")
    args = ap.parse_args(argv)
    for name in ("processes", "threads", "jobs", "runs"):
        if getattr(args, name) < 1:
            print(f"bench/fleet.py: --{name} must be at least 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    # SIGTERM unwinds like ^C, so the finally blocks end every process we started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="geartask-fleet-") as tmp:
        try:
            result = run(args, Path(tmp))
            ok = result["failed"] == 0 and result["shutdown"]["still_running"] == 0
        except BenchError as e:
            result, ok = {"processes": args.processes, "threads": args.threads, "error": str(e)}, False
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
