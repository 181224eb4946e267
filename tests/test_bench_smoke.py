"""The benchmark in smoke mode: it runs end to end and writes well-formed results.

No figure is asserted (they depend on the machine); only that every workload has an entry
for every system taking part, each either measured or skipped with a reason. Systems whose
extras are not installed (Celery, RQ, redis-server, matplotlib) are skipped, not failed.
"""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO

import pytest

sys.path.insert(0, str(REPO))
from bench.bench import WORKLOADS, all_systems, takes_part  # noqa: E402


def test_bench_smoke_writes_results_for_every_workload_and_system(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
    assert proc.returncode == 0, f"bench --smoke exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    doc = json.loads((out / "benchmarks.json").read_text())
    assert doc["mode"] == "smoke"
    assert doc["machine"]["cores"] and doc["versions"]["gearmand"]
    for workload in WORKLOADS:
        entries = doc["results"][workload]
        for system in all_systems():
            if not takes_part(system, workload):
                continue
            entry = entries.get(system.key)
            assert entry is not None, f"{workload}: no entry for {system.key}"
            assert entry["status"] in ("ok", "skipped"), f"{workload} {system.key}: {entry}"
            if entry["status"] == "skipped":
                assert entry["reason"], f"{workload} {system.key}: skipped without a reason"
    # geartask, bare pygearman and the C tools are installed by scripts/install.sh: they must run.
    for key in ("geartask", "pygearman", "c"):
        assert doc["results"]["W1"][key]["status"] == "ok"
        assert doc["results"]["W1"][key]["jobs_per_s"] > 0
    assert doc["results"]["W4"]["noqueue"]["status"] == "ok"
    assert {t["target"].split()[0] for t in doc["targets"]} == set(WORKLOADS)
    md = (out / "benchmarks.md").read_text()
    assert "## W1" in md and "## Targets" in md and doc["machine"]["cpu"] in md


@pytest.mark.parametrize("args", [["--workloads", "W9"], ["--only", "nosuchsystem"], ["--bogus"]])
def test_bench_rejects_bad_arguments_with_status_2(args, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench.py"), *args, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "benchmarks.json").exists()


def test_dashboard_idle_bench_runs_and_stays_within_budget(tmp_path):
    """bench/dashboard_idle.py end to end, short; memory within the budget, CPU within twice it
    (ten seconds of a loaded test machine measure coarsely: the 60 s bench run is the figure)."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "dashboard_idle.py"), "--seconds", "10",
                           "--warmup", "2"], capture_output=True, text=True, timeout=180, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["worker_processes"] == 2 and result["servers"] == 2
    assert result["rss_mb"] < 80, result
    assert result["cpu_percent_of_a_core"] < 2.0, result
