"""What every role's command line shares: --config/--servers, -v/-q/--log-format, config
loading, logging setup, exit codes.

Each role's ``main(argv)`` parses, loads config, calls its library and returns an exit
status; ``run`` turns geartask errors into one line on stderr, never a traceback.
"""

from __future__ import annotations

# The argparse pieces (geartask.arguments) are re-exported: every command line imports them from here.
import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

from .arguments import (GLOBAL_OPTIONS, MAX_DURATION, MAX_SECONDS, ArgumentParser, GlobalOption,  # noqa: F401
                        UsageExit, add_common_args, count, duration, non_negative_seconds, number,
                        positive_seconds)
from .config import Config, load_config
from .display import printable
from .errors import EXIT_FAILED, EXIT_USAGE, GeartaskError
from .logs import configure_logging


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(getattr(args, "config", None), getattr(args, "servers", None))


def setup_logging(config: Config, args: argparse.Namespace, role: str, name: str | None = None) -> Path | None:
    """configure_logging with the command line's -v/-q/--log-format: the one place every role
    maps them."""
    return configure_logging(config.log, role, name, verbosity=getattr(args, "verbosity", None) or 0,
                             console_format=getattr(args, "log_format", None))


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Call a role's main and map errors to exit statuses and one-line messages."""
    try:
        return main(argv)
    except UsageExit as e:
        print(printable(e), file=sys.stderr)
        return EXIT_USAGE
    except GeartaskError as e:  # messages may quote a peer's or a file's text: one line, escaped
        print(f"error: {printable(e)}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_FAILED
