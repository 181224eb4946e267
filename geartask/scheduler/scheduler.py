"""The scheduler: sends each schedule's job at each slot, safely from any number of machines.

Every scheduler sends the same job for a slot under the same unique key (NAME@SLOT) to the
same server (the sender routes by unique key), as a background job that gearmand holds until
the slot's time (SUBMIT_JOB_EPOCH). So the copies sent before the slot meet in gearmand's
queue and run once, and a job already handed over runs even if every scheduler dies. A slot
found late (a scheduler that starts late, comes back, or sees the clock jump) is a missed
slot: ``misfire`` says which of those to send, and each is first checked against the job
outcomes, so one that already ran is not run again.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

from ..logs import get_logger
from .schedule import Schedule, slot_text

MAX_LEAD = 30.0  # seconds ahead of its slot that a job is handed to gearmand, at most
SETTLE = 3  # seconds a missed slot's job waits in gearmand, so late schedulers' copies meet
TICK = 0.5  # seconds between passes
KEEP = 64  # slots remembered per schedule (what this process already handled)

log = get_logger("geartask.scheduler")


class Outcomes(Protocol):
    def ran(self, unique: str) -> bool | None:
        """True when the job of ``unique`` has an outcome, False when none, None when unknown
        (the collector can't be reached)."""


@dataclass
class Decision:
    """What a pass did with one slot."""

    schedule: str
    slot: float
    unique: str
    action: str  # sent | ahead (sent before its time) | skipped (misfire) | ran (already) | unreachable | failed
    run_at: int | None = None
    error: str | None = None

    def to_json(self) -> dict:
        return {"schedule": self.schedule, "slot": slot_text(self.slot), "unique": self.unique,
                "action": self.action, "run_at": self.run_at, "error": self.error}


@dataclass
class _State:
    horizon: float | None = None  # every slot at or before this was considered
    handled: dict[float, str] = field(default_factory=dict)
    retry: set[float] = field(default_factory=set)  # missed slots whose sending failed

    def remember(self, slot: float, what: str) -> None:
        self.handled[slot] = what
        while len(self.handled) > KEEP:
            self.handled.pop(min(self.handled))


class Scheduler:
    """Runs ``schedules``: ``send(jobs)`` hands job definitions (with ``at``, Unix seconds) to
    the job servers and returns one error (None when accepted) per job; ``outcomes`` says
    whether a slot already ran."""

    def __init__(self, schedules: Iterable[Schedule], send: Callable[[list[dict]], list[str | None]],
                 outcomes: Outcomes | None, clock: Callable[[], float] = time.time):
        self.schedules = list(schedules)
        self.send = send
        self.outcomes = outcomes
        self.clock = clock
        self.state = {s.name: _State() for s in self.schedules}
        self.stop_event = threading.Event()

    def tick(self, now: float | None = None) -> list[Decision]:
        """One pass over every schedule: missed slots by their misfire rule, then the next
        slot if it is close enough to hand over."""
        now = self.clock() if now is None else now
        decisions: list[Decision] = []
        jobs: list[tuple[Decision, dict]] = []
        for s in self.schedules:
            st = self.state[s.name]
            for slot in self._missed(s, st, now):
                d = self._missed_slot(s, slot, now)
                st.remember(slot, d.action)
                decisions.append(d)
                if d.action == "sent":
                    jobs.append((d, self._job(s, slot, d.run_at)))
            st.horizon = now
            nxt = next(s.after(now))
            if nxt - now <= min(MAX_LEAD, s.period_near(now) / 2) and nxt not in st.handled:
                d = Decision(s.name, nxt, s.unique(nxt), "ahead", s.run_at(nxt))
                st.remember(nxt, d.action)
                decisions.append(d)
                jobs.append((d, self._job(s, nxt, d.run_at)))
        if jobs:
            errors = self.send([job for _, job in jobs])
            for (d, _), error in zip(jobs, errors):
                if error is not None:
                    d.action, d.error = "failed", error
                    st = self.state[d.schedule]
                    st.handled.pop(d.slot, None)  # try again next pass
                    if d.slot <= now:
                        st.retry.add(d.slot)
                    log.warning("slot not sent", schedule=d.schedule, slot=slot_text(d.slot), error=error)
                else:
                    log.info("slot sent", schedule=d.schedule, slot=slot_text(d.slot), unique=d.unique,
                             run_at=d.run_at, ahead=d.action == "ahead")
        return decisions

    def _missed(self, s: Schedule, st: _State, now: float) -> list[float]:
        """Slots due by ``now`` that this process has not handled, after the misfire rule."""
        if st.horizon is None:  # just started: how long we were away is unknown
            if s.misfire == "all":
                due = s.between(now - s.misfire_cap * s.period_near(now) - 1, now, s.misfire_cap)
            else:
                last = s.last(now)
                due = [last] if last is not None else []
        else:
            due = s.between(st.horizon, now, max(s.misfire_cap, 1000))
        due = sorted(set(due) | st.retry)
        st.retry.clear()
        due = [slot for slot in due if slot not in st.handled]
        if not due:
            return []
        chosen = {"latest": due[-1:], "skip": [], "all": due[-s.misfire_cap:]}[s.misfire]
        dropped = [slot for slot in due if slot not in chosen]
        if dropped:  # one line for them all: a clock jump may skip thousands
            log.warning("missed slots not sent", schedule=s.name, misfire=s.misfire, count=len(dropped),
                        first=slot_text(dropped[0]), last=slot_text(dropped[-1]))
            for slot in dropped[-KEEP:]:
                st.remember(slot, "skipped")
        return chosen

    def _missed_slot(self, s: Schedule, slot: float, now: float) -> Decision:
        unique = s.unique(slot)
        ran = self.outcomes.ran(unique) if self.outcomes is not None else None
        if ran:
            return Decision(s.name, slot, unique, "ran")
        if ran is None:
            log.error("missed slot not sent: the outcomes collector can't be reached to say whether it ran",
                      schedule=s.name, slot=slot_text(slot))
            return Decision(s.name, slot, unique, "unreachable")
        log.warning("missed slot: sending it now", schedule=s.name, slot=slot_text(slot), misfire=s.misfire)
        return Decision(s.name, slot, unique, "sent", max(s.run_at(slot), int(now) + SETTLE))

    @staticmethod
    def _job(s: Schedule, slot: float, at: int | None) -> dict:
        return {"task": s.task, "data": s.data, "unique": s.unique(slot), "priority": s.priority,
                "background": True, "at": at}

    def run_forever(self, on_decision: Callable[[Decision], Any] | None = None) -> None:
        """Pass every TICK seconds until stop() (a signal handler may call it)."""
        log.info("scheduler started", schedules=[s.name for s in self.schedules])
        while not self.stop_event.is_set():
            for d in self.tick():
                if on_decision is not None:
                    on_decision(d)
            self.stop_event.wait(TICK)
        log.info("scheduler stopped")

    def stop(self) -> None:
        self.stop_event.set()
