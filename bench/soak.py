"""The soak: a steady stream of jobs while a chaos loop breaks things; then count every run.

    python bench/soak.py --minutes 30 [--rate 50] [--json OUT]     # make soak MINUTES=30

Starts two gearmand servers with the sqlite queue (free loopback ports), the outcomes collector,
a proxy between the workers and server B (bench-local, tests/netproxy.py's SliceProxy) and
--processes runworkers processes. Two senders (JobSender, one foreground, one background) send
--rate jobs a second between them, each with a unique key; the task (bench/plugins/soaktasks.py)
appends the key to a per-run file, so every run is counted. Meanwhile a bounded chaos loop,
every --chaos-every seconds (seeded), does one of: kill -9 a worker (and start a new one),
kill -9 a gearmand and restart it on the same port and queue file, kill -9 the collector (and
restart it), cut the workers' link to B (bytes held) for a few seconds, or drop that link
(every connection closed, the proxy restarted on the same port).

At the end it restores everything, waits (with a deadline) until every job has run and every
outcome is stored, and prints: jobs sent, completed, lost, run twice (each matched to a
docs/sender.md "When a job can run twice" case by what the chaos loop did around its runs),
outcomes expected vs stored. Exit 0 when nothing is lost and every double run is explained,
1 otherwise, 2 for bad arguments. Every process it starts is ended by its pid.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from bench.common import PY, REPO, BenchError, Proc, spawn, wait_until  # noqa: E402
from geartask.errors import GeartaskError  # noqa: E402
from geartask.gearman import admin_command  # noqa: E402
from geartask.server import LocalServer, free_port  # noqa: E402
from netproxy import SliceProxy  # noqa: E402

TASK = "soak.record"
MANAGE = REPO / "manage_client" / "manage_client.py"
ACTIONS = ("kill_worker", "restart_gearmand", "kill_collector", "cut_link", "drop_link")

# What a double run near each chaos action is (docs/sender.md, "When a job can run twice").
CASES = {
    "restart_gearmand": "sender.md case 2: its server died and was restarted while the job ran "
                        "(resubmitted, or run again from the sqlite queue)",
    "kill_worker": "sender.md case 5: the job finished on a worker killed -9 before its answer "
                   "went out; gearmand gave it to another worker",
    "drop_link": "sender.md case 5, by the link: the worker-server connection was closed after "
                 "the job finished and before its answer reached gearmand, which requeued it",
    "cut_link": "sender.md case 5, by the link: the cut held the answer; the connection closed "
                "before it reached gearmand, which requeued the job",
}


def write_config(path: Path, run_dir: Path, servers: list[str]) -> Path:
    path.write_text(f"""servers: [{', '.join(f'"{s}"' for s in servers)}]
log:
  dir: "{run_dir / 'logs'}"
  level: warning
  format: json
plugins:
  paths: ["{REPO / 'bench' / 'plugins'}"]
  enabled: [soaktasks]
outcomes:
  path: "{run_dir / 'outcomes.sqlite'}"
worker:
  grace: 5
