"""The scheduler's decisions against a fixed clock: what it hands over ahead, what it does with
missed slots under each misfire rule, and when the outcomes can't be asked. (End-to-end runs
with real gearmand, workers and the collector are in tests/test_scheduler.py.)"""

from __future__ import annotations

from datetime import datetime, timezone

from geartask.scheduler.schedule import parse, slot_text
from geartask.scheduler.scheduler import Scheduler
from geartask.scheduler import scheduler as scheduler_module


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
    assert [d.action for d in decisions if d.action != "alert"] == ["sent"]


# -- clocks: three schedulers, one fake gearmand, one fake collector, one real timeline --------

class Fleet:
    """gearmand and the collector as the scheduler meets them, on the real (simulated) clock:
    a background job is held until its ``at``, jobs with one unique key coalesce while queued or
    running, a finished job is forgotten (a later copy runs again), and its outcome is stored
    ``latency`` seconds after it ends, with the collector's receive time."""

    def __init__(self, duration=0.5, latency=0.3):
        self.t = 0.0
        self.duration, self.latency = duration, latency
        self.queued = {}  # unique -> (run_at, job)
        self.running = {}  # unique -> (ends_at, job)
        self.stored = {}  # unique -> record
        self.arriving = []  # (received_at, record)
        self.runs = {}  # unique -> how many times it ran

    def send(self, jobs):
        for job in jobs:
            u = job["unique"]
            if u not in self.queued and u not in self.running:
                self.queued[u] = (job["at"] if job["at"] is not None else self.t, job)
        return [None] * len(jobs)

    def record(self, unique):
        return self.stored.get(unique)

    def ran(self, unique):  # what an older scheduler asked
        return unique in self.stored

    def advance(self, t):
        self.t = t
        for u, (at, job) in list(self.queued.items()):
            if at <= t:
                del self.queued[u]
                self.running[u] = (t + self.duration, job)
                self.runs[u] = self.runs.get(u, 0) + 1
        for u, (ends, job) in list(self.running.items()):
            if ends <= t:
                del self.running[u]
                self.arriving.append((ends + self.latency, {"unique": u, "task": job["task"], "state": "complete",
                                                            "finished_at": ends, "received_at": ends + self.latency}))
        for rec in [r for at, r in self.arriving if at <= t]:
            self.stored[rec["unique"]] = rec
        self.arriving = [(at, r) for at, r in self.arriving if at > t]


def run_fleet(clocks, seconds=200.0, every=5, step=0.5, **fleet):
    """Schedulers whose clocks are ``clocks`` (functions of the real time), ticking every
    ``step`` seconds of real time; returns the fleet (its ``runs``)."""
    t0 = utc(2026, 1, 1, 0, 0, 0) + 0.3
    f = Fleet(**fleet)
    sch = [Scheduler([parse({"name": "s", "every": every, "task": "t"}, "test")], f.send, f) for _ in clocks]
    n = 0
    while n * step <= seconds:
        t = t0 + n * step
        f.advance(t)
        for clock, s in zip(clocks, sch, strict=False):
            s.tick(clock(t))
        n += 1
    for k in range(1, 40):  # let the last held jobs run
        f.advance(t0 + seconds + k * step)
    return f, t0


def assert_each_slot_ran_once(f, t0, seconds, every=5):
    assert f.runs and max(f.runs.values()) == 1, {u: n for u, n in f.runs.items() if n > 1}
    expected = {"s@" + slot_text(t0 - 0.3 + k * every) for k in range(2, int(seconds / every) - 1)}
    assert expected <= set(f.runs), sorted(expected - set(f.runs))


def test_a_scheduler_90_s_behind_does_not_run_slots_again():
    f, t0 = run_fleet([lambda t: t, lambda t: t, lambda t: t - 90])
    assert_each_slot_ran_once(f, t0, 200)


def test_schedulers_90_s_ahead_and_4_s_behind_run_each_slot_once():
    f, t0 = run_fleet([lambda t: t, lambda t: t + 90, lambda t: t - 4])
    assert_each_slot_ran_once(f, t0, 200)


def test_a_job_longer_than_the_skew_still_runs_once():
    f, t0 = run_fleet([lambda t: t, lambda t: t - 4, lambda t: t - 10], duration=7.0)
    assert_each_slot_ran_once(f, t0, 200)


def test_a_600_s_step_back_sends_no_slot_again():
    stepped = 700.0  # then the clock shows slots that ran 600 s ago (more than KEEP slots back)
    base = utc(2026, 1, 1, 0, 0, 0)

    def clock(t):
        return t if t < base + stepped else t - 600
    f, t0 = run_fleet([lambda t: t, lambda t: t, clock], seconds=1000)
    assert_each_slot_ran_once(f, t0, 1000)


