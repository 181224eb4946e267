"""A schedule: which job to send at which instants ("slots"), from config or a plugin.

Slots are instants in UTC. A cron expression is read in the schedule's ``timezone`` by
cronsim (which follows Debian cron across DST: a time in the skipped hour runs when the
clock jumps, a time in the repeated hour runs once); ``every: N`` slots are the multiples
of N seconds since the Unix epoch, so every scheduler computes the same ones.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from ..config import PRIORITIES
from ..errors import EXIT_USAGE, GeartaskError, JobDefinitionError
from ..jobs import encode_payload

MAX_UNIQUE = 64  # gearmand's limit on a unique key
SLOT_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
MAX_NAME = MAX_UNIQUE - len("@2026-01-01T00:00:00Z")  # the unique key is NAME@SLOT
MISFIRE = ("latest", "skip", "all")
KEYS = {"name", "cron", "every", "task", "data", "priority", "timezone", "jitter", "misfire", "misfire_cap"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")


class ScheduleError(GeartaskError):
    """Raised for a schedule that can't run: the message names the schedule and where it came from."""

    exit_status = EXIT_USAGE

    def __init__(self, message: str, source: str):
        self.source = source
        super().__init__(f"{source}: {message}")


@dataclass(frozen=True)
class Schedule:
    name: str
    task: str
    source: str  # where it was defined, for messages: "config.yaml: schedules[2]" or "plugin p (file)"
    cron: str | None = None
    every: int | None = None  # seconds
    data: Any = None
    priority: str = "normal"
    timezone: str = "UTC"  # the cron fields' time zone; slots are UTC instants either way
    jitter: int = 0  # seconds: each slot runs up to this much later, the same delay in every scheduler
    misfire: str = "latest"  # latest | skip | all: which missed slots a late scheduler sends
    misfire_cap: int = 10  # misfire: all sends at most this many
    _tz: Any = field(default=None, repr=False, compare=False)

    def unique(self, slot: float) -> str:
        """The job's unique key for one slot: NAME@2026-03-29T01:00:00Z."""
        return f"{self.name}@{slot_text(slot)}"

    def run_at(self, slot: float) -> int:
        """When the slot's job runs (whole seconds, gearmand's resolution): the slot plus a
        jitter derived from the unique key, so every scheduler asks for the same instant."""
        if not self.jitter:
            return int(math.ceil(slot))
        h = int.from_bytes(hashlib.blake2b(self.unique(slot).encode(), digest_size=8).digest(), "big")
        return int(math.ceil(slot)) + h % (self.jitter + 1)

    def after(self, t: float) -> Iterator[float]:
        """Slots strictly after ``t``, in order (an endless iterator)."""
        if self.every:
            k = math.floor(t / self.every) + 1
            while True:
                yield float(k * self.every)
                k += 1
        assert self.cron is not None  # a schedule has 'every' or 'cron' (load checks)
        start = datetime.fromtimestamp(t, self._tz)
        for dt in CronSim(self.cron, start):
            yield dt.timestamp()

    def last(self, t: float) -> float | None:
        """The most recent slot at or before ``t``."""
        if self.every:
            return float(math.floor(t / self.every) * self.every)
        assert self.cron is not None  # a schedule has 'every' or 'cron' (load checks)
        start = datetime.fromtimestamp(math.floor(t) + 1, self._tz)  # cronsim's reverse excludes its start
        try:
            return next(iter(CronSim(self.cron, start, reverse=True))).timestamp()
        except StopIteration:  # pragma: no cover - a cron expression that never matches
            return None

    def between(self, a: float, b: float, limit: int) -> list[float]:
        """Slots in (a, b], oldest first, at most ``limit`` (the newest ``limit`` when more)."""
        out: list[float] = []
        for s in self.after(a):
            if s > b:
                break
            out.append(s)
            if len(out) > limit:
                out.pop(0)
        return out

    def period_near(self, t: float) -> float:
        """The gap between the next two slots after ``t`` (how far ahead a slot may be sent)."""
        if self.every:
            return float(self.every)
        it = self.after(t)
        first = next(it)
        return next(it) - first


