"""The grab cycle's pure state machine (geartask.gearman.grab) and its deadlines
(geartask.gearman.timing): no gearmand, no sockets, a fake clock and fake packets."""

from __future__ import annotations

import pytest

from geartask import gearman as gp
from geartask.gearman.grab import (ACK, BUSY, DOWN, ERROR_ACT, GRAB, GRAB_PACKET, GRABBING, HELLO, HELLO_TIMEOUT,
                                   IDLE, JOB, LATE, LATE_ACT, NOTHING, PARKED, PRE_SLEEP_PACKET, READY, REST,
                                   SLEEPING, LinkMachine, abilities_packets, hello_packets)
from geartask.gearman.timing import ANSWER_FLOOR, ANSWER_MAX, RTT_FACTOR, RoundTrip, next_backoff


def commands(data: bytes) -> list[tuple[int, bytes]]:
    """(command, body) of each request packet in ``data``."""
    out = []
    while data:
        magic, cmd, n = gp.HEADER.unpack_from(data)
        assert magic == gp.MAGIC_REQ
        out.append((cmd, data[gp.HEADER_SIZE:gp.HEADER_SIZE + n]))
        data = data[gp.HEADER_SIZE + n:]
    return out


def ready(now: float = 0.0, poll_timeout: float = 60.0, rtt: RoundTrip | None = None) -> LinkMachine:
    m = LinkMachine(rtt, poll_timeout)
    m.connected(now, "me", ["t"])
    assert m.on_packet(gp.ECHO_RES, now + 0.001) is READY
    return m


def test_hello_sends_client_id_abilities_and_echo_then_the_echo_makes_it_idle():
    m = LinkMachine()
    assert m.state is DOWN and m.due(0.0)
    sent = m.connected(10.0, "w:1.2.3.4:9", ["a", "b"])
    assert [c for c, _ in commands(sent)] == [gp.SET_CLIENT_ID, gp.CAN_DO, gp.CAN_DO, gp.ECHO_REQ]
    assert [b for _, b in commands(sent)][1:3] == [b"a", b"b"]
    assert m.state is HELLO and not m.due(10.0)
    assert m.on_packet(gp.NOOP, 10.1) is NOTHING and m.state is HELLO  # only the echo proves it
    assert m.on_packet(gp.ECHO_RES, 10.2) is READY
    assert m.state is IDLE and m.rtt.srtt == pytest.approx(0.2)
    assert m.on_packet(gp.ECHO_RES, 10.3) is NOTHING  # a second echo answers nothing of ours
    assert sent == hello_packets("w:1.2.3.4:9", ["a", "b"])


def test_abilities_packets_reset_first():
    assert [c for c, _ in commands(abilities_packets(["x", "y"]))] == [gp.RESET_ABILITIES, gp.CAN_DO, gp.CAN_DO]


def test_grab_assign_answer_cycle():
    m = ready()
    assert m.grab(1.0) == GRAB_PACKET and m.state is GRABBING and m.pending == 1
    assert commands(GRAB_PACKET) == [(gp.GRAB_JOB_UNIQ, b"")]
    assert m.on_packet(gp.JOB_ASSIGN_UNIQ, 1.5) is JOB
    assert m.state is BUSY and m.pending == 0
    m.answered(2.0)
    assert m.state is IDLE
    # the fast path: answer and next grab in one write, straight from BUSY
    m.grab(2.0)
    assert m.assigned(2.1) is GRABBING and m.state is BUSY
    assert m.grab(2.2) == GRAB_PACKET and m.state is GRABBING


def test_no_job_then_pre_sleep_and_noop_wakes():
    m = ready()
    m.grab(1.0)
    assert m.on_packet(gp.NO_JOB, 1.1) is REST and m.no_jobs == 1
    assert m.rest(1.1, sleep=True) == PRE_SLEEP_PACKET and m.state is SLEEPING
    assert commands(PRE_SLEEP_PACKET) == [(gp.PRE_SLEEP, b"")]
    assert m.on_packet(gp.NOOP, 5.0) is GRAB and m.state is IDLE
    assert m.on_packet(gp.NOOP, 5.1) is NOTHING  # an idle link is not woken twice