def test_alone_after_a_600_s_step_back_no_slot_is_sent_twice_and_the_step_is_logged(monkeypatch):
    # the scheduler's own log calls, recorded whatever logging pipeline an earlier test in this
    # process configured (after configure_logging, events skip stdlib logging and caplog)
    logged: list[str] = []

    class Recorder:
        def error(self, event: str, **fields: object) -> None:
            logged.append(event)

        warning = error

        def __getattr__(self, name: str) -> object:
            return lambda *a, **k: None
    monkeypatch.setattr(scheduler_module, "log", Recorder())
    f = Fleet()
    s = Scheduler([parse({"name": "s", "every": 5, "task": "t"}, "test")], f.send, f)
    t0 = utc(2026, 1, 1, 0, 0, 0) + 0.3
    for n in range(0, 2400):  # 20 minutes of real time; the clock steps back 600 s after 60 s
        t = t0 + n * 0.5
        f.advance(t)
        s.tick(t if n * 0.5 < 60 else t - 600)
    assert max(f.runs.values()) == 1
    # logged once, when it happened: not on every pass while the clock is behind
    assert s.clock_steps == 1 and sum("clock stepped back" in e for e in logged) == 1


def test_remember_keeps_the_newest_slot_when_the_clock_is_back():
    sch, sent = scheduler(every=5)
    base = utc(2026, 1, 1, 1, 0, 0)
    for k in range(100):  # 100 slots handed over
        sch.tick(base + k * 5 - 2)
    sent.clear()
    for k in range(3):  # the clock steps back 400 s (80 slots, more than KEEP): nothing goes again
        sch.tick(base + 99 * 5 - 2 - 400 + k)
    assert sent == []


def test_a_new_schedule_does_not_fire_yesterdays_slot():
    s = parse({"name": "nightly", "cron": "0 2 * * *", "task": "t"}, "test")
    sent = []
    sch = Scheduler([s], lambda jobs: sent.extend(jobs) or [None] * len(jobs), Ran())
    decisions = sch.tick(utc(2026, 1, 2, 0, 17))  # added at 00:17: yesterday's 02:00 never ran
    assert sent == [] and [d.action for d in decisions] == []
    # a schedule that did run before (the slot before the missed one has an outcome) gets it
    sent2 = []
    sch2 = Scheduler([s], lambda jobs: sent2.extend(jobs) or [None] * len(jobs),
                     Ran({"nightly@2025-12-31T02:00:00Z"}))
    sch2.tick(utc(2026, 1, 2, 0, 17))
    assert [j["unique"] for j in sent2] == ["nightly@2026-01-01T02:00:00Z"]


class Records:
    def __init__(self, records=None, reachable=True):
        self.records, self.reachable = dict(records or {}), reachable

    def record(self, unique):
        from geartask.errors import GeartaskError
        if not self.reachable:
            raise GeartaskError("no outcomes collector answered")
        return self.records.get(unique)

    def ran(self, unique):
        return unique in self.records if self.reachable else None


def test_forged_failed_records_made_in_advance_do_not_count_as_ran():
    s = parse({"name": "s", "every": 60, "task": "t"}, "test")
    slot = utc(2026, 1, 1, 0, 1)
    forged = {"state": "failed", "task": "t", "finished_at": slot + 1, "received_at": slot - 3600}
    sent = []
    sch = Scheduler([s], lambda jobs: sent.extend(jobs) or [None] * len(jobs),
                    Records({"s@2026-01-01T00:01:00Z": forged, "s@2026-01-01T00:00:00Z":
                             {"state": "complete", "task": "t", "received_at": slot - 59}}))
    sch.tick(slot + 10)  # the 00:01 slot was missed; a forged record says it failed
    assert [j["unique"] for j in sent] == ["s@2026-01-01T00:01:00Z"]
    assert sch.alert_counts["foreign"] == 1


def test_a_slot_handed_over_with_no_outcome_or_a_foreign_one_alerts():
    s = parse({"name": "s", "every": 60, "task": "t", "data": {"x": 1}}, "test")
    outcomes = Records()
    sch = Scheduler([s], lambda jobs: [None] * len(jobs), outcomes, verify_after=120)
    t = utc(2026, 1, 1, 0, 0, 40)
    sch.tick(t)  # hands 00:01 over
    sch.tick(t + 100)  # hands 00:02 over
    # 00:01 was held by someone else's job, which ran under its key with other data
    outcomes.records["s@2026-01-01T00:01:00Z"] = {"state": "failed", "task": "t", "received_at": t + 21,
                                                   "data": '{"x":2}', "data_encoding": "text"}
    decisions = sch.tick(t + 205)  # 00:01 + 125 s: verified; 00:02 not yet
    assert [(d.action, d.unique) for d in decisions if d.action == "alert"] == [("alert", "s@2026-01-01T00:01:00Z")]
    decisions = sch.tick(t + 265)  # 00:02 + 125 s: no outcome at all
    assert [(d.action, d.unique) for d in decisions if d.action == "alert"] == [("alert", "s@2026-01-01T00:02:00Z")]
    assert sch.alert_counts == {"foreign": 1, "no_outcome": 1} and len(sch.alerts) == 2


def test_the_schedules_page_marks_a_last_run_that_is_not_this_schedules_job():
    from geartask.scheduler.listing import rows
    s = parse({"name": "s", "every": 60, "task": "t"}, "test")
    now = utc(2026, 1, 1, 0, 0, 30)
    own = {"state": "complete", "task": "t", "received_at": utc(2026, 1, 1, 0, 0, 1)}
    other = {"state": "complete", "task": "shell", "received_at": utc(2026, 1, 1, 0, 0, 1)}
    assert rows([s], lambda u: own, now)[0]["last"]["alert"] is False
    assert rows([s], lambda u: other, now)[0]["last"]["alert"] is True
