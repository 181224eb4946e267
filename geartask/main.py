"""The ``geartask`` command: every role behind one name, with one set of global options."""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

from . import __version__
from .arguments import GLOBAL_OPTIONS
from .cli import run
from .errors import EXIT_OK, EXIT_USAGE

# command -> (module with main(argv), what it does, the older command it is the same as)
COMMANDS = {
    "worker": ("geartask.worker.cli", "start threaded workers", "runworkers"),
    "send": ("geartask.sender.cli", "send jobs and read their outcomes", "send_job_client"),
    "manage": ("geartask.admin.cli", "see and manage job servers, workers and outcomes", "manage_client"),
    "check": ("geartask.check", "validate the config and load the enabled plugins", None),
    "init": ("geartask.init", "write a commented config.yaml and an example plugin", None),
    "certs": ("geartask.trust.cli", "write a fleet CA and host certificates for TLS", None),
    "keys": ("geartask.trust.cli", "write Ed25519 signing keys", None),
    "version": (None, "print geartask's version", None),
}
_VALUED = tuple(f for o in GLOBAL_OPTIONS if o.takes_value for f in o.flags)  # global options that take a value
_FLAGS = tuple(f for o in GLOBAL_OPTIONS if not o.takes_value for f in o.flags)


def _usage() -> str:
    loudness = " | ".join(o.flags[0] for o in GLOBAL_OPTIONS if o.verbosity is not None)
    options = [f"[{o.shown}]" for o in GLOBAL_OPTIONS if o.takes_value]
    options.insert(2, f"[{loudness}]")  # where argparse shows the -v/-q group, after --config/--servers
    flags = " ".join(f"[{o.flags[0]}]" for o in GLOBAL_OPTIONS if o.help is None)
    return f"usage: geartask {' '.join(options)}\n                {flags} COMMAND [ARGS...]\n"


USAGE = _usage()


def _help() -> str:
    lines = [USAGE, "commands:"]
    for name, (_, what, _alias) in COMMANDS.items():
        lines.append(f"  {name:8} {what}")  # the old script names: README only, one place
    lines += ["", "global options (also accepted after the command):"]
    for o in GLOBAL_OPTIONS:
        first, *rest = o.overview.split("\n")
        lines += [f"  {o.shown:23} {first}"] + [" " * 26 + more for more in rest]
    lines += ["", "`geartask COMMAND --help` shows a command's own options."]
    return "\n".join(lines) + "\n"


def split(argv: Sequence[str]) -> tuple[list[str], str | None, list[str]]:
    """(global options, command, the command's arguments); UsageError-free: main reports."""
    args = list(argv)
    globals_: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a in _VALUED:
            globals_ += args[i:i + 2]
            i += 2
        elif a.split("=", 1)[0] in _VALUED or a in _FLAGS or a in ("-h", "--help"):
            globals_.append(a)
            i += 1
        else:
            return globals_, a, args[i + 1:]
    return globals_, None, []


def main(argv: Sequence[str] | None = None) -> int:
    globals_, command, rest = split(sys.argv[1:] if argv is None else argv)
    if "--version" in globals_:
        print(f"geartask {__version__}")
        return EXIT_OK
    if command is None:
        helped = "-h" in globals_ or "--help" in globals_
        (sys.stdout if helped else sys.stderr).write(_help())
        return EXIT_OK if helped else EXIT_USAGE
    if command not in COMMANDS:
        sys.stderr.write(USAGE + f"geartask: error: unknown command {command!r} "
                         f"(choose from {', '.join(COMMANDS)})\n")
        return EXIT_USAGE
    if command == "version":
        print(f"geartask {__version__}")
        return EXIT_OK
    if any(g in ("-h", "--help") for g in globals_):
        rest = ["--help", *rest]
    globals_ = [g for g in globals_ if g not in ("-h", "--help")]
    module = importlib.import_module(COMMANDS[command][0] or "geartask.main")  # only "version" has none
    entry = getattr(module, f"main_{command}", None) or module.main  # one module may serve two commands
    if command in ("init", "certs", "keys"):
        return entry(rest)
    return entry([*globals_, *rest])


def cli() -> None:
    sys.exit(run(main))


if __name__ == "__main__":
    cli()
