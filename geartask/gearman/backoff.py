"""Reconnect backoff with jitter: pure (a random source can be passed in), so it is
unit-tested without sockets. Adaptive answer deadlines are timing.RoundTrip."""

from __future__ import annotations

import random
from typing import Callable

from .timing import next_backoff

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
        self.base = next_backoff(base, self.low, self.high)
        self.failures += 1
        return max(self.low, base / 2 + base / 2 * self._rand())

    def reset(self) -> int:
        """A success: start again at ``low``. Returns the failures it ends (for the log)."""
        failures, self.base, self.failures = self.failures, self.low, 0
        return failures