def test_parked_link_sends_nothing_and_is_unparked_by_another():
    m = ready()
    m.grab(1.0)
    assert m.no_job(1.1) is GRABBING
    assert m.rest(1.1, sleep=False) == b"" and m.state is PARKED
    assert m.on_packet(gp.NOOP, 2.0) is NOTHING and m.state is PARKED  # gearmand never NOOPs it; ignore
    assert m.unpark(2.0) and m.state is IDLE
    assert not m.unpark(2.1)


def test_no_job_that_answers_nothing_asked_is_ignored():
    m = ready()
    assert m.on_packet(gp.NO_JOB, 1.0) is NOTHING and m.state is IDLE


def test_late_grab_keeps_the_link_and_still_serves_its_answer():
    m = ready()
    m.grab(100.0)
    assert m.tick(100.0 + ANSWER_FLOOR - 0.01) is NOTHING
    assert m.tick(100.0 + ANSWER_FLOOR) is LATE_ACT and m.state is LATE and m.waited == ANSWER_FLOOR
    assert m.tick(200.0) is NOTHING  # late once; it waits on, kept open
    assert m.pending == 1
    assert m.assigned(201.0) is LATE and m.state is BUSY  # the answer came after all: served
    m2 = ready()
    m2.grab(100.0)
    m2.tick(106.0)
    assert m2.on_packet(gp.NO_JOB, 107.0) is REST  # a late NO_JOB: rest like any other


def test_unasked_job_on_a_sleeping_link_is_served():
    m = ready()
    m.grab(1.0)
    m.no_job(1.1)
    m.rest(1.1, True)
    assert m.assigned(2.0) is SLEEPING and m.state is BUSY and m.pending == 0


def test_poll_timeout_regrab_from_sleeping_and_parked():
    for sleep in (True, False):
        m = ready(poll_timeout=30.0)
        m.grab(1.0)
        m.no_job(1.0)
        m.rest(1.0, sleep)
        assert m.deadline(1.0, 1000.0) == pytest.approx(30.0)
        assert m.tick(30.9) is NOTHING
        assert m.tick(31.0) is GRAB
        assert m.state in (SLEEPING, PARKED)  # the caller grabs; the machine only says so
        assert m.grab(31.0) == GRAB_PACKET and m.state is GRABBING


def test_error_and_job_created_are_reported():
    m = ready()
    assert m.on_packet(gp.ERROR, 1.0) is ERROR_ACT and m.state is IDLE
    assert m.on_packet(gp.JOB_CREATED, 1.0) is ACK and m.state is IDLE
    assert m.on_packet(gp.WORK_STATUS if hasattr(gp, "WORK_STATUS") else gp.OPTION_RES, 1.0) is NOTHING


def test_pipelined_grabs_rest_only_after_the_last_answer():
    """The collector and the admin drain grab N at once: REST comes with the N-th answer."""
    m = ready()
    assert commands(m.grab(1.0, 3)) == [(gp.GRAB_JOB_UNIQ, b"")] * 3
    assert m.pending == 3
    assert m.on_packet(gp.JOB_ASSIGN_UNIQ, 1.1) is JOB and m.state is BUSY
    assert m.on_packet(gp.NO_JOB, 1.2) is NOTHING and m.pending == 1
    assert m.on_packet(gp.JOB_ASSIGN_UNIQ, 1.3) is JOB and m.pending == 0
    m.answered(1.4)
    m.grab(1.4, 2)
    assert m.no_job(1.5) is None
    assert m.no_job(1.6) is GRABBING


