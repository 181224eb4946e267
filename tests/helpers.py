"""Small helpers the tests share: waiting on a condition with a deadline, running the CLIs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, NoReturn

import pytest

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05,
               message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def missing_in_this_environment(reason: str) -> NoReturn:
    """Skip a test this machine can't run (no root, no chromium, no gcc...), with the reason; where
    the environment variable ``CI`` is set it is a failure instead: CI must run every test."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run this test: {reason}", pytrace=False)
    pytest.skip(reason)


def run_script(script: str, *args: str, timeout: float = 60, env: dict | None = None,
               cwd: str | Path | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """Run one of the role scripts (e.g. 'send_job_client/send_job_client.py') as a user would."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([PYTHON, str(REPO / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or REPO, input=input)


def write_config(path: Path, servers: list[str], extra: str = "",
                 plugin_paths: list[Path] | None = None) -> Path:
    """A config file for a test: its servers, logs and queue in the test's own folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    server_lines = "".join(f"  - {json.dumps(s) if s.startswith('[') else s}\n" for s in servers)  # [v6]: quoted for YAML
    paths = ", ".join(str(p) for p in (plugin_paths or [REPO / "plugins"]))
    path.write_text(f"servers:\n{server_lines}log:\n  dir: logs\n  format: json\n"
                    f"plugins:\n  paths: [{paths}]\n{extra}")
    return path


def processes() -> dict[int, tuple[list[str], int]]:
    """Every live process now (zombies left out): pid -> (argv, process group)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] != "Z":
            found[int(entry)] = (argv, int(fields[2]))
    return found


def tcp_timer(local_port: int, remote_port: int) -> tuple[int, float]:
    """(timer kind, seconds left) of the loopback IPv4 connection from ``local_port`` to
    ``remote_port``, from /proc/net/tcp: kind 2 is the keepalive timer."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, timer = fields[1], fields[2], fields[5]
        if int(local.split(":")[1], 16) == local_port and int(remote.split(":")[1], 16) == remote_port:
            kind, when = timer.split(":")
            return int(kind, 16), int(when, 16) / os.sysconf("SC_CLK_TCK")
    raise AssertionError(f"no connection {local_port} -> {remote_port} in /proc/net/tcp")


def run_on_a_terminal(argv: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run ``argv`` with a pseudo-terminal as stdin, stdout and stderr (as a user at a
    terminal would); its exit status and everything it wrote."""
    import pty
    import select
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=REPO)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1)[0]:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        proc.wait(10)
    return proc.returncode, b"".join(chunks).decode(errors="replace")
