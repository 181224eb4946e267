"""The soak's task (bench/soak.py): after a short pause, append the job's key to the per-run file.

One line per run that finished: ``KEY TIME PID``, written with one O_APPEND write, so lines of
concurrent threads and processes never interleave. The soak counts how often each key ran.
"""

import os
import random
import time

from geartask import hookimpl


def record(job):
    time.sleep(random.uniform(0.005, 0.05))  # long enough for a kill to land mid-job now and then
    key = str(job.data)
    if not key.isascii() or " " in key or "\n" in key or len(key) > 100:
        raise ValueError("soak.record: the key must be short ASCII without spaces")
    fd = os.open(os.environ["GEARTASK_SOAK_RUNS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{key} {time.time():.3f} {os.getpid()}\n".encode())
    finally:
        os.close(fd)
    return key


@hookimpl
def geartask_tasks():
    return {"soak.record": record}
