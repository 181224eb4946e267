"""W1 and W2 across the test network: what a real network costs geartask and bare pygearman.

    python bench/net.py [--out DIR] [--cases loopback,bridge,bridge+10ms]   # as root (namespaces)

Three cases, run back to back with the same counts so they compare within one run:
``loopback`` (bench.py as usual), ``bridge`` (gearmand, the workers and the client each on a
host of its own, tests/netlab.py) and ``bridge+10ms`` (every connection through a relay
host that holds each chunk 5 ms each way). Each case is one run of bench/bench.py (in the
client's namespace, workers started with ``ip netns exec``); this script collects the figures
into DIR/benchmarks-network.json and prints them as a markdown table. Exit 0, 1 when a case
failed, 2 when the test network can't be built here.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

SYSTEMS = "geartask,pygearman"
COUNTS = {  # per case: W1 batch, W2 sequential jobs; W1 repeated 3 times (median)
    "loopback": (5000, 500), "bridge": (5000, 500), "bridge+10ms": (2000, 300),
}


def bench(prefix: list[str], out: Path, w1: int, w2: int, *extra: str) -> dict:
    cmd = [*prefix, sys.executable, str(REPO / "bench" / "bench.py"), "--only", SYSTEMS, "--workloads", "W1,W2",
           "--no-chart", "--out", str(out), "--set", f"w1={w1}", "--set", f"w2={w2}", "--set", "repeat=3",
           "--set", "scaling=[]", "--set", "warmup=100", "--set", "timeout=300", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode not in (0, 1) or not (out / "benchmarks.json").exists():
        raise RuntimeError(f"bench.py exited {proc.returncode}: {proc.stderr[-1000:]}")
    return json.loads((out / "benchmarks.json").read_text())


def figures(doc: dict) -> dict:
    out = {}
    for system in SYSTEMS.split(","):
        w1 = doc["results"].get("W1", {}).get(system, {})
        w2 = doc["results"].get("W2", {}).get(system, {})
        out[system] = {"w1_jobs_per_s": w1.get("jobs_per_s"), "w1_samples": (w1.get("runs") or [{}])[0].get("samples"),
                       "w2_p50_ms": w2.get("p50_ms"), "w2_p99_ms": w2.get("p99_ms"),
                       "status": sorted({w1.get("status"), w2.get("status")} - {None}),
                       "reason": w1.get("reason") or w2.get("reason")}
    return out


def run(out_dir: Path, cases: list[str]) -> dict:
    import netlab as nl
    reason = nl.unavailable_reason()
    if reason:
        raise SystemExit(f"bench/net.py: {reason}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="geartask-netbench-") as tmp:
        tmp = Path(tmp)
        for case in cases:
            w1, w2 = COUNTS[case]
            print(f"{case}: W1 {w1} jobs x3, W2 {w2} jobs", flush=True)
            if case == "loopback":
                doc = bench([], tmp / case, w1, w2)
            else:
                lab = nl.NetLab(tmp / f"lab-{case}").start()
                try:
                    srv, wk, cl = lab.add_host("srv"), lab.add_host("wk"), lab.add_host("cl")
                    g = lab.gearmand(srv, keepalive=None)
                    address = g.address
                    if case == "bridge+10ms":
                        address = lab.proxy(lab.add_host("relay"), g.address, 4730, delay=0.005)
                    doc = bench(cl.prefix, tmp / case, w1, w2, "--gearmand", address,
                                "--worker-prefix", " ".join(wk.prefix))
                finally:
                    lab.close()
            results[case] = figures(doc)
            print(json.dumps(results[case]), flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "benchmarks-network.json").write_text(json.dumps(
        {"counts": {c: COUNTS[c] for c in cases}, "results": results}, indent=2) + "\n")
    return results


def table(results: dict) -> str:
    lines = ["| case | system | W1 jobs/s (median of 3) | W2 p50 ms | W2 p99 ms |", "|---|---|---:|---:|---:|"]
    for case, by_system in results.items():
        for system, f in by_system.items():
            if f["status"] != ["ok"]:
                lines.append(f"| {case} | {system} | {', '.join(f['status'])}: {f['reason']} | | |")
                continue
            lines.append(f"| {case} | {system} | {f['w1_jobs_per_s']:,.0f} | {f['w2_p50_ms']:.2f} | "
                         f"{f['w2_p99_ms']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/net.py", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs", help="folder for benchmarks-network.json")
    ap.add_argument("--cases", default=",".join(COUNTS), help=f"comma-separated, of {', '.join(COUNTS)}")
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if any(c not in COUNTS for c in cases):
        print(f"bench/net.py: unknown case in {args.cases!r} (use {', '.join(COUNTS)})", file=sys.stderr)
        return 2
    try:
        results = run(args.out, cases)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    print(table(results))
    return 0 if all(f["status"] == ["ok"] for r in results.values() for f in r.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
