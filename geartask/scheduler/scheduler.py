"""The scheduler: sends each schedule's job at each slot, safely from any number of machines.

Every scheduler sends the same job for a slot under the same unique key (NAME@SLOT) to the
same server (the sender routes by unique key), as a background job that gearmand holds until
the slot's time (SUBMIT_JOB_EPOCH). So the copies sent before the slot meet in gearmand's
queue and run once, and a job already handed over runs even if every scheduler dies. A slot
found late (a scheduler that starts late, comes back, or sees the clock jump) is a missed
slot: ``misfire`` says which of those to send, and each is first checked against the job
outcomes, so one that already ran is not run again.

Clocks: a slot about to be handed over ahead is checked against the outcomes too (a scheduler
whose clock is behind would otherwise hand over a slot that already ran, and gearmand runs a
held job whose time passed at once). Each schedule keeps a high-water mark, the newest slot it
handled: a slot at or before it is never sent again, whatever the clock does (a step back is
logged). A record counts as "the slot ran" only if the collector received it after the slot's
time (less ``max_clock_skew``) and it is the schedule's task: one forged in advance does not.
A slot handed over is checked again ``verify_after`` seconds after its time; no outcome, or
one that is not the schedule's job, is an alert (logged as an error, counted in ``alerts``).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

from ..errors import GeartaskError
from ..gearman import REFUSED_EVENT, OutageLog, is_refusal
from ..jobs import encode_payload
from ..logs import get_logger
from ..outcomes.record import decode_bytes
from .schedule import Schedule, slot_text

MAX_LEAD = 30.0  # seconds ahead of its slot that a job is handed to gearmand, at most
SETTLE = 3  # seconds a missed slot's job waits in gearmand, so late schedulers' copies meet
TICK = 0.5  # seconds between passes
KEEP = 64  # slots remembered per schedule (what this process already handled)
DEFAULT_MAX_CLOCK_SKEW = 300.0  # schedules' clock guarantee (scheduler.max_clock_skew), seconds
VERIFY_AFTER = 600.0  # seconds after a handed-over slot's time by which its outcome must exist
LOOK_BACK = 8  # earlier slots asked about to tell a new schedule from one that ran before
STEP = 2.0  # a clock moving back more than this between passes is logged as a step
KEEP_ALERTS = 100  # recent alerts kept for whoever shows them
KEEP_PENDING = 1024  # handed-over slots awaiting verification per schedule (every: 1 and 600 s: 600)

log = get_logger("geartask.scheduler")


class Outcomes(Protocol):
    def ran(self, unique: str) -> bool | None:
        """True when the job of ``unique`` has an outcome, False when none, None when unknown
        (the collector can't be reached)."""

    # Optional, preferred when present: the newest outcome record of ``unique`` (None: none);
    # raises GeartaskError when the collector can't be reached.
    # def record(self, unique: str) -> dict | None


def slot_verdict(s: Schedule, slot: float, rec: dict | None,
                 max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW) -> str:
    """What an outcome record says about one slot: "ran" (this schedule's job ran: its task,
    complete or failed, received no earlier than the slot's time less the skew), "none" (no
    record), or "foreign" (a record under the slot's key that is not this schedule's job: sent
    by someone else, or forged ahead of the slot)."""
    if rec is None:
        return "none"
    if rec.get("state") not in ("complete", "failed") or rec.get("task") != s.task:
        return "foreign"
    received = rec.get("received_at", rec.get("finished_at"))
    if not isinstance(received, (int, float)) or received < s.run_at(slot) - max_clock_skew:
        return "foreign"
    if rec.get("data") is not None:  # kept for failed jobs: it must be the schedule's data
        try:
            if decode_bytes(rec, "data") != encode_payload(s.data, s.task):
                return "foreign"
        except (ValueError, GeartaskError):
            return "foreign"
    return "ran"


@dataclass
class Decision:
    """What a pass did with one slot."""

    schedule: str
    slot: float
    unique: str
    action: str  # sent | ahead (sent before its time) | skipped (misfire) | ran (already) | unreachable | failed
    #              | alert (a slot handed over has no outcome, or one that is not this schedule's job)
    run_at: int | None = None
    error: str | None = None

    def to_json(self) -> dict:
        return {"schedule": self.schedule, "slot": slot_text(self.slot), "unique": self.unique,
                "action": self.action, "run_at": self.run_at, "error": self.error}


@dataclass
class _State:
    horizon: float | None = None  # every slot at or before this was considered (the latest clock seen)
    clock: float | None = None  # the clock at the previous pass (a step back is logged when it happens)
    high: float | None = None  # the newest slot handled: none at or before it is sent again
    handled: dict[float, str] = field(default_factory=dict)
    retry: set[float] = field(default_factory=set)  # missed slots whose sending failed
    pending: dict[float, int] = field(default_factory=dict)  # handed over, to verify: slot -> run_at

    def remember(self, slot: float, what: str) -> None:
        self.handled[slot] = what
        if what != "unreachable":
            self.mark(slot)
        while len(self.handled) > KEEP:  # the oldest go; the high-water mark still covers them
            self.handled.pop(min(self.handled))

    def mark(self, slot: float) -> None:
        self.high = slot if self.high is None else max(self.high, slot)

    def done(self, slot: float) -> bool:
        return slot in self.handled or (self.high is not None and slot <= self.high)


class Scheduler:
    """Runs ``schedules``: ``send(jobs)`` hands job definitions (with ``at``, Unix seconds) to
    the job servers and returns one error (None when accepted) per job; ``outcomes`` says
    whether a slot already ran."""

    def __init__(self, schedules: Iterable[Schedule], send: Callable[[list[dict]], list[str | None]],
                 outcomes: Outcomes | None, clock: Callable[[], float] = time.time,
                 max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW, verify_after: float = VERIFY_AFTER):
        self.schedules = list(schedules)
        self.send = send
        self.outcomes = outcomes
        self.clock = clock
        self.max_clock_skew = max_clock_skew
        self.verify_after = verify_after
        self.state = {s.name: _State() for s in self.schedules}
        self.stop_event = threading.Event()
        self.alert_counts: Counter[str] = Counter()  # no_outcome | foreign: for metrics and pages
        self.alerts: deque[dict] = deque(maxlen=KEEP_ALERTS)
        self.clock_steps = 0
        # Failures to reach the job servers and the outcomes, each said once per outage (a TLS
        # refusal at error level); outcomes_error: the last reason the outcomes could not be asked.
        self.send_outage, self.outcomes_outage = OutageLog(), OutageLog()
        self.outcomes_error: str | None = None

    def tick(self, now: float | None = None) -> list[Decision]:
        """One pass over every schedule: missed slots by their misfire rule, then the next
        slot if it is close enough to hand over, then slots handed over long enough ago to
        verify."""
        now = self.clock() if now is None else now
        decisions: list[Decision] = []
        jobs: list[tuple[Decision, dict]] = []
        for s in self.schedules:
            st = self.state[s.name]
            if st.clock is not None and now < st.clock - STEP and st.horizon is not None and now < st.horizon - STEP:
                self._clock_stepped(s, st, now)  # once per step back, not on every pass while behind
            st.clock = now
            for slot in self._missed(s, st, now):
                d = self._missed_slot(s, st, slot, now)
                st.remember(slot, d.action)
                decisions.append(d)
                if d.action == "sent":
                    jobs.append((d, self._job(s, slot, d.run_at)))
            st.horizon = now if st.horizon is None else max(st.horizon, now)
            nxt = next(s.after(now))
            if nxt - now <= min(MAX_LEAD, s.period_near(now) / 2) and not st.done(nxt):
                d = self._ahead_slot(s, nxt)
                st.remember(nxt, d.action)
                decisions.append(d)
                if d.action == "ahead":
                    jobs.append((d, self._job(s, nxt, d.run_at)))
            decisions.extend(self._verify(s, st, now))
        if jobs:
            errors = self.send([job for _, job in jobs])
            for (d, _), error in zip(jobs, errors, strict=False):
                st = self.state[d.schedule]
                if error is not None:
                    d.action, d.error = "failed", error
                    st.handled.pop(d.slot, None)  # try again next pass
                    if st.high == d.slot:  # not handled after all
                        st.high = max((x for x, w in st.handled.items() if w != "unreachable"), default=None)
                    if d.slot <= now:
                        st.retry.add(d.slot)
                    log.warning("slot not sent", schedule=d.schedule, slot=slot_text(d.slot), error=error)
                    self._failed(self.send_outage, "job servers", error, now)
                else:
                    self._recovered(self.send_outage, "job servers", now)
                    st.pending[d.slot] = d.run_at or int(d.slot)
                    while len(st.pending) > KEEP_PENDING:  # the oldest go unverified (logged once each)
                        gone = min(st.pending)
                        st.pending.pop(gone)
                        log.warning("slot not verified: too many waiting", schedule=d.schedule,
                                    slot=slot_text(gone))
                    log.info("slot sent", schedule=d.schedule, slot=slot_text(d.slot), unique=d.unique,
                             run_at=d.run_at, ahead=d.action == "ahead")
        return decisions

    def _clock_stepped(self, s: Schedule, st: _State, now: float) -> None:
        assert st.horizon is not None  # called only when the clock went back from the horizon
        back = st.horizon - now
        self.clock_steps += 1
        args = dict(schedule=s.name, seconds=round(back, 3), newest_slot=slot_text(st.high) if st.high else None)
        if back > self.max_clock_skew:
            log.error("clock stepped back more than max_clock_skew: slots up to the newest one handled are "
                      "not sent again until the clock passes it", max_clock_skew=self.max_clock_skew, **args)
        else:
            log.warning("clock stepped back: slots already handled are not sent again", **args)

    def _record(self, unique: str) -> tuple[bool, dict | None]:
        """(reachable, newest record of ``unique``): through ``record`` when the outcomes have it."""
        if self.outcomes is None:
            return False, None
        record = getattr(self.outcomes, "record", None)
        if record is None:
            ran = self.outcomes.ran(unique)
            return ran is not None, ({"state": "complete", "task": None, "_ran": True} if ran else None)
        try:
            found = record(unique)
        except GeartaskError as e:
            self.outcomes_error = str(e)
            self._failed(self.outcomes_outage, "outcomes", self.outcomes_error, self.clock())
            return False, None
        self._recovered(self.outcomes_outage, "outcomes", self.clock())
        return True, found

    @staticmethod
    def _failed(outage: OutageLog, what: str, error: str, now: float) -> None:
        """A TLS refusal is said once per outage at error level (the per-slot lines say the rest)."""
        if outage.failed(is_refusal(error), now) == "refused":
            log.error(REFUSED_EVENT, what=what, error=error)

    @staticmethod
    def _recovered(outage: OutageLog, what: str, now: float) -> None:
        ended = outage.recovered(now)
        if ended:
            log.info(f"{what} reachable again", failures=ended[0], down_for=round(ended[1], 1))

    def _verdict(self, s: Schedule, slot: float) -> str | None:
        """ran | none | foreign for one slot, None when the outcomes can't be reached."""
        reachable, rec = self._record(s.unique(slot))
        if not reachable:
            return None
        if rec is not None and rec.get("_ran"):  # a plain ran() answer: it can't say more
            return "ran"
        return slot_verdict(s, slot, rec, self.max_clock_skew)

    def _ahead_slot(self, s: Schedule, slot: float) -> Decision:
        """The next slot, to hand over: unless it already ran (this clock is behind the others')."""
        unique = s.unique(slot)
        verdict = self._verdict(s, slot)
        if verdict == "ran":
            log.warning("slot already ran before its time here: this host's clock is behind", schedule=s.name,
                        slot=slot_text(slot))
            return Decision(s.name, slot, unique, "ran")
        if verdict == "foreign":
            self._alert(s, slot, "foreign", "a job under this slot's key that this scheduler did not send")
        return Decision(s.name, slot, unique, "ahead", s.run_at(slot))

    def _verify(self, s: Schedule, st: _State, now: float) -> list[Decision]:
        """Slots handed over ``verify_after`` ago: each must have this schedule's outcome."""
        out = []
        for slot, run_at in sorted(st.pending.items()):
            if now < run_at + self.verify_after:
                break
            verdict = self._verdict(s, slot)
            if verdict is None:
                if now < run_at + 4 * self.verify_after:
                    continue  # ask again next pass
                log.warning("slot not verified: the outcomes collector can't be reached", schedule=s.name,
                            slot=slot_text(slot), error=self.outcomes_error)
            elif verdict != "ran":
                what = ("no outcome" if verdict == "none" else
                        "its outcome is not this schedule's job (someone else's job under its key)")
                out.append(self._alert(s, slot, "no_outcome" if verdict == "none" else "foreign",
                                       f"handed over, but {what} {self.verify_after:g} s after its time"))
            st.pending.pop(slot, None)
        return out

    def _alert(self, s: Schedule, slot: float, kind: str, message: str) -> Decision:
        self.alert_counts[kind] += 1
        self.alerts.append({"schedule": s.name, "slot": slot_text(slot), "unique": s.unique(slot), "kind": kind,
                            "message": message, "at": time.time()})
        log.error(f"slot alert: {message}", schedule=s.name, slot=slot_text(slot), unique=s.unique(slot), kind=kind)
        return Decision(s.name, slot, s.unique(slot), "alert", error=message)

    def _missed(self, s: Schedule, st: _State, now: float) -> list[float]:
        """Slots due by ``now`` that this process has not handled, after the misfire rule."""
        horizon = st.horizon
        starting = horizon is None
        if horizon is None:  # just started: how long we were away is unknown
            if s.misfire == "all":
                due = s.between(now - s.misfire_cap * s.period_near(now) - 1, now, s.misfire_cap)
            else:
                last = s.last(now)
                due = [last] if last is not None else []
        else:
            due = s.between(max(horizon, st.high or horizon), now, max(s.misfire_cap, 1000))
        retry = st.retry
        due = sorted(set(due) | retry)
        st.retry = set()
        due = [slot for slot in due if slot in retry or not st.done(slot)]
        if due and starting and s.misfire != "skip":
            due = self._unless_new(s, st, due, now)
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

    def _unless_new(self, s: Schedule, st: _State, due: list[float], now: float) -> list[float]:
        """A schedule that never ran starts with its next slot, not a past one: its missed slots
        at start are dropped unless one of the LOOK_BACK slots before them ran. (A slot late by
        less than the lead is kept: `schedule --once` from system cron finds its slot so.)"""
        lead = min(MAX_LEAD, s.period_near(now) / 2)
        fresh = [slot for slot in due if now - slot <= lead]
        if len(fresh) == len(due):
            return due
        slot: float | None = due[0]
        for _ in range(LOOK_BACK):
            if slot is None:
                break
            verdict = self._verdict(s, slot)
            if verdict is None or verdict == "ran":
                return due  # it ran before (or we can't tell: _missed_slot says so)
            slot = s.last(slot - 1)
        old = [slot for slot in due if slot not in fresh]
        log.info("new schedule: its first slot is the next one, not a past one", schedule=s.name,
                 not_sent=len(old), last=slot_text(old[-1]))
        for slot in old:
            st.remember(slot, "skipped")
        return fresh

    def _missed_slot(self, s: Schedule, st: _State, slot: float, now: float) -> Decision:
        unique = s.unique(slot)
        verdict = self._verdict(s, slot)
        ran = None if verdict is None else verdict == "ran"
        if verdict == "foreign":
            self._alert(s, slot, "foreign", "a job under this slot's key that this scheduler did not send")
        if ran:
            return Decision(s.name, slot, unique, "ran")
        if ran is None:
            log.error("missed slot not sent: the outcomes collector can't be reached to say whether it ran",
                      schedule=s.name, slot=slot_text(slot), error=self.outcomes_error)
            return Decision(s.name, slot, unique, "unreachable", error=self.outcomes_error)
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
