"""Schedules: slot computation against a fixed clock (cron, every, DST), and validation."""

from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from geartask.scheduler.schedule import MAX_NAME, Schedule, ScheduleError, check_unique_names, parse, slot_text

BERLIN = ZoneInfo("Europe/Berlin")


def utc(*args) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()


def texts(slots) -> list[str]:
    return [slot_text(s) for s in slots]


def nightly() -> Schedule:
    return parse({"name": "nightly", "cron": "0 2 * * *", "timezone": "Europe/Berlin", "task": "t"}, "test")


def test_spring_forward_the_skipped_slot_runs_when_the_clock_jumps():
    """2026-03-29 in Berlin: 02:00 CET does not exist (01:59:59 CET -> 03:00 CEST). The 02:00
    slot is not lost: it runs at 03:00 CEST (01:00 UTC), once."""
    s = nightly()
    slots = s.between(utc(2026, 3, 27, 12), utc(2026, 3, 31, 12), 10)
    assert texts(slots) == ["2026-03-28T01:00:00Z",   # 02:00 CET
                            "2026-03-29T01:00:00Z",   # 03:00 CEST: the skipped 02:00
                            "2026-03-30T00:00:00Z",   # 02:00 CEST
                            "2026-03-31T00:00:00Z"]


def test_fall_back_the_repeated_slot_runs_once():
    """2026-10-25 in Berlin: 02:00-03:00 happens twice (CEST, then CET). 02:00 runs once, at
    the first 02:00 (00:00 UTC), not again an hour later."""
    s = nightly()
    slots = s.between(utc(2026, 10, 23, 12), utc(2026, 10, 27, 12), 10)
    assert texts(slots) == ["2026-10-24T00:00:00Z", "2026-10-25T00:00:00Z", "2026-10-26T01:00:00Z",
                            "2026-10-27T01:00:00Z"]


def test_last_slot_and_slots_after_agree_around_dst():
    s = nightly()
    assert slot_text(s.last(utc(2026, 3, 29, 1, 0, 0))) == "2026-03-29T01:00:00Z"  # at the slot itself
    assert slot_text(s.last(utc(2026, 3, 29, 0, 59, 59))) == "2026-03-28T01:00:00Z"
    assert slot_text(s.last(utc(2026, 10, 25, 0, 30))) == "2026-10-25T00:00:00Z"
    assert slot_text(s.last(utc(2026, 10, 25, 1, 30))) == "2026-10-25T00:00:00Z"  # no second 02:00
    it = s.after(utc(2026, 10, 25, 0, 0, 0))
    assert slot_text(next(it)) == "2026-10-26T01:00:00Z"


def test_every_is_aligned_to_the_epoch_so_every_scheduler_agrees():
    s = parse({"name": "tick", "every": 300, "task": "t"}, "test")
    assert texts(s.between(utc(2026, 1, 1, 0, 1), utc(2026, 1, 1, 0, 16), 10)) == \
        ["2026-01-01T00:05:00Z", "2026-01-01T00:10:00Z", "2026-01-01T00:15:00Z"]
    assert s.last(utc(2026, 1, 1, 0, 5)) == utc(2026, 1, 1, 0, 5)
    assert s.period_near(0) == 300


def test_between_keeps_the_newest_when_over_the_limit():
    s = parse({"name": "tick", "every": 60, "task": "t"}, "test")
    assert texts(s.between(utc(2026, 1, 1), utc(2026, 1, 1, 1), 2)) == ["2026-01-01T00:59:00Z", "2026-01-01T01:00:00Z"]


def test_unique_key_and_deterministic_jitter():
    s = parse({"name": "report", "cron": "*/5 * * * *", "task": "t", "jitter": 30}, "test")
    slot = utc(2026, 3, 29, 1, 0)
    assert s.unique(slot) == "report@2026-03-29T01:00:00Z"
    assert len(parse({"name": "n" * MAX_NAME, "every": 1, "task": "t"}, "x").unique(slot)) == 64
    delays = {s.run_at(x) - x for x in s.between(slot, slot + 86400, 300)}
    assert all(0 <= d <= 30 for d in delays) and len(delays) > 5  # spread, bounded
    again = parse({"name": "report", "cron": "*/5 * * * *", "task": "t", "jitter": 30}, "test")
    assert again.run_at(slot) == s.run_at(slot)  # the same in every scheduler


@pytest.mark.parametrize("obj, words", [
    ({"name": "a", "cron": "61 * * * *", "task": "t"}, "bad cron expression"),
    ({"name": "a", "cron": "* * *", "task": "t"}, "bad cron expression"),
    ({"name": "a", "every": -5, "task": "t"}, "'every'"),
    ({"name": "a", "every": 0, "task": "t"}, "'every'"),
    ({"name": "a", "every": 1.5, "task": "t"}, "'every'"),
    ({"name": "a", "task": "t"}, "exactly one of 'cron' and 'every'"),
    ({"name": "a", "every": 5, "cron": "* * * * *", "task": "t"}, "exactly one"),
    ({"name": "a", "every": 5, "task": "nope"}, "unknown task 'nope'"),
    ({"name": "a", "every": 5}, "'task'"),
    ({"name": "a b", "every": 5, "task": "t"}, "'name'"),
    ({"name": "x" * (MAX_NAME + 1), "every": 5, "task": "t"}, "'name'"),
    ({"name": "a", "every": 5, "task": "t", "timezone": "Mars/Olympus"}, "unknown timezone"),
    ({"name": "a", "every": 5, "task": "t", "priority": "urgent"}, "'priority'"),
    ({"name": "a", "every": 5, "task": "t", "misfire": "sometimes"}, "'misfire'"),
    ({"name": "a", "every": 5, "task": "t", "jitter": -1}, "'jitter'"),
    ({"name": "a", "every": 5, "task": "t", "data": {"x": float("nan")}}, "'data'"),
    ({"name": "a", "every": 5, "task": "t", "when": 1}, "unknown key 'when'"),
    ("every 5 minutes", "a mapping"),
])
def test_bad_schedules_are_refused_naming_the_schedule_and_where(obj, words):
    with pytest.raises(ScheduleError) as e:
        parse(obj, "config.yaml: schedules[3]", tasks={"t", "shell"})
    assert words in str(e.value) and str(e.value).startswith("config.yaml: schedules[3]")
    assert e.value.exit_status == 2


def test_two_schedules_with_one_name_are_refused():
    a = parse({"name": "dup", "every": 5, "task": "t"}, "config.yaml: schedules[0]")
    b = parse({"name": "dup", "every": 9, "task": "t"}, "config.yaml: schedules[1]")
    with pytest.raises(ScheduleError, match="two schedules are named 'dup'"):
        check_unique_names([a, b])
