"""What a worker process needs from the machine, checked before any thread starts."""

from __future__ import annotations

import math
import resource

from ..errors import ConfigError, UsageError

MAX_THREADS = 1000  # per process: past this, threads mostly wait for the GIL; start more processes
FDS_PER_THREAD_EXTRA = 5  # besides one socket per server: a wake-up pipe (2) and a running command's (3)
FDS_MARGIN = 64  # stdio, log files, the process's own pipes, what plugins open
MAX_KEEPALIVE = 32767  # seconds: the kernel's ceiling for TCP_KEEPIDLE


def check_threads(threads: int, config_path: str | None = None, flag: bool = True) -> int:
    """``threads`` if 1..MAX_THREADS; else UsageError naming --threads (``flag``), or
    ConfigError naming worker.threads in ``config_path``."""
    if threads < 1:
        problem = f"must be at least 1, got {threads}"
    elif threads > MAX_THREADS:
        problem = (f"must be at most {MAX_THREADS} (threads in one process), got {threads}; "
                   f"start several worker processes instead")
    else:
        return threads
    if flag:
        raise UsageError(f"--threads {problem}")
    raise ConfigError(problem, config_path, "worker.threads")


def open_files_needed(threads: int, servers: int) -> int:
    return threads * (servers + FDS_PER_THREAD_EXTRA) + servers + 2 + FDS_MARGIN


def ensure_open_files(threads: int, servers: int) -> int:
    """Make sure the open-file limit fits ``threads`` × ``servers``: raise the soft limit up to
    the hard one if needed; UsageError (one line) when even that is too low. Returns the limit."""
    need = open_files_needed(threads, servers)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return need if soft == resource.RLIM_INFINITY else soft
    if hard != resource.RLIM_INFINITY and hard < need:
        raise UsageError(f"{threads} threads with {servers} server(s) need about {need} open files, but the "
                         f"limit is {hard} (ulimit -n); use fewer threads or raise the limit")
    new = need if hard == resource.RLIM_INFINITY else hard
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new


def check_keepalive(seconds: float, path: str | None) -> float:
    if not (math.isfinite(seconds) and 1 <= seconds <= MAX_KEEPALIVE):
        raise ConfigError(f"must be between 1 and {MAX_KEEPALIVE} seconds, got {seconds!r}", path,
                          "worker.keepalive")
    return seconds