def test_hello_timeout_drops_and_reconnect_backoff_doubles_within_bounds():
    m = LinkMachine()
    m.connected(0.0, "me", ["t"])
    assert m.deadline(0.0, 1000.0) == pytest.approx(ANSWER_FLOOR)
    assert m.tick(ANSWER_FLOOR) is HELLO_TIMEOUT and m.hello_misses == 1 and m.waited == ANSWER_FLOOR
    m.dropped(ANSWER_FLOOR)
    assert m.state is DOWN and m.reconnects == 1
    assert m.next_try == pytest.approx(ANSWER_FLOOR + gp.RECONNECT_MIN)
    delays = []
    t = 10.0
    for _ in range(12):
        m.connected(t, "me", ["t"])
        m.dropped(t)
        delays.append(m.next_try - t)
    assert delays[0] == pytest.approx(2 * gp.RECONNECT_MIN)
    assert all(b >= a for a, b in zip(delays, delays[1:], strict=False))
    assert max(delays) == gp.RECONNECT_MAX and min(delays) >= gp.RECONNECT_MIN
    assert m.deadline(t, 1000.0) == pytest.approx(gp.RECONNECT_MAX)
    assert not m.due(t + gp.RECONNECT_MAX - 0.01) and m.due(t + gp.RECONNECT_MAX)
    m.connected(100.0, "me", ["t"])
    m.hello_answered(100.1)
    assert m.backoff == gp.RECONNECT_MIN and m.hello_misses == 0  # an answer resets both


def test_hello_timeout_backs_off_on_repeated_misses():
    m = LinkMachine()
    waited = []
    t = 0.0
    for _ in range(8):
        m.connected(t, "me", ["t"])
        assert m.tick(t + m.hello_timeout - 0.001) is NOTHING
        t += m.hello_timeout + 1e-6  # (float sums: a hair past the deadline)
        assert m.tick(t) is HELLO_TIMEOUT
        waited.append(m.waited)
        m.dropped(t)
        t = m.next_try
    assert waited[:3] == pytest.approx([ANSWER_FLOOR, 2 * ANSWER_FLOOR, 4 * ANSWER_FLOOR])
    assert max(waited) == ANSWER_MAX
    m.connected(t, "me", ["t"])
    m.hello_answered(t + 1)
    assert m.hello_timeout == pytest.approx(RTT_FACTOR * m.rtt.srtt) or m.hello_timeout == ANSWER_FLOOR


def test_hello_timeout_adapts_to_the_measured_round_trip_shared_per_server():
    rtt = RoundTrip()
    fast = LinkMachine(rtt)
    assert fast.hello_timeout == ANSWER_FLOOR  # unmeasured: the floor
    fast.connected(0.0, "a", ["t"])
    fast.hello_answered(0.0005)
    assert fast.hello_timeout == ANSWER_FLOOR  # a fast server: never below the floor
    slow = RoundTrip()
    first = LinkMachine(slow)
    first.connected(0.0, "a", ["t"])
    first.hello_answered(3.0)  # a server swamped by a thousand hellos answers in 3 s
    other = LinkMachine(slow)  # another thread's link to the same server learns from it
    assert other.hello_timeout == pytest.approx(RTT_FACTOR * 3.0)
    other.connected(10.0, "b", ["t"])
    assert other.tick(10.0 + ANSWER_FLOOR + 0.1) is NOTHING  # 5 s would have dropped it
    assert other.on_packet(gp.ECHO_RES, 10.0 + 6.0) is READY
    assert other.grab_timeout > ANSWER_FLOOR  # a GRAB on that path is not declared late at 5 s either


def test_round_trip_smoothing_and_bounds():
    r = RoundTrip()
    r.sample(1.0)
    assert r.srtt == 1.0
    r.sample(9.0)
    assert r.srtt == pytest.approx(2.0)
    r.sample(-1.0)  # a clock step is not a sample
    assert r.samples == 2
    assert r.deadline() == pytest.approx(8.0)
    assert r.deadline(misses=100) == ANSWER_MAX
    assert r.deadline(floor=50.0) == 50.0
    assert next_backoff(0.1, 0.2, 10.0) == 0.2 and next_backoff(8.0, 0.2, 10.0) == 10.0


