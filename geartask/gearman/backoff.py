"""Reconnect backoff and adaptive answer deadlines: one policy for every role, pure (a clock
and a random source can be passed in), so it is unit-tested without sockets."""

from __future__ import annotations

import random
from typing import Callable

RECONNECT_MIN, RECONNECT_MAX = 0.2, 10.0  # seconds between tries to reach a server that is down


class Backoff:
    """Exponential backoff with jitter between ``low`` and ``high`` seconds.

    ``next()`` returns the wait before the next try and doubles the base; each wait is drawn
    from [base/2, base] ("equal jitter"), so many clients cut off by one outage do not all
    come back in the same instant. ``reset()`` after a success. ``failures`` counts the tries
    since the last success (what a log line that hides repeats says it hid).
    """

    def __init__(self, low: float = RECONNECT_MIN, high: float = RECONNECT_MAX,
                 rand: Callable[[], float] = random.random):
        if not 0 < low <= high:
            raise ValueError(f"backoff needs 0 < low <= high, got {low}, {high}")
        self.low, self.high, self._rand = low, high, rand
        self.base = low
        self.failures = 0

    def next(self) -> float:
        base = self.base
        self.base = min(self.high, base * 2)
        self.failures += 1
        return max(self.low, base / 2 + base / 2 * self._rand())

    def reset(self) -> int:
        """A success: start again at ``low``. Returns the failures it ends (for the log)."""
        failures, self.base, self.failures = self.failures, self.low, 0
        return failures


class AnswerDeadline:
    """How long to wait for a server's answer before calling it silent: a multiple of the
    measured round trip (a smoothed mean and deviation, as TCP does), never below ``floor``
    seconds nor above ``ceiling``, and doubled after each miss until an answer comes.

    A fixed 5 s deadline made a slow path a reconnect storm (issue 18: 2,895 reconnects
    through 50 ms each way); this one grows with the path and with each miss.
    """

    def __init__(self, floor: float = 5.0, ceiling: float = 60.0, factor: float = 8.0):
        if not 0 < floor <= ceiling:
            raise ValueError(f"deadline needs 0 < floor <= ceiling, got {floor}, {ceiling}")
        self.floor, self.ceiling, self.factor = floor, ceiling, factor
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.misses = 0

    def measured(self, rtt: float) -> None:
        """An answer came after ``rtt`` seconds."""
        rtt = max(0.0, rtt)
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.misses = 0

    def missed(self) -> None:
        """No answer within the deadline: wait longer next time."""
        self.misses += 1

    @property
    def seconds(self) -> float:
        base = self.floor if self.srtt is None else max(self.floor, self.factor * (self.srtt + 4 * self.rttvar))
        return min(self.ceiling, base * (2 ** min(self.misses, 16)))


class Repeats:
    """A log that says an outage once and, when it ends, how many repeats it hid.

    ``first()`` is True for the first failure of a stretch (log it); ``end()`` returns the
    failures hidden since (0: nothing to say) and starts a new stretch.
    """

    def __init__(self) -> None:
        self.count = 0

    def first(self) -> bool:
        self.count += 1
        return self.count == 1

    def end(self) -> int:
        hidden, self.count = max(0, self.count - 1), 0
        return hidden
