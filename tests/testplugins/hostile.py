"""Tasks that misbehave on purpose, for the hostile-job tests (tests/test_hostile_worker.py)."""

from __future__ import annotations

import json
import os
import socket
import threading

from geartask import hookimpl


def _mark(job):
    """Append this run's unique to data['file'] (if given): the tests count the runs."""
    data = job.data
    if isinstance(data, dict) and "file" in data:
        fd = os.open(data["file"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps({"unique": job.unique, "pid": os.getpid(),
                                      "attempt": job.attempt}) + "\n").encode())
        finally:
            os.close(fd)
    return data


def raise_base(job):
    """Raises what data['raise'] names: SystemExit, KeyboardInterrupt or a bare BaseException."""
    kind = _mark(job)["raise"]
    raise {"SystemExit": SystemExit(3), "KeyboardInterrupt": KeyboardInterrupt(),
           "BaseException": BaseException("not an Exception"), "GeneratorExit": GeneratorExit()}[kind]


def gil(job):
    """Holds the GIL for data['n'] additions in one C call: no other thread runs meanwhile."""
    _mark(job)
    return sum(range(int(job.data["n"])))


def deep_result(job):
    """Returns a list nested data['depth'] deep: too deep for json.dumps."""
    out: list = []
    for _ in range(int(job.data["depth"])):
        out = [out]
    return out


def pid(job):
    """Who ran me, with my data back (the isolation tests compare pids)."""
    _mark(job)
    job.status(1, 2)
    job.send_data({"partial": True})
    return {"pid": os.getpid(), "data": job.data, "attempt": job.attempt, "task": job.task,
            "unique": job.unique, "handle": job.handle}


def crash(job):
    """Ends its process at once, without an answer (os._exit)."""
    _mark(job)
    os._exit(int(job.data.get("status", 7)))


def break_thread(job):
    """Corrupts the worker thread that runs it (a stand-in for a worker bug that recurs on every
    loop): the thread's list of connections becomes None."""
    threading.current_thread().links = None
    return "broken"


def cut_own_connection(job):
    """Shuts the connection its job came on, so the worker can't answer (the job comes back)."""
    _mark(job)
    job._conn.sock.shutdown(socket.SHUT_RDWR)
    return "answered into the void"


def raise_server_error(job):
    """Raises geartask's ServerError, as a task using the sender would when a server is down."""
    _mark(job)
    from geartask.errors import NoServerError
    raise NoServerError(["10.255.255.1:4730"], {"10.255.255.1:4730": "timed out"})


@hookimpl
def geartask_tasks():
    return {"h.raise": raise_base, "h.gil": gil, "h.deep_result": deep_result, "h.pid": pid,
            "h.crash": crash, "h.break": break_thread, "h.cut": cut_own_connection,
            "h.server_error": raise_server_error}
