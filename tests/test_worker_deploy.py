"""deploy/: the systemd units pass `systemd-analyze verify`, and the commands they run work
(with this checkout's geartask in place of the installed path the units name)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path


import gearclient as gc
from geartask.config import WorkerConfig, load_config
from geartask.server import free_port
from helpers import REPO, missing_in_this_environment, wait_until, write_config
from workers import attached

DEPLOY = REPO / "deploy"
INSTALLED = "/opt/geartask/venv/bin/geartask"  # where the units expect geartask (deploy/README.md)
CONFIG = "/etc/geartask/config.yaml"
GEARTASK = Path(sys.executable).parent / "geartask"  # the console script of the venv running the tests


def unit_lines(name: str) -> dict[str, list[str]]:
    """Key -> values of a unit file (every section; comments left out)."""
    found: dict[str, list[str]] = {}
    for line in (DEPLOY / name).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def exec_start(name: str, config: Path, env: dict[str, str], instance: str = "") -> list[str]:
    """The unit's ExecStart as systemd would run it: ${VAR} one word, $VAR split on spaces, %i."""
    line = unit_lines(name)["ExecStart"][0].replace(INSTALLED, str(GEARTASK)).replace(CONFIG, str(config))
    line = line.replace("%i", instance)
    argv: list[str] = []
    for word in shlex.split(line):
        if m := re.fullmatch(r"\$\{(\w+)\}", word):
            argv.append(env[m.group(1)])
        elif m := re.fullmatch(r"\$(\w+)", word):
            argv += env[m.group(1)].split()
        else:
            argv.append(word)
    return argv


def unit_env(name: str, env_file: Path | None = None) -> dict[str, str]:
    env = dict(item.split("=", 1) for value in unit_lines(name)["Environment"] for item in value.split())
    if env_file is not None:
        for line in env_file.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, _, value = line.partition("=")
                env[key.strip()] = value.strip()
    return env


def test_the_units_pass_systemd_analyze_verify(tmp_path):
    if shutil.which("systemd-analyze") is None:
        missing_in_this_environment("needs systemd-analyze (Debian's systemd package; scripts/install.sh installs it)")
    assert GEARTASK.is_file(), f"no geartask console script at {GEARTASK}: run scripts/install.sh"
    for unit in ("geartask-gearmand.service", "geartask-worker@.service"):
        text = (DEPLOY / unit).read_text()
        assert INSTALLED in text
        (tmp_path / unit).write_text(text.replace(INSTALLED, str(GEARTASK)))  # verify wants a real program
    for unit in ("geartask-gearmand.service", "geartask-worker@w1.service"):
        r = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / unit)],
                           capture_output=True, text=True, timeout=60)
        # verify exits 0 on unknown keys and bad values too, reporting them: none may be reported.
        assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


def test_the_worker_unit_stops_after_the_grace_and_restarts_after_max_jobs():
    keys = unit_lines("geartask-worker@.service")
    assert keys["KillMode"] == ["mixed"] and keys["Restart"] == ["always"]
    assert float(keys["TimeoutStopSec"][0]) > WorkerConfig().grace
    assert float(keys["TimeoutStopSec"][0]) > load_config(DEPLOY / "config.yaml").worker.grace
    assert "--name %i" in keys["ExecStart"][0] and keys["EnvironmentFile"] == ["-/etc/geartask/worker-%i.env"]


def test_the_worker_units_command_runs_a_worker_that_exits_0_after_max_jobs(gearmand, tmp_path):
    """ExecStart with the example environment file (max jobs set to 1): the worker is named
    after the instance, runs one job and exits 0, for systemd to start a fresh one."""
    env_file = tmp_path / "worker-unit1.env"
    env_file.write_text((DEPLOY / "worker.env").read_text().replace("GEARTASK_THREADS=10", "GEARTASK_THREADS=2")
                        .replace("GEARTASK_MAX_JOBS=0", "GEARTASK_MAX_JOBS=1"))
    cfg = write_config(tmp_path / "config.yaml", [gearmand.address])
    argv = exec_start("geartask-worker@.service", cfg, unit_env("geartask-worker@.service", env_file), "unit1")
    with open(tmp_path / "worker.out", "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        wait_until(lambda: attached(gearmand.address, "unit1", proc.pid, 2) or proc.poll() is not None, 15,
                   message="the unit's worker attached")
        assert proc.poll() is None, (tmp_path / "worker.out").read_text()
        assert gc.run_one(gearmand.address, "eg.reverse", "unit").result == {"reversed": "tinu"}
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_gearmand_units_command_forks_a_gearmand_whose_pid_is_in_the_pid_file(tmp_path):
    """Type=forking: ExecStart returns 0 once gearmand answers, leaving it running with its
    pid in <log.dir>/gearmand-<port>.pid (the unit's PIDFile pattern)."""
    port = free_port()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"log:\n  dir: {tmp_path / 'log'}\nserver:\n  port: {port}\n  queue:\n"
                   f"    path: {tmp_path / 'queue.sqlite'}\n")
    pid_file = unit_lines("geartask-gearmand.service")["PIDFile"][0]
    assert pid_file == "/var/log/geartask/gearmand-4730.pid"  # deploy/config.yaml's log.dir and port
    pid_file = tmp_path / "log" / f"gearmand-{port}.pid"  # the same pattern in this test's log.dir and port
    r = subprocess.run(exec_start("geartask-gearmand.service", cfg, {}), capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    pid = int(pid_file.read_text())
    try:
        assert "gearmand" in Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        assert gc.queued(f"127.0.0.1:{port}", "nothing") == 0  # it answers
    finally:
        stop = subprocess.run([str(GEARTASK), "manage", "server", "stop", "--config", str(cfg)],
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert stop.returncode == 0, stop.stderr
