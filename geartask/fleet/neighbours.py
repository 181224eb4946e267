"""Other fleets on our servers: a worker that joins a job server already serving another fleet's
workers (a stranger's gearmand on the configured port, a test fleet pointed at production)
says so once at start, naming the fleet and the server (docs/worker.md#fleets)."""

from __future__ import annotations

import os
import threading
from typing import Any

from ..logs import get_logger
from .admin import Admin
from .server import DEFAULT_TIMEOUT, server_workers

log = get_logger("geartask.worker")


def other_fleets(config: Any, pid: int | None = None, timeout: float = DEFAULT_TIMEOUT) -> dict[tuple[str, str], int]:
    """(server, fleet) -> worker processes of a fleet other than the config's, on each reachable
    server (``pid``, this process, left out); a fleet-less worker's fleet is ""."""
    mine = getattr(config, "fleet", "") or ""
    pid = os.getpid() if pid is None else pid
    found: dict[tuple[str, str], set[tuple[str, int]]] = {}
    for r in Admin(config.server_addresses, timeout).each(server_workers, False):
        for w in r.value if r.ok else []:
            if w.name is None or w.pid is None or w.pid == pid or (w.fleet or "") == mine:
                continue
            found.setdefault((r.server, w.fleet or ""), set()).add((w.name, w.pid))
    return {k: len(v) for k, v in sorted(found.items())}


def warn_other_fleets(config: Any, pid: int | None = None) -> threading.Thread:
    """In the background (a dead server must not hold up the start): one warning per server and
    other fleet found there."""
    def look() -> None:
        try:
            for (server, fleet), n in other_fleets(config, pid).items():
                log.warning("another fleet's workers on this server", server=server,
                            other_fleet=fleet or "(none)", fleet=getattr(config, "fleet", "") or "(none)",
                            processes=n)
        except Exception as e:  # a look around must never stop the worker
            log.debug("could not look for other fleets", error=str(e))
    t = threading.Thread(target=look, name="fleet-check", daemon=True)
    t.start()
    return t
