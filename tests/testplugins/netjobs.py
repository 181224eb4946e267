"""Job definitions for the network tests (tests/test_network.py): NETJOBS_COUNT jobs of the
t.record task, each appending its unique key to the marker file NETJOBS_MARKER when it runs
(hosts are namespaces sharing one file system), so a test can count what never ran and what
ran twice. Unique keys are NETJOBS_TAG-0, -1, ...; NETJOBS_SLEEP makes each job take that long;
NETJOBS_TASK names another task (one no worker serves leaves the jobs queued).
"""

from __future__ import annotations

import os

from geartask import hookimpl


@hookimpl
def geartask_jobs(config):
    count = int(os.environ.get("NETJOBS_COUNT", "0"))
    data = {"file": os.environ.get("NETJOBS_MARKER", ""), "sleep": float(os.environ.get("NETJOBS_SLEEP", "0"))}
    tag = os.environ.get("NETJOBS_TAG", "job")
    task = os.environ.get("NETJOBS_TASK", "t.record")
    for i in range(count):
        yield {"task": task, "data": {**data, "id": i}, "unique": f"{tag}-{i}"}
