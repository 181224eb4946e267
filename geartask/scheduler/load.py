"""Every schedule a scheduler runs: the config's ``schedules`` list and the plugins' hook."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..plugins import BUILTIN_TASKS, Plugins
from .schedule import Schedule, check_unique_names, parse

if TYPE_CHECKING:
    from ..config import Config


def load_schedules(config: Config, plugins: Plugins) -> list[Schedule]:
    """Validated schedules, config first; ScheduleError (exit 2) names the bad one and its file."""
    tasks = set(plugins.tasks()) | set(BUILTIN_TASKS)
    where = str(config.source or "config")
    out = [parse(obj, f"{where}: schedules[{i}]", tasks) for i, obj in enumerate(config.schedules)]
    out += [parse(obj, f"plugin {plugin!r} ({plugins.files.get(plugin)}) schedule #{i + 1}", tasks)
            for plugin, i, obj in plugins.schedules()]
    check_unique_names(out)
    return out
