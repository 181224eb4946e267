"""Tasks for the worker tests: they record who ran them, so tests can see it."""

from __future__ import annotations

import json
import os
import threading
import time

from geartask import hookimpl


def record(job):
    """Append {id, pid, thread, attempt, handle, unique, time} to the file named in data['file'],
    after sleeping data['sleep'] seconds; data['started'], if given, names a file created first
    (so a test knows the worker really has the job, not just gearmand)."""
    data = job.data
    if data.get("started"):
        open(data["started"], "a").close()
    time.sleep(float(data.get("sleep", 0)))
    line = json.dumps({"id": data.get("id"), "pid": os.getpid(), "thread": threading.current_thread().name,
                       "attempt": job.attempt, "handle": job.handle, "unique": job.unique,
                       "time": round(time.time(), 3)}) + "\n"
    fd = os.open(data["file"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    return {"id": data.get("id"), "pid": os.getpid()}


def fail(job):
    raise ValueError(f"always fails (attempt {job.attempt})")


def progress(job):
    for i in range(1, 4):
        job.status(i, 3)
        job.send_data({"part": i})
    return "done"


def hang(job):
    """Ignores every timeout: sleeps data['seconds'] in Python, which nothing can interrupt."""
    time.sleep(float(job.data.get("seconds", 60)))
    return "woke up"


def describe(job):
    """What the worker made of a job: its data, retries and envelope options."""
    return {"data": job.data, "retries": job.retries, "options": job.options}


@hookimpl
def geartask_tasks():
    return {"t.describe": describe, "t.record": record, "t.fail": fail, "t.progress": progress, "t.hang": hang}
