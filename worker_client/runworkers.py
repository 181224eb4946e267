#!/usr/bin/env python3
"""runworkers: start N threaded geartask workers (the same as `geartask worker`; docs/worker.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this clone's geartask, wherever we run from

from geartask.worker.cli import cli  # noqa: E402

if __name__ == "__main__":
    cli()
