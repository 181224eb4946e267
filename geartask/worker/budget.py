"""worker.max_jobs: the process takes at most N jobs, runs them all, then stops."""

from __future__ import annotations

import threading
from typing import Any, Callable


class JobBudget:
    """Permits for GRABs, so a process never receives a job beyond ``limit``.

    A thread takes a permit before it sends GRAB_JOB; a job that comes uses it up, a NO_JOB
    (or a connection lost before the answer) gives it back and wakes the threads that found
    none. So at most ``limit`` jobs are ever assigned to the process, and none is assigned to
    a thread that will not run it. When the ``limit``-th job has been answered, ``on_spent``
    is called (the process shuts down and exits 0, for its supervisor to start a fresh one).
    """

    limited = True

    def __init__(self, limit: int, on_spent: Callable[[], Any]):
        self.limit = limit
        self.left = limit  # permits not handed out
        self.answered = 0
        self.on_spent = on_spent
        self.lock = threading.Lock()
        self.waiting: set = set()  # threads that found no permit (woken by give_back)

    def take(self, thread: Any) -> bool:
        with self.lock:
            if self.left > 0:
                self.left -= 1
                return True
            self.waiting.add(thread)
            return False

    def give_back(self) -> None:
        with self.lock:
            self.left += 1
            waiting, self.waiting = self.waiting, set()
        for thread in waiting:
            thread.nudge()

    def job_done(self) -> None:
        """A job taken with a permit has been answered (or failed by the watchdog)."""
        with self.lock:
            self.answered += 1
            spent = self.answered == self.limit
        if spent:
            self.on_spent()


class Unlimited:
    """No worker.max_jobs: every GRAB may go out, and nothing is counted (JobBudget's
    interface, so the grab loop has no branch for "no limit")."""

    limited = False

    def take(self, thread: Any) -> bool:
        return True

    def give_back(self) -> None:
        pass

    def job_done(self) -> None:
        pass


UNLIMITED = Unlimited()
