"""``python -m geartask check``: validate the config and load every enabled plugin, then say so.

A quick way to learn, before starting anything, whether a config and its plugins are sound.
"""

from __future__ import annotations

import sys
from typing import Sequence

from .cli import ArgumentParser, add_common_args, config_from_args, run
from .errors import EXIT_OK
from .plugins import load_plugins


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m geartask", description=__doc__)
    add_common_args(parser)
    parser.add_argument("command", choices=["check"])
    args = parser.parse_args(argv)
    config = config_from_args(args)
    plugins = load_plugins(config)
    print(f"config: {config.source or '(defaults)'}")
    print(f"servers: {', '.join(config.servers)}")
    for name in plugins.names:
        tasks = sorted(t for t, (_, p) in plugins.tasks().items() if p == name)
        print(f"plugin {name} ({plugins.files[name]}): tasks {', '.join(tasks) or '-'}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(run(main))
