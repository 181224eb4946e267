"""Reconnect backoff with jitter, and logs that count the repeats they hide: pure (a random
source can be passed in), so they are unit-tested without sockets. Adaptive answer
deadlines are timing.RoundTrip."""

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
