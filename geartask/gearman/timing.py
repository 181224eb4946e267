"""How long to wait for a server's answer: adapted to the measured round trip, backed off on misses.

Pure arithmetic on numbers the caller measures; no clock of its own, no sockets.

A fixed "connected, but no answer within 5 s" turns a slow path into a reconnect storm:
1,000 worker threads through a path with 50 ms of delay each way made 2,895 reconnects and
took 210 s to register, each reconnect adding to the backlog that made the server slow. So
the deadline is ``max(ANSWER_FLOOR, RTT_FACTOR x smoothed round trip)`` (the round trip is
shared by every link of a process to one server, so the threads that got their answer teach
the others how slow the server is), and each miss in a row doubles it, up to ANSWER_MAX.
"""

from __future__ import annotations

ANSWER_FLOOR = 5.0  # seconds: never give up on an answer sooner (today's fixed deadline)
ANSWER_MAX = 120.0  # seconds: the longest an answer is waited for, however slow the path
RTT_FACTOR = 4.0  # a deadline is this many smoothed round trips (when that exceeds the floor)
RTT_GAIN = 0.125  # weight of a new sample in the smoothed round trip (RFC 6298's alpha)


class RoundTrip:
    """The smoothed round trip to one server, fed by every answer a link waited for.

    Shared by a process's links to one server; updates race only in losing a sample (a
    float assignment under the GIL), which is harmless for an estimate.
    """

    __slots__ = ("srtt", "samples")

    def __init__(self) -> None:
        self.srtt = 0.0
        self.samples = 0

    def sample(self, seconds: float) -> None:
        if seconds < 0:
            return
        if self.samples == 0:
            self.srtt = seconds
        else:
            self.srtt += RTT_GAIN * (seconds - self.srtt)
        self.samples += 1

    def deadline(self, misses: int = 0, floor: float = ANSWER_FLOOR) -> float:
        """Seconds to wait for an answer after ``misses`` deadlines missed in a row."""
        base = max(floor, RTT_FACTOR * self.srtt)
        if misses > 0:
            base *= 2.0 ** min(misses, 16)
        return min(base, max(ANSWER_MAX, floor))


def next_backoff(backoff: float, low: float, high: float) -> float:
    """The reconnect delay after one more failure: doubled, within [low, high]."""
    return min(max(backoff * 2, low), high)
