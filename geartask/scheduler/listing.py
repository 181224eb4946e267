"""Each schedule with its next slots and its last run: for ``send schedule list`` and the
dashboard's Schedules page."""

from __future__ import annotations

import time
from typing import Any

from .schedule import Schedule, slot_text
from .scheduler import slot_verdict

LIST_BACK = 8  # slots looked back for a schedule's last run


def rows(schedules: list[Schedule], last_of: Any, now: float | None = None) -> list[dict]:
    """Each schedule with its next three slots and its last run as the outcomes know it
    (``last_of(unique)`` -> the latest outcome record or None); for `schedule list` and the
    dashboard's Schedules page."""
    now = time.time() if now is None else now
    out = []
    for s in schedules:
        it = s.after(now)
        upcoming = [next(it) for _ in range(3)]
        last = None
        slot = s.last(now)
        for _ in range(LIST_BACK):
            if slot is None or last_of is None:
                break
            rec = last_of(s.unique(slot))
            if rec is not None:
                last = {"slot": slot_text(slot), "unique": s.unique(slot), "state": rec.get("state"),
                        "finished_at": rec.get("finished_at"), "worker": rec.get("worker"),
                        "alert": slot_verdict(s, slot, rec) == "foreign"}  # not this schedule's job
                break
            slot = s.last(slot - 1)
        out.append({"name": s.name, "task": s.task, "when": s.cron or f"every {s.every}s", "timezone": s.timezone,
                    "misfire": s.misfire, "next": [slot_text(x) for x in upcoming], "last": last, "source": s.source})
    return out
