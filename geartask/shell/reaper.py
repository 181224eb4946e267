"""The reaper: when the process that started it ends, however it ends, end the commands it ran.

    GEARTASK_REAPER_TOKEN=TOKEN python -I -S reaper.py PID
    (stdin: a pipe only process PID writes to, and never does; the token is not in argv,
    where every user could read it)

veryeasyprocess starts one per process and puts GEARTASK_RUN_TOKEN=TOKEN in every command's
environment, which whatever a command starts inherits. At end of file on stdin (its
starter has exited or was killed, even with SIGKILL) the reaper kills every process that
carries the token, and the process group of each, until none is left.
"""

from __future__ import annotations

import os
import signal
import sys
import time

VAR = "GEARTASK_RUN_TOKEN"  # in every command's environment
TOKEN_VAR = "GEARTASK_REAPER_TOKEN"  # in the reaper's
DEADLINE = 10.0  # seconds the reaper keeps looking for carriers before it gives up


def carriers(token: str) -> dict[int, int]:
    """Processes whose environment carries the token: pid -> process group."""
    needle = f"\0{VAR}={token}\0".encode()
    me = os.getpid()
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                env = b"\0" + f.read() + b"\0"  # empty for a zombie: it has ended already
            if needle in env:
                found[int(entry.name)] = os.getpgid(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def end_all(token: str, deadline: float = DEADLINE) -> int:
    """SIGKILL every carrier and its group until a look finds none; return how many were found."""
    mine = os.getpgid(0)
    seen: set[int] = set()
    refused: set[int] = set()  # a setuid program we may not signal: don't spin on it
    until = time.monotonic() + deadline
    while time.monotonic() < until:
        found = {p: g for p, g in carriers(token).items() if p not in refused}
        if not found:
            break
        for pid, pgid in found.items():
            seen.add(pid)
            if pgid != mine:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except OSError:
                    pass
            try:
                os.kill(pid, signal.SIGKILL)
            except PermissionError:
                refused.add(pid)
            except OSError:
                pass
        time.sleep(0.01)
    return len(seen)


def main(argv: list[str]) -> int:
    token = os.environ.get(TOKEN_VAR, "")
    if len(argv) != 2 or not token:
        print(f"usage: {TOKEN_VAR}=TOKEN reaper.py PID (stdin: the pipe to watch)", file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGHUP):  # a closed terminal or Ctrl-C is for the worker to handle
        signal.signal(sig, signal.SIG_IGN)
    while True:
        try:
            if not os.read(0, 4096):
                break
        except InterruptedError:  # pragma: no cover - PEP 475 retries this already
            continue
        except OSError:
            break
    end_all(token)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
