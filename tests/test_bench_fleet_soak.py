"""bench/fleet.py and bench/soak.py end to end, tiny: well-formed JSON, no failed or lost job.

Figures are never asserted (they depend on the machine); what is asserted is what must hold on
any machine: every job ran, the fleet shut down, every double run of the soak is explained by
what its chaos loop did, every background job's outcome was stored.
"""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO

import pytest


def run(script: str, *args: str, timeout: float, tmp_path) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args, "--json", str(out)],
                          capture_output=True, text=True, timeout=timeout, cwd=str(tmp_path))
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    doc = json.loads(out.read_text())
    assert json.loads(proc.stdout) == doc  # what it prints is what it writes
    return proc, doc


def test_fleet_runs_jobs_times_the_admin_commands_and_shuts_the_fleet_down(tmp_path):
    _, doc = run("fleet.py", "--processes", "2", "--threads", "2", "--jobs", "100", "--runs", "1", "--idle", "1",
                 timeout=240, tmp_path=tmp_path)
    assert (doc["processes"], doc["threads"], len(doc["servers"])) == (2, 2, 2)
    assert doc["failed"] == 0 and len(doc["runs"]) == 1
    r = doc["runs"][0]
    assert r["returned"] == 100 and r["jobs_per_s"] > 0
    assert r["workers_status"] == 0 and r["status_status"] == 0
    assert r["workers_seconds"] > 0 and r["status_seconds"] > 0 and r["workers_library_seconds"] > 0
    assert doc["idle"]["processes"] == 2 and len(doc["idle"]["gearmand_percent_of_core"]) == 2
    assert doc["shutdown"]["still_running"] == 0 and doc["shutdown"]["statuses"] == [0]
    assert doc["shutdown"]["all_exited_seconds"] is not None


def test_soak_loses_nothing_and_explains_every_double_run(tmp_path):
    _, doc = run("soak.py", "--minutes", "0.5", "--rate", "20", "--processes", "2", "--threads", "2",
                 "--chaos-every", "4", timeout=600, tmp_path=tmp_path)
    assert doc["sent"] > 0 and doc["sent_foreground"] > 0 and doc["sent_background"] > 0
    assert doc["completed"] == doc["sent"] and doc["lost"] == 0 and doc["lost_keys"] == []
    assert doc["foreground_not_complete"] == 0 and doc["background_not_queued"] == 0
    assert doc["run_twice_unexplained"] == []
    assert sum(doc["run_twice_explained"].values()) == doc["run_twice"]
    assert doc["runs_of_unknown_keys"] == 0
    assert doc["outcomes_stored"] == doc["outcomes_expected"] == doc["sent_background"]
    assert sum(doc["chaos"].values()) >= 3, doc["chaos"]  # the chaos loop really ran
    assert doc["chaos_errors"] == []


@pytest.mark.parametrize("script,args", [
    ("fleet.py", ["--processes", "0"]), ("fleet.py", ["--bogus"]),
    ("soak.py", ["--minutes", "0"]), ("soak.py", ["--rate", "-5"]),
])
def test_bad_arguments_exit_2_without_a_traceback(script, args, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                          timeout=60, cwd=str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip()
