"""Tasks no worker serves: the sender's warning, and when a foreground job stops waiting.

One admin ``status`` per server answers for every task at once, so a call asks when it first
meets a task whose job a server accepted (not per job: a 20,000-job batch of one task asks
once), and again at most once per RECHECK seconds while foreground jobs wait for a task
nobody serves. Rules: docs/sender.md, "A task no worker serves".
"""

from __future__ import annotations

import difflib
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..display import printable
from ..errors import GeartaskError
from ..fleet.replies import parse_status
from ..fleet.server import connected

RECHECK = 1.0  # seconds between asks while foreground jobs wait for a task nobody serves
SERVED_TTL = 10.0  # a task seen served is not asked about again for this long (across calls)
MAX_REMEMBERED = 10_000  # served tasks remembered per sender
ASK_TIMEOUT = 2.0  # seconds one server's `status` may take (at most sender.submit_timeout)
INTERNAL_PREFIX = "geartask."  # internal functions (outcomes, control) are never offered as hints


@dataclass
class Snapshot:
    """Who serves what, from the servers that answered one round of ``status``."""

    at: float  # time.monotonic() of the round
    workers: dict[str, int]  # task -> workers able to run it, summed over the servers asked
    asked: list[str]  # the servers that answered
    failed: dict[str, str] = field(default_factory=dict)  # server -> why it did not answer

    def serves(self, task: str) -> bool:
        return self.workers.get(task, 0) > 0

    def hint(self, task: str) -> str | None:
        """The served task name closest to ``task`` (difflib), or None."""
        names = [t for t, n in self.workers.items() if n > 0 and t != task
                 and (task.startswith(INTERNAL_PREFIX) or not t.startswith(INTERNAL_PREFIX))]
        close = difflib.get_close_matches(task, names, n=1, cutoff=0.6)
        return close[0] if close else None

    def where(self) -> str:
        return ", ".join(self.asked) or "none"


def ask_status(host: str, port: int, timeout: float) -> dict[str, int]:
    """One admin ``status`` on one server: workers per function (names are a peer's text)."""
    with connected(host, port, timeout) as conn:
        return {f.function: f.workers for f in parse_status(conn.text_command("status", timeout))}


class ServedTasks:
    """A JobSender's memory of which tasks were seen served, shared by its calls, so a loop
    of one-job ``submit()`` calls does not ask gearmand each time."""

    def __init__(self) -> None:
        self.served_at: dict[str, float] = {}

    def recently_served(self, task: str, now: float) -> bool:
        at = self.served_at.get(task)
        return at is not None and now - at < SERVED_TTL

    def remember(self, snapshot: Snapshot) -> None:
        for task, n in snapshot.workers.items():
            if n > 0:
                self.served_at[task] = snapshot.at
        while len(self.served_at) > MAX_REMEMBERED:
            del self.served_at[next(iter(self.served_at))]


def ask(servers: Iterable[tuple[str, int]], timeout: float, now: float | None = None) -> Snapshot | None:
    """One round of ``status`` on ``servers``; None when none answered (no verdict)."""
    workers: dict[str, int] = {}
    asked: list[str] = []
    failed: dict[str, str] = {}
    for host, port in servers:
        address = f"{host}:{port}"
        try:
            counts = ask_status(host, port, timeout)
        except (GeartaskError, OSError) as e:
            failed[address] = str(e).removeprefix(address + ": ")
            continue
        asked.append(address)
        for task, n in counts.items():
            workers[task] = workers.get(task, 0) + n
    if not asked:
        return None
    return Snapshot(time.monotonic() if now is None else now, workers, asked, failed)


def unserved_text(task: str, snapshot: Snapshot) -> str:
    """'no worker serves task 'x' on any server (A, B); did you mean 'y'?'"""
    text = f"no worker serves task {printable(task)!r} on any server ({printable(snapshot.where())})"
    hint = snapshot.hint(task)
    if hint is not None:
        text += f"; did you mean {printable(hint)!r}?"
    return text


class Unserved:
    """One call's view of the tasks nobody serves: since when (the foreground deadline runs
    from there), what was said, and which tasks were given up on."""

    def __init__(self, servers_of: Any, timeout: float, no_worker_timeout: float, log: Any,
                 memory: ServedTasks | None = None):
        self.servers_of = servers_of  # () -> [(host, port)] of the servers answering now
        self.timeout = min(timeout, ASK_TIMEOUT)
        self.limit = no_worker_timeout
        self.log = log
        self.memory = memory if memory is not None else ServedTasks()
        self.snapshot: Snapshot | None = None
        self.verdict: dict[str, bool] = {}  # task -> served, as first found in this call
        self.since: dict[str, float] = {}  # task nobody serves -> when that was found
        self.text: dict[str, str] = {}  # task nobody serves -> the warning's text
        self.given_up: dict[str, str] = {}  # task -> the error its foreground jobs fail with
        self.warned: set[tuple[str, bool]] = set()  # (task, background) said once per call
        self.next_ask = 0.0

    def _ask(self, now: float) -> Snapshot | None:
        self.next_ask = now + RECHECK
        snap = ask(self.servers_of(), self.timeout, now)
        if snap is not None:
            self.snapshot = snap
            self.memory.remember(snap)
        return snap

    def unserved(self, task: str, background: bool, now: float) -> bool:
        """Whether nobody serves ``task`` (a job of it was just accepted); says so once per
        task and kind of job. Asks only for a task new to this call and not seen served
        lately, and reuses a round younger than RECHECK."""
        known = self.verdict.get(task)
        if known is None:
            if self.memory.recently_served(task, now):
                known = True
            else:
                snap = self.snapshot
                if snap is None or now - snap.at >= RECHECK:
                    snap = self._ask(now)
                if snap is None:
                    return False  # no server answered `status`: no verdict, no warning
                known = snap.serves(task)
            self.verdict[task] = known
            if not known:
                self.since[task] = now
                self.text[task] = unserved_text(task, self.snapshot)  # type: ignore[arg-type]
        if known:
            return False
        if (task, background) not in self.warned:
            self.warned.add((task, background))
            if background:
                self.log.warning(f"{self.text[task]}: background jobs of it stay queued until a worker for it "
                                 f"connects; to remove them: geartask manage clear {printable(task)}",
                                 task=task, servers=self.snapshot.asked if self.snapshot else [])
            else:
                self.log.warning(f"{self.text[task]}: waiting up to {self.limit:g}s (sender.no_worker_timeout) "
                                 f"for a worker", task=task, servers=self.snapshot.asked if self.snapshot else [])
        return True

    def due(self, now: float) -> bool:
        return bool(self.since) and now >= self.next_ask

    def recheck(self, waiting: set[str], now: float) -> list[str]:
        """Ask again about ``waiting`` (tasks nobody served with foreground jobs still open);
        a task served now is forgotten (its jobs run), one unserved for no_worker_timeout is
        returned to be given up on."""
        if not waiting:
            self.next_ask = now + RECHECK
            return []
        snap = self._ask(now)
        expired = []
        for task in sorted(waiting):
            if snap is not None and snap.serves(task):
                self.log.info(f"a worker for task {printable(task)!r} appeared: its jobs run", task=task)
                self.verdict[task] = True
                self.since.pop(task, None)
                continue
            if now - self.since[task] >= self.limit:
                self.given_up[task] = (f"{self.text[task]}; gave up after {self.limit:g}s "
                                       f"(sender.no_worker_timeout): not run")
                expired.append(task)
        return expired
