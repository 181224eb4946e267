"""A sink plugin for the tests: records each job's end in log.dir/sink.jsonl, and raises for
jobs whose data says so (a broken sink must not fail a job)."""

from __future__ import annotations

import json

from geartask import hookimpl


def _write(job, what: dict) -> None:
    path = job.config.log.dir / "sink.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"task": job.task, "unique": job.unique, **what}) + "\n")


@hookimpl
def geartask_job_done(job, result):
    if isinstance(job.data, dict) and job.data.get("sink_raises"):
        raise RuntimeError("the sink is broken")
    _write(job, {"done": result})


@hookimpl
def geartask_job_failed(job, reason):
    _write(job, {"failed": reason["error"], "attempts": reason["attempts"]})
    raise SystemExit("a sink that exits")  # still must not fail (or end) anything
