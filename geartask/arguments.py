"""The command lines' argparse pieces: a parser that raises instead of exiting, number and
duration types, and the global options every command takes (GLOBAL_OPTIONS). They need no
config, so any package's command line can use them (geartask.cli adds config and logging).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass
from typing import Any


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so main(argv) is testable and exits with 2."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        raise UsageExit(f"{self.prog}: error: {message}")


def prog(command: str, script: str) -> str:
    """A command's name in its help and messages: ``geartask COMMAND``, the one name the docs
    use; the old script's own name (``send_job_client.py``) when that script is what ran."""
    import os
    ran = os.path.basename(sys.argv[0] or "")
    return ran if ran.removesuffix(".py") == script.removesuffix(".py") else f"geartask {command}"


class UsageExit(Exception):
    """A bad command line: geartask.cli.run prints it and exits 2."""


# Past this, timeouts overflow C timevals and poll()'s milliseconds; no flag needs more.
MAX_SECONDS = 10_000_000  # about 116 days


def number(kind: type = float, *, positive: bool = False, what: str = "a number of seconds",
           maximum: float | None = None):
    """An argparse ``type=`` for numbers that can't be negative (or zero, with ``positive``).

    NaN and infinity are refused: NaN passes every comparison's "else" branch (a NaN timeout
    waits for nothing, a NaN wait for ever) and infinity overflows every timeout below.
    """
    if maximum is None and kind is float:
        maximum = MAX_SECONDS

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if positive and not value > 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text!r}")
        if value < 0:
            raise argparse.ArgumentTypeError(f"must not be negative, got {text!r}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum:g}, got {text!r}")
        return value
    return parse


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_DURATION = 100 * 366 * 86400  # seconds: a century
_DURATION = re.compile(r"([0-9]{1,12}(?:\.[0-9]{1,6})?)([smhdw])")


def duration(text: str) -> float:
    """An argparse ``type=`` for '30s', '30m', '1h', '7d', '2w' (digits, then one unit) -> seconds."""
    m = _DURATION.fullmatch(text)
    seconds = float(m.group(1)) * _UNITS[m.group(2)] if m else 0.0
    if not 0 < seconds <= MAX_DURATION:
        raise argparse.ArgumentTypeError(f"expected a duration like 30m, 1h or 7d (s, m, h, d or w after a "
                                         f"number; more than 0, at most 100 years), got {text!r}")
    return seconds


positive_seconds = number(float, positive=True)
non_negative_seconds = number(float)
count = number(int, what="a whole number")


@dataclass(frozen=True)
class GlobalOption:
    """An option every command takes, before or after its name (``geartask -v worker``,
    ``geartask worker -v``). GLOBAL_OPTIONS is the one list: each role's parser
    (add_common_args) and ``geartask``'s own usage, help and argument split (main.py) read it."""

    flags: tuple[str, ...]
    overview: str  # its line in `geartask --help` ("\n" continues it on the next line)
    help: str | None = None  # in each command's --help; None: `geartask` itself only (--version)
    metavar: str | None = None  # takes a value
    choices: tuple[str, ...] | None = None  # takes one of these
    verbosity: int | None = None  # -v/-q: the console verbosity it sets (one of them at most)

    @property
    def takes_value(self) -> bool:
        return self.metavar is not None or self.choices is not None

    @property
    def shown(self) -> str:
        """'--config PATH', '-v, --verbose', '--log-format text|json'."""
        value = self.metavar or ("|".join(self.choices) if self.choices else None)
        return self.flags[0] + f" {value}" if value else ", ".join(self.flags)


GLOBAL_OPTIONS = (
    GlobalOption(("--config",), "config file (default: $GEARTASK_CONFIG, ./config.yaml,\n"
                 "~/.config/geartask/config.yaml, /etc/geartask/config.yaml)",
                 "config file (default: $GEARTASK_CONFIG, ./config.yaml, the repository's config.yaml)",
                 metavar="PATH"),
    GlobalOption(("--servers",), "job servers instead of the config's",
                 "job servers to use instead of the config's 'servers'", metavar="HOST:PORT,..."),
    GlobalOption(("-v", "--verbose"), "more on the console (debug; the worker: every job)",
                 "console logs: debug lines too, and the worker's line per job", verbosity=1),
    GlobalOption(("-q", "--quiet"), "errors only on the console", "console logs: errors only", verbosity=-1),
    GlobalOption(("--log-format",), "the console log's format (files are always JSON lines)",
                 "console log lines: human text or JSON lines (default: log.format, text)", choices=("text", "json")),
    GlobalOption(("--version",), "print the version and exit"),
)


def add_common_args(parser: argparse.ArgumentParser, *, after_command: bool = False) -> None:
    """The GLOBAL_OPTIONS a command takes. ``after_command``: a subcommand's copy, which
    leaves unset options unset (SUPPRESS), so they don't overwrite ones given before the
    subcommand, and keeps --config/--servers/--log-format out of its help."""
    unset: dict[str, Any] = {"default": argparse.SUPPRESS} if after_command else {}
    # Shown in every help: argparse can't print the usage of a group whose options are all hidden.
    loudness = None
    for opt in GLOBAL_OPTIONS:
        if opt.help is None:
            continue
        if opt.verbosity is not None:
            loudness = loudness or parser.add_mutually_exclusive_group()
            loudness.add_argument(*opt.flags, dest="verbosity", action="store_const", const=opt.verbosity,
                                  **unset, help=opt.help)
            continue
        extra: dict[str, Any] = {"metavar": opt.metavar} if opt.metavar else {"choices": opt.choices}
        parser.add_argument(*opt.flags, **extra, **unset,
                            help=argparse.SUPPRESS if after_command else opt.help)
