"""Tasks no worker serves: the sender's warning, and when a foreground job stops waiting.

One admin ``status`` per server answers for every task at once, so a call asks when it first
meets a task (not per job: a 20,000-job batch of one task asks once), and again at most once
per RECHECK seconds while foreground jobs wait for a task nobody serves. Rules:
docs/sender.md, "A task no worker serves".
"""

from __future__ import annotations

import difflib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from ..address import format_address
from ..display import printable
from ..errors import GeartaskError
from ..fleet.replies import parse_status
from ..fleet.server import connected

RECHECK = 1.0  # seconds between asks while foreground jobs wait for a task nobody serves
SERVED_TTL = 10.0  # a task seen served is not asked about again for this long (across calls)
MAX_REMEMBERED = 10_000  # served tasks remembered per sender
ASK_TIMEOUT = 1.0  # seconds an ask may hold the call up (at most sender.submit_timeout)
WATCH_EVERY = 5.0  # seconds without a result before served tasks with waiting jobs are asked about again
MAX_BACKOFF = 30.0  # a server that did not answer is asked again after 1, 2, 4... up to this many seconds
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
    """One round of ``status`` on ``servers``, all at once; None when none answered (no verdict)."""
    servers = list(servers)

    def one(server: tuple[str, int]) -> tuple[str, dict[str, int] | str]:
        host, port = server
        address = format_address(host, port)
        try:
            return address, ask_status(host, port, timeout)
        except (GeartaskError, OSError) as e:
            return address, str(e).removeprefix(f"{address}: ")

    if len(servers) == 1:
        answers = [one(servers[0])]
    else:  # a silent server must not hold up the others' answers
        with ThreadPoolExecutor(max_workers=min(len(servers), 16)) as pool:
            answers = list(pool.map(one, servers))
    workers: dict[str, int] = {}
    asked: list[str] = []
    failed: dict[str, str] = {}
    for address, answer in answers:
        if isinstance(answer, str):
            failed[address] = answer
            continue
        asked.append(address)
        for task, n in answer.items():
            workers[task] = workers.get(task, 0) + n
    if not asked:
        return None
    return Snapshot(time.monotonic() if now is None else now, workers, asked, failed)


def lost_text(task: str, snapshot: Snapshot) -> str:
    """'no worker serves task 'x' any more on any server (A, B)': its workers went away."""
    return f"no worker serves task {printable(task)!r} any more on any server ({printable(snapshot.where())})"


def unserved_text(task: str, snapshot: Snapshot) -> str:
    """'no worker serves task 'x' on any server (A, B); did you mean 'y'?'"""
    text = f"no worker serves task {printable(task)!r} on any server ({printable(snapshot.where())})"
    hint = snapshot.hint(task)
    if hint is not None:
        text += f"; did you mean {printable(hint)!r}?"
    return text


