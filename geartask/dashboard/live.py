"""The Job page's live output: a running followed job's recent output, asked of the worker
process that runs it through its control function (the ``output`` control command).

WORK_DATA goes only to the client that submitted the job, so the dashboard can't listen in:
the worker keeps the last 64 KiB of a followed command's output and answers for it. What
the worker says is checked and cut here; the page shows it as text (static/live_output.js).
"""

from __future__ import annotations

from typing import Any

from ..control import CONTROL_PREFIX, output_request, signed_request
from ..errors import GeartaskError
from ..fleet.server import server_control_call
from ..shell.stream import MAX_HOST, TAIL

MAX_SHOWN = TAIL  # characters of output passed on per job
MAX_JOBS = 16  # running jobs with that key asked about per request
MAX_UNIQUE = 64  # gearmand's unique-key limit, for the control job's own key


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2 ** 62:
        return None
    return value


def clean_reply(reply: dict) -> dict:
    """What the page gets of a worker's ``output`` answer: known fields, checked, text cut."""
    output = reply.get("output")
    host = reply.get("host")
    return {"running": reply.get("running") is True, "live": reply.get("live") is True,
            "output": output[-MAX_SHOWN:] if isinstance(output, str) else "",
            "bytes": _count(reply.get("bytes")), "dropped": _count(reply.get("dropped")),
            "cut": reply.get("cut") is True, "host": host[:MAX_HOST] if isinstance(host, str) else None}


def output_data(admin: Any, look: Any, key: str) -> dict:
    """``{"key", "jobs": [{"handle", "server", "worker", "running", "live", "output", "bytes",
    "dropped", "cut", "host", "error"}]}`` for every job the last look saw running under
    ``key`` (its handle or unique key)."""
    key = key.strip()[:1024]
    jobs: list[dict] = []
    if not key:
        return {"key": key, "jobs": jobs}
    for p in look.processes:
        for j in p.running:
            if key not in (j.get("handle"), j.get("unique")) or len(jobs) >= MAX_JOBS:
                continue
            handle, job_server = str(j.get("handle")), str(j.get("server"))
            entry: dict[str, Any] = {"handle": handle, "server": job_server, "worker": f"{p.name}:{p.host}:{p.pid}",
                                     "running": True, "live": False, "output": "", "error": None}
            jobs.append(entry)
            # the control function on the job's own server when it has one there, else the first
            server = job_server if job_server in p.control else next(iter(p.control), None)
            if server is None:
                entry["error"] = "the worker has no control function"
                continue
            function = p.control[server]
            payload = output_request(handle, job_server)
            if admin.key is not None:
                payload = signed_request(payload, function, admin.key)
            host, _, port = server.rpartition(":")
            try:
                reply = server_control_call(host.strip("[]"), int(port), function, payload,
                                            f"{CONTROL_PREFIX}:output:{handle}"[:MAX_UNIQUE], admin.timeout)
            except (GeartaskError, ValueError) as e:
                entry["error"] = str(e)[:500]
                continue
            entry.update(clean_reply(reply))
    return {"key": key, "jobs": jobs}
