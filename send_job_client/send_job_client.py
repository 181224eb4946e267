#!/usr/bin/env python3
"""send_job_client: send jobs to the job servers (the same as `geartask send`; docs/sender.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this clone's geartask, wherever we run from

from geartask.sender.cli import cli  # noqa: E402

if __name__ == "__main__":
    cli()
