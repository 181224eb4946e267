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


# The event a long-running role (worker, collector, scheduler) logs, at error level, for a TLS
# refusal: unlike an outage, a certificate problem does not pass by itself, so it must not read
# as "server unreachable".
REFUSED_EVENT = "TLS refused: a certificate problem, it will not pass by itself; retrying with backoff"


class OutageLog:
    """When a role that retries says what (pure: it is given the clock). An outage is said once,
    at its first failure; a TLS refusal is said once per outage at error level, also when the
    outage began as something else (the server came back refusing us); the line that ends the
    outage counts the failures it hid."""

    def __init__(self) -> None:
        self.since: float | None = None  # when the outage began; None: no outage
        self.failures = 0
        self.refusal_said = False

    def failed(self, refusal: bool, now: float) -> str | None:
        """One failed try. "down": the outage begins, say it; "refused": say this TLS refusal
        (error level); None: counted, not said."""
        self.failures += 1
        new = self.since is None
        if new:
            self.since = now
        if refusal and not self.refusal_said:
            self.refusal_said = True
            return "refused"
        return "down" if new else None

    def recovered(self, now: float) -> tuple[int, float] | None:
        """A success: (failures hidden, seconds down) when it ends an outage, else None."""
        if self.since is None:
            return None
        ended = (self.failures, now - self.since)
        self.since, self.failures, self.refusal_said = None, 0, False
        return ended
