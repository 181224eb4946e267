"""A task for the outcome tests: fails until a marker file exists, and notes every run."""

from __future__ import annotations

import os

from geartask import hookimpl


def flaky(job):
    """data: {"marker": path, "ran": path}. Appends "<unique> <attempt>" to ``ran``; fails while
    ``marker`` does not exist (so a requeued job succeeds once the test creates it)."""
    data = job.data
    with open(data["ran"], "a") as f:
        f.write(f"{job.unique} {job.attempt}\n")
    if not os.path.exists(data["marker"]):
        raise ValueError(f"{data['marker']} is not there yet")
    return {"ok": True}


@hookimpl
def geartask_tasks():
    return {"o.flaky": flaky}
