"""Which outcomes collectors are registered: every connection that serves geartask.outcomes on
the configured servers, grouped by client id. ``outcomes status`` lists them; with the
postgresql store several are normal (docs/outcomes.md), with sqlite one is."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..fleet import DEFAULT_TIMEOUT, Admin, server_workers
from .record import OUTCOME_FUNCTION

if TYPE_CHECKING:
    from ..config import Config


def registered_collectors(config: Config, timeout: float = DEFAULT_TIMEOUT) -> tuple[list[dict], list[str]]:
    """([{collector, ip, servers}], [errors of servers that could not be asked]), sorted by id."""
    found: dict[str, dict] = {}
    errors = []
    for r in Admin(list(config.server_addresses), timeout).each(server_workers, False):
        if not r.ok:
            errors.append(f"{r.server}: {r.error}")
            continue
        for w in r.value:
            if OUTCOME_FUNCTION in w.functions:
                entry = found.setdefault(w.client_id, {"collector": w.client_id, "ip": w.ip, "servers": []})
                if r.server not in entry["servers"]:
                    entry["servers"].append(r.server)
    return [found[k] for k in sorted(found)], errors