def test_deadline_is_the_nearest_and_never_negative():
    m = ready()
    assert m.deadline(1.0, 3.0) == 3.0  # idle: nothing to wait for but the horizon
    m.grab(1.0)
    assert m.deadline(2.0, 60.0) == pytest.approx(ANSWER_FLOOR - 1.0)
    assert m.deadline(100.0, 60.0) == 0.0
    m.assigned(3.0)
    assert m.deadline(3.0, 7.0) == 7.0  # busy: the job has no deadline here (the watchdog's)


def test_a_drop_clears_outstanding_grabs():
    m = ready()
    m.grab(1.0, 4)
    m.dropped(2.0)
    assert m.pending == 0 and m.state is DOWN
    m.connected(3.0, "me", ["t"])
    m.hello_answered(3.1)
    m.grab(4.0)
    assert m.no_job(4.1) is GRABBING  # old grabs are not counted against the new connection


def test_transitions_run_in_microseconds():
    """The per-job path: grab, assign, answer; identity states, no allocation per step."""
    import time
    m = ready()
    n = 20_000
    t0 = time.perf_counter()
    for i in range(n):
        m.grab(i)
        m.assigned(i)
    per = (time.perf_counter() - t0) / n
    assert per < 50e-6, per


class Recorder:
    """Takes the place of a module's logger: (level, event, fields) of each line."""

    def __init__(self):
        self.lines = []

    def __getattr__(self, level):
        return lambda event, **fields: self.lines.append((level, event, fields))


def test_outage_is_logged_once_and_its_end_counts_the_failures_it_hid(monkeypatch):
    from geartask.worker import grab as worker_grab
    rec = Recorder()
    monkeypatch.setattr(worker_grab, "log", rec)
    outage = worker_grab.Outage()
    for thread in range(3):
        for _ in range(4):
            outage.failed("s:1", thread, "connected, but no answer within 5s")
    assert [e for _, e, _ in rec.lines] == ["server unreachable; retrying with backoff"]
    outage.recovered("s:1", 0)
    outage.recovered("s:1", 1)
    assert len(rec.lines) == 1  # thread 2 still can't reach it
    outage.recovered("s:1", 2)
    level, event, fields = rec.lines[-1]
    assert (level, event, fields["failures"]) == ("info", "server reachable again", 12)
    assert fields["down_for"] >= 0
    outage.failed("s:1", 0, "refused")  # a new outage counts afresh
    outage.recovered("s:1", 0)
    assert rec.lines[-1][2]["failures"] == 1


def test_drain_n_jobs_of_one_function_on_an_adopted_connection():
    """What the admin drain does: an existing connection, CAN_DO, N grabs, answer, CANT_DO."""
    m = LinkMachine()
    sent = m.adopted(0.0, ["f"]) + m.grab(0.0, 3)
    assert [c for c, _ in commands(sent)] == [gp.CAN_DO] + [gp.GRAB_JOB_UNIQ] * 3
    acts = [m.on_packet(cmd, 0.1) for cmd in (gp.JOB_ASSIGN_UNIQ, gp.JOB_ASSIGN_UNIQ, gp.NO_JOB)]
    assert acts == [JOB, JOB, NOTHING] and m.pending == 0  # NO_JOB after jobs in the round: BUSY, answer them
    m.answered(0.2)
    m.grab(0.2, 2)
    assert [m.on_packet(gp.NO_JOB, 0.3) for _ in range(2)] == [NOTHING, REST]
    from geartask.gearman.grab import cant_do_packets
    assert commands(cant_do_packets(["f"])) == [(gp.CANT_DO, b"f")]