def slot_text(slot: float) -> str:
    return datetime.fromtimestamp(slot, timezone.utc).strftime(SLOT_FORMAT)


def parse(obj: Any, source: str, tasks: set[str] | None = None) -> Schedule:
    """Validate one schedule definition (a mapping) and build it; ScheduleError otherwise.

    ``tasks``: the task names known here (plugins' and the shell task); None skips the check.
    """
    if not isinstance(obj, dict):
        raise ScheduleError(f"a schedule must be a mapping with name, task and cron or every, got {obj!r}", source)
    name = obj.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > MAX_NAME:
        raise ScheduleError(f"'name' must be letters, digits and . _ : - (at most {MAX_NAME}), got {name!r}",
                            source)
    source = f"{source} ({name})"
    unknown = sorted(set(obj) - KEYS)
    if unknown:
        raise ScheduleError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(KEYS))})", source)
    task = obj.get("task")
    if not isinstance(task, str) or not task or any(c.isspace() for c in task):
        raise ScheduleError(f"'task' must be a task name, got {task!r}", source)
    if tasks is not None and task not in tasks:
        raise ScheduleError(f"unknown task {task!r}: no enabled plugin provides it", source)
    cron, every = obj.get("cron"), obj.get("every")
    if (cron is None) == (every is None):
        raise ScheduleError("give exactly one of 'cron' and 'every'", source)
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ScheduleError(f"'every' must be a whole number of seconds >= 1, got {every!r}", source)
    tz_name = obj.get("timezone", "UTC")
    if not isinstance(tz_name, str):
        raise ScheduleError(f"'timezone' must be a name like Europe/Berlin, got {tz_name!r}", source)
    try:
        tz = ZoneInfo(tz_name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(f"unknown timezone {tz_name!r}", source) from None
    if cron is not None:
        if not isinstance(cron, str):
            raise ScheduleError(f"'cron' must be a string like \"*/5 * * * *\", got {cron!r}", source)
        try:
            next(iter(CronSim(cron, datetime.now(tz))))
        except (CronSimError, StopIteration) as e:
            raise ScheduleError(f"bad cron expression {cron!r}: {e or 'it never matches'}", source) from None
    priority = obj.get("priority", "normal")
    if priority not in PRIORITIES:
        raise ScheduleError(f"'priority' must be one of {', '.join(PRIORITIES)}, got {priority!r}", source)
    jitter = obj.get("jitter", 0)
    if isinstance(jitter, bool) or not isinstance(jitter, int) or jitter < 0:
        raise ScheduleError(f"'jitter' must be a whole number of seconds >= 0, got {jitter!r}", source)
    misfire = obj.get("misfire", "latest")
    if misfire not in MISFIRE:
        raise ScheduleError(f"'misfire' must be one of {', '.join(MISFIRE)}, got {misfire!r}", source)
    cap = obj.get("misfire_cap", 10)
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ScheduleError(f"'misfire_cap' must be a whole number >= 1, got {cap!r}", source)
    data = obj.get("data")
    try:
        encode_payload(data, task)
    except JobDefinitionError as e:
        raise ScheduleError(f"'data' {e}", source) from None
    return Schedule(name=name, task=task, source=source, cron=cron, every=every, data=data, priority=priority,
                    timezone=tz_name, jitter=jitter, misfire=misfire, misfire_cap=cap, _tz=tz)


def check_unique_names(schedules: list[Schedule]) -> None:
    seen: dict[str, Schedule] = {}
    for s in schedules:
        if s.name in seen:
            raise ScheduleError(f"two schedules are named {s.name!r}: also {seen[s.name].source}", s.source)
        seen[s.name] = s
