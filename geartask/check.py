"""``geartask check``: everything a worker or a scheduler started with this config would refuse,
found without starting anything. Warnings (a ``plugins.paths`` folder that is not there) go
to stderr and leave the exit status 0."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Sequence

from .cli import ArgumentParser, add_common_args, config_from_args
from .control import check_name
from .display import printable
from .errors import EXIT_OK, EXIT_USAGE, ConfigError, UsageError
from .plugins import load_plugins, plugin_path_warnings
from .scheduler.load import load_schedules
from .worker.isolate import isolated_tasks
from .worker.process import WorkerProcess
from .worker.resources import check_keepalive, check_threads

if TYPE_CHECKING:
    from .config import Config


def check(config: Config) -> tuple[list[str], list[str]]:
    """The checks a worker and a scheduler make at start, in their order; raises their
    ConfigError/PluginError/ScheduleError. Returns (lines to print, warnings)."""
    warnings = plugin_path_warnings(config)
    source = str(config.source) if config.source else None
    # the worker's: name, threads, keepalive, plugins and their tasks, isolate, worker.tasks
    try:
        check_name(config.worker.name)
    except UsageError as e:
        raise ConfigError(str(e), source, "worker.name") from None
    threads = check_threads(config.worker.threads, source, flag=False)
    check_keepalive(config.worker.keepalive, source)
    plugins = load_plugins(config)
    plugin_tasks = plugins.tasks()
    WorkerProcess.plan(config, threads, isolated_tasks(plugin_tasks, config))
    # the scheduler's: every schedule (cron, task names, ...), config's and plugins'
    schedules = load_schedules(config, plugins)
    # a bare IPv6 entry is said as it is read: the whole of it is the host (docs/configuration.md)
    shown = [f"{s} (read as {a})" if ":" in a.host and not s.strip().startswith(("[", "tls://[")) else s
             for s, a in zip(config.servers, config.server_addresses, strict=True)]
    lines = [f"config: {config.source or '(defaults)'}", f"servers: {', '.join(shown)}"]
    for name in plugins.names:
        tasks = sorted(t for t, (_, p) in plugin_tasks.items() if p == name)
        lines.append(f"plugin {name} ({plugins.files[name]}): tasks {', '.join(tasks) or '-'}")
    if schedules:
        lines.append(f"schedules: {', '.join(s.name for s in schedules)}")
    return lines, warnings


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="geartask check",
                            description="Check the config, the enabled plugins and the schedules as a worker and a "
                                        "scheduler would, without starting anything.")
    add_common_args(parser)
    args = parser.parse_args(argv)
    config = config_from_args(args)
    from .trust.checks import problems  # a half-secured config is an error (docs/security.md)
    found = problems(config)
    for problem in found:
        print(f"error: {printable(problem)}", file=sys.stderr)
    if found:
        return EXIT_USAGE
    lines, warnings = check(config)
    for line in lines:
        print(line)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK
