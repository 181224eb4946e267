"""worker.tasks: which of a process's threads serve which tasks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .grab import Sleepers

if TYPE_CHECKING:
    from ..config import Config


@dataclass
class ThreadGroup:
    """``threads`` job threads that serve ``tasks`` (and share one Sleepers)."""

    tasks: list[str]
    threads: int
    dedicated: bool = False  # a task's own threads (worker.tasks), or the shared rest
    sleepers: Sleepers = field(default_factory=Sleepers)


def plan_groups(config: Config, threads: int, tasks: list[str]) -> list[ThreadGroup]:
    """Split ``threads`` between the tasks of ``worker.tasks`` (their own threads each) and
    every other task of ``tasks`` (the rest). ConfigError, naming the key, for a name that is
    not a task this worker serves, or dedicated threads that leave none for the other tasks."""
    source = str(config.source) if config.source else None
    dedicated = config.worker.tasks
    groups = []
    for name, options in dedicated.items():
        if name not in tasks:
            raise ConfigError(f"{name!r} is not a task this worker serves (tasks: {', '.join(sorted(tasks))})",
                              source, f"worker.tasks.{name}")
        groups.append(ThreadGroup([name], options.threads, dedicated=True))
    own = sum(g.threads for g in groups)
    others = sorted(t for t in tasks if t not in dedicated)
    rest = threads - own
    hint = "raise the threads (--threads, worker.threads) or give fewer here"
    if rest < 0:
        raise ConfigError(f"the dedicated threads ({own}) are more than the {threads} worker threads; {hint}",
                          source, "worker.tasks")
    if others and rest == 0:
        raise ConfigError(f"the dedicated threads ({own}) leave none of the {threads} worker threads for the "
                          f"other tasks ({', '.join(others)}); {hint}", source, "worker.tasks")
    if not others and rest > 0:
        raise ConfigError(f"every task has threads of its own ({own} in all), so {rest} of the {threads} worker "
                          f"threads would serve nothing; make them add up to the threads", source, "worker.tasks")
    if others:
        groups.append(ThreadGroup(others, rest))
    return groups
