"""A minimal Gearman client for tests, on geartask.gearman: pipelined submit, wait by handle.

Tests use it (and the C `gearman` tool) as a client that does not depend on the sender
role, so a worker test fails only for the worker's faults. Run as a script it submits N
foreground jobs and prints a JSON summary (the starvation test runs two at once).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field

from geartask import gearman as gp
from geartask.address import split_address
from geartask.jobs import decode_payload, encode_payload, new_unique


@dataclass
class Outcome:
    handle: str
    state: str = "queued"  # queued | complete | failed
    result: object = None
    warnings: list = field(default_factory=list)
    statuses: list = field(default_factory=list)
    data: list = field(default_factory=list)

    @property
    def reason(self):
        return self.warnings[-1] if self.warnings else None


def connect(address: str) -> gp.Connection:
    host, port = split_address(address)
    return gp.Connection(host, port).connect()


def submit(conn: gp.Connection, task: str, payloads: list, *, background: bool = False,
           priority: str = "normal", uniques: list | None = None, timeout: float = 30) -> list[str]:
    """Submit every payload (pipelined); return the job handles in order."""
    cmd = gp.submit_command(priority, background)
    uniques = uniques or [new_unique() for _ in payloads]
    chunk = 500
    handles: list[str] = []
    for i in range(0, len(payloads), chunk):
        part = payloads[i:i + chunk]
        conn.send_raw(b"".join(gp.pack(cmd, task=task, unique=u, data=encode_payload(p))
                               for p, u in zip(part, uniques[i:i + chunk], strict=False)))
        for _ in part:
            handles.append(_job_created(conn, timeout))
    return handles


def _job_created(conn: gp.Connection, timeout: float) -> str:
    """The next JOB_CREATED's handle; answers about earlier jobs that come first are kept
    for wait() (with pipelined submits, the first jobs may finish before the last are created)."""
    deadline = time.monotonic() + timeout
    while True:
        pkt = conn.recv(deadline - time.monotonic())
        if pkt is None:
            raise AssertionError(f"no JOB_CREATED within {timeout:g}s")
        if pkt.cmd == gp.JOB_CREATED:
            return pkt.text("job_handle")
        if pkt.cmd == gp.ERROR:
            raise AssertionError(f"server error {pkt.text('error_code')}: {pkt.text('error_text')}")
        _early.setdefault(id(conn), []).append(pkt)


_early: dict[int, list] = {}  # connection id -> packets read by submit() before wait() asked


def wait(conn: gp.Connection, handles: list[str], timeout: float = 30) -> dict[str, Outcome]:
    """Collect every packet about ``handles`` until each has completed or failed."""
    out = {h: Outcome(h) for h in handles}
    left = set(handles)
    deadline = time.monotonic() + timeout
    early = _early.pop(id(conn), [])
    while left:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{len(left)} of {len(handles)} jobs unfinished after {timeout}s")
        pkt = early.pop(0) if early else conn.recv(remaining)
        if pkt is None:
            continue
        handle = pkt.text("job_handle") if "job_handle" in pkt.args else None
        o = out.get(handle)
        if o is None:
            continue
        if pkt.cmd == gp.WORK_COMPLETE:
            o.state, o.result = "complete", decode_payload(pkt["data"])
            left.discard(handle)
        elif pkt.cmd == gp.WORK_FAIL:
            o.state = "failed"
            left.discard(handle)
        elif pkt.cmd == gp.WORK_WARNING:
            o.warnings.append(decode_payload(pkt["data"]))
        elif pkt.cmd == gp.WORK_DATA:
            o.data.append(decode_payload(pkt["data"]))
        elif pkt.cmd == gp.WORK_STATUS:
            o.statuses.append((int(pkt["numerator"]), int(pkt["denominator"])))
    return out


def run(address: str, task: str, payloads: list, timeout: float = 30, **kw) -> list[Outcome]:
    """Submit foreground jobs to one server and wait for all of them; outcomes in order."""
    conn = connect(address)
    try:
        handles = submit(conn, task, payloads, **kw)
        out = wait(conn, handles, timeout)
        return [out[h] for h in handles]
    finally:
        conn.close()


def run_one(address: str, task: str, payload, timeout: float = 30, **kw) -> Outcome:
    return run(address, task, [payload], timeout, **kw)[0]


def queued(address: str, function: str) -> int:
    """Jobs of ``function`` the server holds (queued + running), from the admin 'status'."""
    host, port = split_address(address)
    for line in gp.admin_command(host, port, "status"):
        parts = line.split("\t")
        if parts[0] == function:
            return int(parts[1])
    return 0


if __name__ == "__main__":  # python gearclient.py ADDRESS TASK COUNT JSON-PAYLOAD-TEMPLATE
    address, task, count, template = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
    payloads = [dict(template, id=f"{template.get('id', '')}{i}") for i in range(count)]
    outs = run(address, task, payloads, timeout=120)
    print(json.dumps({"complete": sum(o.state == "complete" for o in outs), "total": len(outs)}))
