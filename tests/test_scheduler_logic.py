"""The scheduler's decisions against a fixed clock: what it hands over ahead, what it does with
missed slots under each misfire rule, and when the outcomes can't be asked. (End-to-end runs
with real gearmand, workers and the collector are in tests/test_scheduler.py.)"""

from __future__ import annotations

from datetime import datetime, timezone

from geartask.scheduler.schedule import parse, slot_text
from geartask.scheduler.scheduler import Scheduler


def utc(*args) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()


class Ran:
    """What the outcomes store would answer: a set of uniques that ran, or None (unreachable)."""

    def __init__(self, uniques=(), reachable=True):
        self.uniques, self.reachable = set(uniques), reachable

    def ran(self, unique):
        return (unique in self.uniques) if self.reachable else None


def scheduler(misfire="latest", outcomes=None, every=60, fail=False):
    sent = []

    def send(jobs):
        sent.extend(jobs)
        return ["no server" if fail else None for _ in jobs]
    s = parse({"name": "s", "every": every, "task": "t", "misfire": misfire, "misfire_cap": 3}, "test")
    return Scheduler([s], send, outcomes if outcomes is not None else Ran()), sent


def test_next_slot_is_handed_over_once_within_the_lead():
    sch, sent = scheduler()
    t0 = utc(2026, 1, 1, 0, 0, 10)
    sch.tick(t0)  # starts: the 00:00 slot is "missed" and did not run: sent now
    assert [(j["unique"], j["at"]) for j in sent] == [("s@2026-01-01T00:00:00Z", int(t0) + 3)]
    sent.clear()
    sch.tick(utc(2026, 1, 1, 0, 0, 20))  # 40 s before the next slot: not yet (lead 30 s)
    assert sent == []
    sch.tick(utc(2026, 1, 1, 0, 0, 31))
    sch.tick(utc(2026, 1, 1, 0, 0, 45))
    assert [(j["unique"], j["at"], j["background"]) for j in sent] == \
        [("s@2026-01-01T00:01:00Z", int(utc(2026, 1, 1, 0, 1)), True)]


def test_misfire_latest_skip_all_after_being_away():
    start, back = utc(2026, 1, 1, 0, 0, 30), utc(2026, 1, 1, 0, 5, 30)
    for rule, expected in (("latest", ["00:05"]), ("skip", []), ("all", ["00:03", "00:04", "00:05"])):
        sch, sent = scheduler(rule)
        sch.tick(start)
        sent.clear()
        sch.tick(back)  # away for five minutes: 00:01 .. 00:05 were missed
        assert [j["unique"][13:18] for j in sent if j["at"] < back + 30] == expected, rule


def test_a_missed_slot_that_already_ran_is_not_sent_again():
    sch, sent = scheduler(outcomes=Ran({"s@2026-01-01T00:00:00Z"}))
    decisions = sch.tick(utc(2026, 1, 1, 0, 0, 10))
    assert [d.action for d in decisions] == ["ran"] and sent == []


def test_without_the_outcomes_a_missed_slot_is_not_sent_but_slots_ahead_are():
    sch, sent = scheduler(outcomes=Ran(reachable=False))
    decisions = sch.tick(utc(2026, 1, 1, 0, 0, 45))
    assert [d.action for d in decisions] == ["unreachable", "ahead"]
    assert [j["unique"] for j in sent] == ["s@2026-01-01T00:01:00Z"]


def test_a_failed_send_is_tried_again():
    sch, sent = scheduler(fail=True)
    sch.tick(utc(2026, 1, 1, 0, 0, 10))
    sch.tick(utc(2026, 1, 1, 0, 0, 11))
    assert [j["unique"] for j in sent] == ["s@2026-01-01T00:00:00Z"] * 2


def test_a_clock_jump_forward_sends_the_latest_missed_slot_not_a_burst():
    sch, sent = scheduler(every=10)
    sch.tick(utc(2026, 1, 1, 0, 0, 1))
    sent.clear()
    decisions = sch.tick(utc(2026, 1, 1, 3, 0, 1))  # three hours later in one step
    assert [j["unique"] for j in sent] == ["s@" + slot_text(utc(2026, 1, 1, 3, 0, 0))]
    assert [d.action for d in decisions] == ["sent"]
