"""One parser per gearmand admin reply (``status``, ``workers``, ``show jobs``, ``show unique
jobs``, ``version``): a reply of another shape is a ServerError ("not a gearmand?").

The replies come from a peer: names may hold tabs and newlines (gearmand takes any bytes),
so numbers are read from fixed positions and anything else is refused, never guessed.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from ..control import parse_client_id
from ..errors import ServerError
from ..targets import identity_of


@dataclass
class FunctionStatus:
    function: str
    queued: int  # waiting for a worker (total minus running)
    running: int
    workers: int  # connected workers able to run it
    total: int


_STATUS_TAIL = re.compile(r"\t([0-9]{1,20})\t([0-9]{1,20})\t([0-9]{1,20})\Z")


def parse_status(lines: list[str]) -> list[FunctionStatus]:
    """'FUNCTION\\tTOTAL\\tRUNNING\\tAVAILABLE_WORKERS' lines -> FunctionStatus list.

    A function name may hold tabs and newlines (gearmand takes any bytes): the numbers are
    read from the end, and a line without them continues the name on the next line.
    """
    out, name_lines = [], []
    for line in lines:
        m = _STATUS_TAIL.search(line)
        if m is None:
            name_lines.append(line)
            continue
        name = "\n".join(name_lines + [line[:m.start()]])
        name_lines = []
        total, running, workers = (int(g) for g in m.groups())
        out.append(FunctionStatus(name, max(total - running, 0), running, workers, total))
    if name_lines:
        raise ServerError(f"malformed 'status' reply {name_lines[0][:80]!r}: not a gearmand?")
    return out


@dataclass
class WorkerConnection:
    fd: int | None
    ip: str  # the peer address gearmand sees
    client_id: str  # '-' when the connection set none
    functions: list[str]
    name: str | None = None  # parsed from a geartask client id NAME:IP:PID:THREAD
    worker_ip: str | None = None
    pid: int | None = None
    thread: int | None = None
    silent: bool | None = None  # its process did not answer a ping here; None: not asked
    fleet: str | None = None  # the fleet its client id names ("" none); None: not a geartask client id
    host: str | None = None  # from its TASK@host:HOST functions (geartask.targets); None: it names none
    labels: list[str] = field(default_factory=list)  # from its TASK@label:LABEL functions


def peer_ip(text: str) -> str:
    """gearmand's IP column, or '-' where it says nothing. gearmand 1.1 prints an IPv6 peer's
    address garbled (measured: '::3536:3437:3200:0' or '::3536:3437:3200:0%2817330208' for a
    worker on [::1] whose port is 56472, 'fd00:77::3435:3032:3000:0' for one on fd00:77::b,
    '::%2533699104' for another): the first 8 bytes of the address, then the ASCII digits of
    the peer's port and zeros, sometimes a scope id from nowhere. Such text, and a zone on any
    address but a link-local one (the only kind that has one), is '-'."""
    addr, sep, _ = text.partition("%")
    if ":" not in addr:
        return text
    try:
        packed = ipaddress.IPv6Address(addr).packed
    except ValueError:
        return "-"
    low = packed[8:].rstrip(b"\0")
    if low.isdigit() or packed == bytes(16):
        return "-"
    if sep and not ipaddress.IPv6Address(addr).is_link_local:
        return "-"
    return text


_WORKER_LINE = re.compile(r"(-1|[0-9]{1,10}) (\S+) ")  # fd -1: a connection gearmand is closing


def parse_workers(lines: list[str]) -> list[WorkerConnection]:
    """'FD IP CLIENT_ID : FUNC FUNC...' lines -> WorkerConnection list.

    A client id or function name may hold a newline: a line that does not start with
    'FD IP ' continues the one before.
    """
    records: list[str] = []
    for line in lines:
        if _WORKER_LINE.match(line) or not records:
            records.append(line)
        else:
            records[-1] += "\n" + line
    out = []
    for record in records:
        m = _WORKER_LINE.match(record)
        if m is None:
            raise ServerError(f"malformed 'workers' reply {record[:80]!r}: not a gearmand?")
        rest = record[m.end():]
        client_id, sep, funcs = rest.partition(" :")
        if not sep:
            raise ServerError(f"malformed 'workers' reply {record[:80]!r}: not a gearmand?")
        w = WorkerConnection(int(m.group(1)), peer_ip(m.group(2)), client_id or "-", funcs.split(" ")[1:] if funcs else [])
        w.functions = [f for f in w.functions if f]
        w.host, w.labels = identity_of(w.functions)
        ident = parse_client_id(client_id)
        if ident is not None:
            w.name, w.worker_ip, w.pid, w.thread, w.fleet = ident.name, ident.ip, ident.pid, ident.thread, ident.fleet
        out.append(w)
    return out


@dataclass
class QueuedJob:
    """One line of ``show jobs``: no function, no unique key (gearmand's admin protocol never
    relates a handle to them)."""

    handle: str
    retries: int
    cancelled: bool  # gearmand's "ignore" column: `cancel job` marked it
    queued: bool  # 1 for running jobs as well


_JOB_LINE = re.compile(r"([!-~]{1,64})\t([0-9]{1,20})\t([01])\t([0-9]{1,20})")  # handle retries ignore queued


def parse_show_jobs(lines: list[str]) -> list[QueuedJob]:
    """'HANDLE\\tRETRIES\\tIGNORE\\tQUEUED' lines -> QueuedJob list."""
    jobs = []
    for line in lines:
        m = _JOB_LINE.fullmatch(line)
        if m is None:
            raise ServerError(f"malformed 'show jobs' reply {line[:80]!r}: not a gearmand?")
        jobs.append(QueuedJob(m.group(1), int(m.group(2)), m.group(3) == "1", m.group(4) != "0"))
    return jobs


def parse_show_unique_jobs(lines: list[str]) -> list[str]:
    """One unique key per line (no handles): the keys, blank lines dropped."""
    return [u for u in lines if u]


_VERSION = re.compile(r"OK ([0-9]+\.[0-9]+[!-~]*)")


def parse_version(reply: str, server: str | None = None) -> str:
    """gearmand's version from 'OK 1.1.20'; a peer whose answer has another shape is not a gearmand."""
    m = _VERSION.fullmatch(reply)
    if m is None:
        raise ServerError(f"not a gearmand: it answered {reply[:80]!r} to 'version'", server)
    return m.group(1)
