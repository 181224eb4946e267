"""``geartask check``: validate the config and load every enabled plugin, then say so."""

from __future__ import annotations

import sys
from typing import Sequence

from .cli import ArgumentParser, add_common_args, config_from_args
from .display import printable
from .errors import EXIT_OK, EXIT_USAGE
from .plugins import load_plugins


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="geartask check",
                            description="Validate the config and load every enabled plugin, without starting anything.")
    add_common_args(parser)
    args = parser.parse_args(argv)
    config = config_from_args(args)
    from .trust.checks import problems  # a half-secured config is an error (docs/security.md)
    found = problems(config)
    for problem in found:
        print(f"error: {printable(problem)}", file=sys.stderr)
    if found:
        return EXIT_USAGE
    plugins = load_plugins(config)
    print(f"config: {config.source or '(defaults)'}")
    print(f"servers: {', '.join(config.servers)}")
    for name in plugins.names:
        tasks = sorted(t for t, (_, p) in plugins.tasks().items() if p == name)
        print(f"plugin {name} ({plugins.files[name]}): tasks {', '.join(tasks) or '-'}")
    return EXIT_OK