""")
    return path


class Soak:
    def __init__(self, args, run_dir: Path):
        self.args, self.run_dir = args, run_dir
        self.rng = random.Random(args.seed)
        self.runs_file = run_dir / "runs.txt"
        self.servers = [LocalServer("127.0.0.1", free_port(), run_dir, queue_type="sqlite",
                                    queue_path=run_dir / f"queue-{n}.sqlite") for n in "AB"]
        self.proxy_port = free_port()
        self.proxy: SliceProxy | None = None
        self.workers: list[Proc] = []
        self.collector: Proc | None = None
        self.events: list[dict] = []  # chaos: action, start, end, target
        self.sent: dict[str, dict] = {}  # key -> {background, sent_at, state}
        self.lock = threading.Lock()
        self.stop_stream = threading.Event()
        self.errors: list[str] = []
        self.spawned = 0

    # -- parts ---------------------------------------------------------------------------------
    def start_proxy(self) -> None:
        b = self.servers[1]
        self.proxy = SliceProxy((b.host, b.port), listen_port=self.proxy_port, slice_down=False,
                                slice_up=False, pause_chance=0.0).start()

    def start_worker(self) -> Proc:
        self.spawned += 1
        p = spawn(f"worker-{self.spawned}", [PY, str(REPO / "worker_client" / "runworkers.py"), "--config",
                                             str(self.worker_config), "--name", f"soak{self.spawned}",
                                             "--threads", str(self.args.threads)], self.run_dir,
                  env={"GEARTASK_SOAK_RUNS": str(self.runs_file)})
        self.workers.append(p)
        return p

    def start_collector(self) -> None:
        self.collector = spawn("collector", [PY, str(MANAGE), "--config", str(self.config), "outcomes", "serve"],
                               self.run_dir)

    def available(self, server: LocalServer) -> int:
        try:
            for line in admin_command(server.host, server.port, "status", timeout=5):
                parts = line.split("\t")
                if len(parts) >= 4 and parts[0] == TASK:
                    return int(parts[3])
        except (OSError, GeartaskError):  # restarting, or too busy to answer: ask again
            return -1
        return 0

    def queued(self) -> int:
        """TASK's jobs queued or running on both servers; -1 when one can't tell."""
        total = 0
        for s in self.servers:
            try:
                lines = admin_command(s.host, s.port, "status", timeout=5)
            except (OSError, GeartaskError):
                return -1
            for line in lines:
                parts = line.split("\t")
                if len(parts) >= 4 and parts[0] == TASK:
                    total += int(parts[1])
        return total

    def start(self) -> None:
        for s in self.servers:
            s.start()
        self.start_proxy()
        a, b = self.servers
        self.config = write_config(self.run_dir / "soak.yaml", self.run_dir, [a.address, b.address])
        self.worker_config = write_config(self.run_dir / "worker.yaml", self.run_dir,
                                          [a.address, f"127.0.0.1:{self.proxy_port}"])
        self.start_collector()
        for _ in range(self.args.processes):
            self.start_worker()
        want = self.args.processes * self.args.threads
        wait_until(lambda: all(self.available(s) >= want for s in self.servers), 120,
                   f"{want} worker threads on both servers", 0.2)

    def close(self) -> None:
        self.stop_stream.set()
        procs = [p for p in self.workers] + ([self.collector] if self.collector else [])
        for p in procs:
            p.stop(10)
        if self.proxy:
            self.proxy.stop()
        for s in self.servers:
            s.stop()

    # -- the stream ----------------------------------------------------------------------------
    def stream(self, background: bool, deadline: float) -> None:
        from geartask.config import load_config
        from geartask.sender.sender import JobSender
        sender = JobSender(load_config(self.config))
        per_tick = max(1, self.args.rate // 2)  # half the rate each, in batches every second
        kind = "bg" if background else "fg"
        n = 0
        try:
            while time.monotonic() < deadline and not self.stop_stream.is_set():
                tick = time.monotonic()
                keys = [f"soak-{kind}-{n + i:07d}" for i in range(per_tick)]
                n += per_tick
                now = time.time()
                with self.lock:
                    for k in keys:
                        self.sent[k] = {"background": background, "sent_at": now, "state": None}
                try:
                    results = sender.submit_many([{"task": TASK, "data": k, "unique": k, "background": background}
                                                  for k in keys], wait=not background, timeout=self.args.job_timeout)
                except Exception as e:  # the stream goes on; each job's state stays unknown
                    self.errors.append(f"{kind} batch at {now:.0f}: {type(e).__name__}: {e}")
                    results = []
                with self.lock:
                    for k, r in zip(keys, results, strict=True):
                        self.sent[k]["state"] = r.state
                        if r.state not in ("complete", "queued"):
                            self.sent[k]["error"] = str(r.error)[:200]
                self.stop_stream.wait(max(0.0, 1.0 - (time.monotonic() - tick)))
        finally:
            sender.close()

    # -- chaos ---------------------------------------------------------------------------------
    def chaos(self, deadline: float) -> None:
        every = self.args.chaos_every
        for _ in range(100000):  # bounded; the deadline ends it first
            if self.stop_stream.wait(self.rng.uniform(0.5 * every, 1.5 * every)) or time.monotonic() > deadline:
                return
            action = self.rng.choice(ACTIONS)
            ev = {"action": action, "start": time.time()}
            try:
                ev["target"] = getattr(self, "do_" + action)()
            except Exception as e:
                ev["error"] = f"{type(e).__name__}: {e}"
                self.errors.append(f"chaos {action}: {ev['error']}")
            ev["end"] = time.time()
            self.events.append(ev)
            print(json.dumps({"chaos": action, "target": ev.get("target"), "seconds": round(ev["end"] - ev["start"], 2),
                              **({"error": ev["error"]} if "error" in ev else {})}), file=sys.stderr, flush=True)

    def do_kill_worker(self) -> str:
        live = [p for p in self.workers if p.alive()]
        victim = self.rng.choice(live)
        victim.popen.kill()  # SIGKILL to its pid
        victim.popen.wait(10)
        self.start_worker()
        return f"{victim.name} pid {victim.pid}"

    def do_restart_gearmand(self) -> str:
        s = self.rng.choice(self.servers)
        s.kill()
        s.start()
        return s.address

    def do_kill_collector(self) -> str:
        self.collector.popen.kill()
        self.collector.popen.wait(10)
        self.start_collector()
        return "collector"

    def do_cut_link(self) -> str:
        self.proxy.cut()
        time.sleep(self.rng.uniform(1, 5))  # the outage itself
        self.proxy.restore()
        return "workers-B"

    def do_drop_link(self) -> str:
        self.proxy.stop()
        time.sleep(self.rng.uniform(0.5, 3))
        self.start_proxy()
        return "workers-B"

    # -- the count -----------------------------------------------------------------------------
    def read_runs(self) -> dict[str, list[tuple[float, int]]]:
        """key -> [(time, worker pid)] of each finished run."""
        runs: dict[str, list[tuple[float, int]]] = collections.defaultdict(list)
        if self.runs_file.exists():
            for line in self.runs_file.read_text().splitlines():
                parts = line.split()
                if len(parts) == 3:
                    runs[parts[0]].append((float(parts[1]), int(parts[2])))
        return runs

    def stored_outcomes(self) -> tuple[int, int]:
        """(distinct unique keys, rows) of TASK's outcomes in the collector's store."""
        path = self.run_dir / "outcomes.sqlite"
        if not path.exists():
            return 0, 0
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute("SELECT COUNT(DISTINCT unique_key), COUNT(*) FROM outcomes WHERE task = ?",
                              (TASK,)).fetchone()
        except sqlite3.Error:
            return 0, 0
        finally:
            db.close()

    def explain(self, runs: list[tuple[float, int]]) -> str | None:
        """The chaos action behind a second run: a kill of the very worker that ran it first
        (by pid), else the action closest before the last run within --window seconds."""
        first_pids = {pid for _, pid in runs[:-1]}
        for e in self.events:
            if e["action"] == "kill_worker" and any(e.get("target", "").endswith(f" pid {p}") for p in first_pids):
                return "kill_worker"
        times = [t for t, _ in runs]
        lo, hi = min(times) - self.args.window, max(times) + 1.0
        near = [e for e in self.events if e["start"] <= hi and e.get("end", e["start"]) >= lo and e["action"] in CASES]
        if not near:
            return None
        return min(near, key=lambda e: abs(max(times) - e.get("end", e["start"])))["action"]

    def summary(self, started: float) -> dict:
        bg = {k for k, v in self.sent.items() if v["background"]}
        # Background jobs finish after the stream: wait until all ran and the queues are empty.
        def settled():
            runs = self.read_runs()
            return all(k in runs for k in bg) and self.queued() == 0
        try:
            wait_until(settled, self.args.drain_timeout, "every background job to run", 0.5)
        except BenchError:
            pass  # what is missing is counted below
        try:
            wait_until(lambda: self.stored_outcomes()[0] >= len(bg), self.args.drain_timeout,
                       "every outcome to be stored", 0.5)
        except BenchError:
            pass
        runs = self.read_runs()
        fg_failed = [k for k, v in self.sent.items() if not v["background"] and v["state"] != "complete"]
        bg_refused = [k for k, v in self.sent.items() if v["background"] and v["state"] != "queued"]
        lost = sorted(k for k in self.sent if k not in runs)
        twice = {k: t for k, t in runs.items() if len(t) > 1}
        explained = collections.Counter()
        unexplained = []
        for k, t in sorted(twice.items()):
            action = self.explain(t)
            if action is None:
                unexplained.append({"key": k, "runs": [list(r) for r in t]})
            else:
                explained[CASES[action]] += 1
        unknown = sorted(k for k in runs if k not in self.sent)
        distinct, rows = self.stored_outcomes()
        return {
            "minutes": round((time.time() - started) / 60, 2), "rate": self.args.rate,
            "processes": self.args.processes, "threads": self.args.threads,
            "sent": len(self.sent), "sent_foreground": len(self.sent) - len(bg), "sent_background": len(bg),
            "completed": sum(1 for k in self.sent if k in runs),
            "foreground_not_complete": len(fg_failed), "background_not_queued": len(bg_refused),
            "first_foreground_failure": self.sent[fg_failed[0]].get("error") if fg_failed else None,
            "lost": len(lost), "lost_keys": lost[:20],
            "run_twice": len(twice), "run_more_than_twice": sum(1 for t in twice.values() if len(t) > 2),
            "run_twice_explained": dict(explained), "run_twice_unexplained": unexplained[:20],
            "runs_of_unknown_keys": len(unknown),
            "outcomes_expected": len(bg), "outcomes_stored": distinct, "outcome_rows": rows,
            "chaos": dict(collections.Counter(e["action"] for e in self.events)),
            "chaos_errors": [e for e in self.errors][:20],
        }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/soak.py", description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--rate", type=int, default=50, help="jobs a second, half foreground, half background")
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--chaos-every", type=float, default=None,
                    help="mean seconds between chaos actions (default: 20, less for short soaks)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--window", type=float, default=15.0,
                    help="seconds before a job's first run in which a chaos action can explain a second run")
    ap.add_argument("--job-timeout", type=float, default=300.0)
    ap.add_argument("--drain-timeout", type=float, default=180.0)
    ap.add_argument("--json", type=Path, dest="json_out", help="also write the summary here")
    args = ap.parse_args(argv)
    if not 0 < args.minutes <= 24 * 60:
        print(f"bench/soak.py: --minutes must be above 0 and at most 1440, got {args.minutes:g}", file=sys.stderr)
        return 2
    for name in ("rate", "processes", "threads"):
        if not 1 <= getattr(args, name) <= 1000:
            print(f"bench/soak.py: --{name} must be 1 to 1000, got {getattr(args, name)}", file=sys.stderr)
            return 2
    if args.chaos_every is None:
        args.chaos_every = min(20.0, max(3.0, args.minutes * 60 / 8))
    if args.chaos_every <= 0:
        print("bench/soak.py: --chaos-every must be above 0", file=sys.stderr)
        return 2
    # SIGTERM unwinds like ^C, so the finally blocks end every process we started
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="geartask-soak-") as tmp:
        soak = Soak(args, Path(tmp))
        try:
            soak.start()
            started = time.time()
            deadline = time.monotonic() + args.minutes * 60
            threads = [threading.Thread(target=soak.stream, args=(bg, deadline), daemon=True) for bg in (False, True)]
            threads.append(threading.Thread(target=soak.chaos, args=(deadline,), daemon=True))
            for t in threads:
                t.start()
            for t in threads:
                t.join(max(1.0, deadline - time.monotonic()) + args.job_timeout + 60)
            soak.stop_stream.set()
            result = soak.summary(started)
        except BenchError as e:
            result = {"error": str(e)}
        finally:
            soak.close()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(text + "\n")
    ok = "error" not in result and result["lost"] == 0 and not result["run_twice_unexplained"] \
        and result["foreground_not_complete"] == 0 and result["outcomes_stored"] == result["outcomes_expected"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