class Unserved:
    """One call's view of the tasks nobody serves: since when (the foreground deadline runs
    from there), what was said, and which tasks were given up on.

    A task is looked up when its first job is taken from the caller, before anything of it is
    sent: gearmand then answers ``status`` at once (behind a flood of our own submissions on a
    sqlite queue it took seconds, measured), and every JobResult can carry the verdict."""

    def __init__(self, servers: list[tuple[str, int]], timeout: float, no_worker_timeout: float, log: Any,
                 memory: ServedTasks | None = None, asker: Callable[..., Snapshot | None] | None = None):
        self.servers = servers
        self.asker = asker or ask  # ask(servers, timeout, now); a test gives answers and a clock
        # An idle gearmand answers in milliseconds; one busy with a flood of submissions (a sqlite
        # queue) can take seconds: then the verdict waits for a later round, the call does not.
        self.timeout = min(timeout, ASK_TIMEOUT)
        self.backoff: dict[str, tuple[float, int]] = {}  # server -> (ask again at, failures in a row)
        self.limit = no_worker_timeout
        self.log = log
        self.memory = memory if memory is not None else ServedTasks()
        self.snapshot: Snapshot | None = None
        self.verdict: dict[str, bool] = {}  # task -> served, as first found in this call
        self.undecided: set[str] = set()  # tasks met while no server answered `status`
        self.since: dict[str, float] = {}  # task nobody serves -> when that was found
        self.text: dict[str, str] = {}  # task nobody serves -> the warning's text
        self.given_up: dict[str, str] = {}  # task -> the error its foreground jobs fail with
        self.warned: set[tuple[str, bool]] = set()  # (task, background) said once per call
        self.lost: set[str] = set()  # tasks served when first met whose workers all went away since
        self.next_ask = 0.0
        self.next_watch = 0.0  # when served tasks with waiting jobs may be asked about again

    def _ask(self, now: float) -> Snapshot | None:
        """One round, of the servers not backing off: a silent one costs the call at most
        ASK_TIMEOUT per round, and rounds of it grow apart."""
        servers = [s for s in self.servers if now >= self.backoff.get(format_address(*s), (0.0, 0))[0]]
        snap = self.asker(servers, self.timeout, now) if servers else None
        for address in (snap.failed if snap is not None else [format_address(h, p) for h, p in servers]):
            failures = self.backoff.get(address, (0.0, 0))[1] + 1
            self.backoff[address] = (now + min(MAX_BACKOFF, RECHECK * 2 ** failures), failures)
        for address in (snap.asked if snap is not None else []):
            self.backoff.pop(address, None)
        self.next_ask = now + RECHECK
        if snap is not None:
            self.snapshot = snap
            self.memory.remember(snap)
        return snap

    def _decide(self, task: str, snap: Snapshot, now: float) -> bool:
        served = self.verdict[task] = snap.serves(task)
        self.undecided.discard(task)
        if not served:
            self.since[task] = now
            self.text[task] = unserved_text(task, snap)
        return served

    def seen(self, task: str, background: bool, now: float) -> bool:
        """Whether nobody serves ``task`` (a job of it is about to be sent); says so once per
        task and kind of job. Asks only for a task new to this call and not seen served
        lately, and reuses a round younger than RECHECK."""
        known = self.verdict.get(task)
        if known is None:
            if self.memory.recently_served(task, now):
                known = self.verdict[task] = True
            else:
                snap = self.snapshot
                if (snap is None or now - snap.at >= RECHECK) and now >= self.next_ask:
                    snap = self._ask(now)
                if snap is None or now - snap.at >= RECHECK:
                    self.undecided.add(task)  # no answer now: asked again while its jobs wait
                    return False
                known = self._decide(task, snap, now)
        if not known:
            self._say(task, background)
        return not known

    def _say(self, task: str, background: bool) -> None:
        if (task, background) in self.warned:
            return
        self.warned.add((task, background))
        servers = self.snapshot.asked if self.snapshot else []
        if background:
            self.log.warning(f"{self.text[task]}: background jobs of it stay queued until a worker for it "
                             f"connects; to remove them: geartask manage clear {printable(task)}",
                             task=task, servers=servers)
        else:
            self.log.warning(f"{self.text[task]}: waiting up to {self.limit:g}s (sender.no_worker_timeout) "
                             f"for a worker", task=task, servers=servers)

    def due(self, now: float) -> bool:
        return bool(self.since or self.undecided) and now >= self.next_ask

    def recheck(self, waiting: set[str], now: float) -> list[str]:
        """Ask again about ``waiting`` (tasks with foreground jobs still open that nobody
        served, or that had no verdict yet): a task served now is forgotten (its jobs run),
        one unserved for no_worker_timeout is returned to be given up on."""
        if not waiting:
            self.next_ask = now + RECHECK
            return []
        snap = self._ask(now)
        expired = []
        for task in sorted(waiting):
            if task in self.undecided:
                if snap is not None and not self._decide(task, snap, now):
                    self._say(task, False)
                continue
            if snap is not None and snap.serves(task):
                self.log.info(f"a worker for task {printable(task)!r} appeared: its jobs run", task=task)
                self.verdict[task] = True
                self.since.pop(task, None)
                self.lost.discard(task)
                continue
            if snap is not None and now - self.since[task] >= self.limit:  # only on an answer
                end = "no answer" if task in self.lost else "not run"  # a lost one may have started
                self.given_up[task] = (f"{self.text[task]}; gave up after {self.limit:g}s "
                                       f"(sender.no_worker_timeout): {end}")
                expired.append(task)
        return expired

    def watch_due(self, now: float, quiet_since: float) -> bool:
        """Time to ask about served tasks again: nothing finished since ``quiet_since`` for
        WATCH_EVERY (at most no_worker_timeout), so a batch whose results keep coming never asks."""
        every = self.watch_every()
        return now - quiet_since >= every and now >= self.next_watch

    def watch_every(self) -> float:
        return max(RECHECK, min(WATCH_EVERY, self.limit))

    def watch(self, waiting: set[str], now: float) -> None:
        """Ask whether tasks seen served, whose foreground jobs still wait, are served still.
        A task whose every worker went away (killed, its host cut off; gearmand then requeues
        its running job for nobody, as for a ``TASK@host:HOST`` of a dead host) is treated from
        now on as a task nobody serves: its jobs get no_worker_timeout, then fail."""
        self.next_watch = now + self.watch_every()
        tasks = sorted(t for t in waiting if self.verdict.get(t) and t not in self.since)
        if not tasks:
            return
        snap = self.snapshot if self.snapshot is not None and now - self.snapshot.at < RECHECK else self._ask(now)
        if snap is None:
            return
        for task in tasks:
            if snap.serves(task):
                continue
            self.verdict[task] = False
            self.since[task] = now
            self.lost.add(task)
            self.memory.served_at.pop(task, None)
            self.text[task] = lost_text(task, snap)
            self.log.warning(f"{self.text[task]} (its workers went away): its jobs wait up to {self.limit:g}s "
                             f"(sender.no_worker_timeout) for a worker", task=task, servers=snap.asked)
