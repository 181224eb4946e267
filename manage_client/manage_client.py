#!/usr/bin/env python3
"""manage_client: see and manage the job servers and workers (the same as `geartask manage`; docs/manager.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this clone's geartask, wherever we run from

from geartask.admin.cli import cli  # noqa: E402

if __name__ == "__main__":
    cli()
