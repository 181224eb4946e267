"""The worked example plugin: tasks for the workers, jobs for the sender.

Run the whole thing with the README's demo command, or by hand::

    python worker_client/runworkers.py --name w1 --threads 4
    python send_job_client/send_job_client.py plugin eg
"""

from __future__ import annotations

import time

from geartask import hookimpl


def reverse(job):
    """Pure Python: reverse a string."""
    return {"reversed": str(job.data)[::-1]}


def wordcount(job):
    """Pure Python with progress: count words line by line, reporting WORK_STATUS as it goes."""
    lines = str(job.data).splitlines() or [""]
    counts: dict[str, int] = {}
    for i, line in enumerate(lines, 1):
        for word in line.split():
            counts[word.lower()] = counts.get(word.lower(), 0) + 1
        job.status(i, len(lines))
    return {"words": sum(counts.values()), "distinct": len(counts)}


def flaky(job):
    """Fails on its first attempt and succeeds on the retry, to show retries at work."""
    if job.attempt == 1:
        raise RuntimeError("first attempt fails on purpose (eg.flaky)")
    return {"ok": True, "attempt": job.attempt}


def slow(job):
    """Sleeps data['seconds'] (default 1), reporting progress each tenth."""
    seconds = float((job.data or {}).get("seconds", 1)) if isinstance(job.data, dict) else 1.0
    for i in range(1, 11):
        time.sleep(seconds / 10)
        job.status(i, 10)
    return {"slept": seconds}


@hookimpl
def geartask_tasks():
    return {"eg.reverse": reverse, "eg.wordcount": wordcount, "eg.flaky": flaky, "eg.slow": slow}


@hookimpl
def geartask_jobs():
    yield {"task": "eg.reverse", "data": "geartask", "unique": "eg-reverse-1"}
    yield {"task": "eg.wordcount", "data": "the quick brown fox\njumps over\nthe lazy dog"}
    yield {"task": "eg.flaky", "data": {}, "retries": 2}
    yield {"task": "shell", "data": {"cmd": ["echo", "hello from a geartask worker"]}}
    yield {"task": "shell", "data": {"cmd": ["uname", "-srm"]}}
    yield {"task": "shell", "data": {"cmd": ["uname", "-n"], "timeout": 10}}
