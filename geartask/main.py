"""The ``geartask`` command: one entry point for every role (worker, send, manage, check)."""

from __future__ import annotations

import sys
from typing import Sequence

from . import __version__
from .cli import run

ROLES = {
    "worker": ("geartask.worker.cli", "start threaded workers (runworkers)"),
    "send": ("geartask.sender.cli", "send jobs (send_job_client)"),
    "manage": ("geartask.admin.cli", "see and manage servers and workers (manage_client)"),
    "check": ("geartask.__main__", "validate the config and load the enabled plugins"),
}

USAGE = "usage: geartask {" + ",".join([*ROLES, "version"]) + "} ...\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        text = USAGE + "\n" + "".join(f"  {name:8} {what}\n" for name, (_, what) in ROLES.items())
        text += "  version  print geartask's version\n"
        sys.stdout.write(text)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in ("version", "--version"):
        print(f"geartask {__version__}")
        return 0
    if command not in ROLES:
        sys.stderr.write(USAGE + f"geartask: error: unknown command {command!r}\n")
        return 2
    import importlib
    module = importlib.import_module(ROLES[command][0])
    if command == "check":
        rest = ["check", *rest]
    return module.main(rest)


def cli() -> None:
    sys.exit(run(main))


if __name__ == "__main__":
    cli()
