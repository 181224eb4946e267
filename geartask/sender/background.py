"""The background record (log.dir/sender-background.jsonl) and GET_STATUS queries about it.

Both read hostile or broken input (a hand-edited record, a pasted handle, a server's reply):
each bad item becomes one StatusResult naming what is wrong; the others are still asked.
Rotation and the meaning of each state are in docs/sender.md.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from .. import gearman as p
from ..address import format_address, split_address, split_server
from ..errors import ServerError
from ..jsonlines import JsonLinesFile

RECORD_NAME = "sender-background.jsonl"
MAX_HANDLE = 64  # bytes; gearmand's handles are shorter ("H:host:number")
STATUS_CHUNK = 1000  # GET_STATUS requests pipelined per server at a time
_MAX_DIGITS = 18  # a numerator/denominator longer than this is not a count
# A background job's data is kept in its record line up to this size, so `send recover` can send
# it again if its server dies; bigger data is only measured (data_size): the record rotates by
# size (log.max_bytes), and a few huge lines would push every other job out of it.
RECORD_DATA = 64 * 1024


@dataclass
class StatusResult:
    """What a server says about one background job. ``state``: queued | running | done (the
    server no longer has a job we recorded; geartask.sender.outcomes.resolve turns it into
    complete or failed from the job's outcome, or unknown) | unknown (a bad handle, record or
    reply, or a handle nobody knows that is not in the record) | unreachable (the server could
    not be asked)."""

    handle: str
    server: str | None
    state: str
    known: bool | None = None
    running: bool = False
    numerator: int = 0
    denominator: int = 0
    task: str | None = None
    unique: str | None = None
    error: str | None = None
    outcome: dict | None = None  # the job's outcome record, once it finished (complete | failed)

    def to_json(self) -> dict:
        out = {"handle": self.handle, "server": self.server, "task": self.task, "unique": self.unique,
               "state": self.state, "known": self.known, "running": self.running,
               "numerator": self.numerator, "denominator": self.denominator, "error": self.error}
        if self.outcome is not None:
            from .outcomes import Outcome
            out.update({k: v for k, v in Outcome(self.unique or self.handle, self.state, self.outcome).to_json().items()
                        if k in ("attempts", "worker", "finished_at", "result", "reason", "result_cut")})
        return out


@dataclass
class _Ask:
    """One thing to ask about: a handle, where (None: every server), and what we know of it."""

    handle: str
    server: str | None
    task: str | None = None
    unique: str | None = None
    recorded: bool = False  # in the record: the job existed, so "not known" means done
    problem: str | None = None  # already known to be bad: reported as unknown, not asked
    record: dict | None = None  # the record line, when it came from the record

    def result(self, state: str, server: str | None = None, error: str | None = None, **kw: Any) -> StatusResult:
        return StatusResult(handle=self.handle, server=server or self.server, state=state, task=self.task,
                            unique=self.unique, error=error, **kw)


def handle_problem(handle: Any) -> str | None:
    """Why ``handle`` can't be a gearmand job handle, or None."""
    if not isinstance(handle, str) or not handle:
        return f"not a job handle: {handle!r}"
    size = len(handle.encode("utf-8", "surrogatepass"))
    if size > MAX_HANDLE:
        return f"not a job handle: {size} bytes (handles are at most {MAX_HANDLE})"
    if any(not c.isprintable() or c.isspace() for c in handle):
        return f"not a job handle: {handle!r} has spaces or control characters"
    return None


def server_problem(server: Any) -> str | None:
    """Why ``server`` is not a HOST:PORT (with the port), or None."""
    if not isinstance(server, str):
        return f"bad server {server!r}: expected HOST:PORT"
    try:
        split_server(server)
    except ValueError as e:
        return f"bad server {server!r}: {str(e).rpartition(': ')[2]}"
    return None


def recorded_fields(payload: bytes, retries: int | None = None, at: int | None = None, raw: bool = False) -> dict:
    """What a record line keeps of a background job besides its name, so it can be sent again:
    its data (``data`` as text when it is UTF-8, else ``data_b64``; neither past RECORD_DATA
    bytes, only ``data_size``), its options, and ``raw`` when the data was the whole payload
    (JobSender.submit_raw: sent again the same way)."""
    out: dict[str, Any] = {"data_size": len(payload)}
    if raw:
        out["raw"] = True
    if len(payload) <= RECORD_DATA:
        try:
            out["data"] = payload.decode("utf-8")
        except UnicodeDecodeError:
            out["data_b64"] = base64.b64encode(payload).decode("ascii")
    if retries is not None:
        out["retries"] = retries
    if at is not None:
        out["at"] = at
    return out


def recorded_data(rec: dict) -> bytes:
    """The data a record line kept (recorded_fields); ValueError saying why there is none."""
    text, b64 = rec.get("data"), rec.get("data_b64")
    if isinstance(text, str):
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("its recorded data is not UTF-8 text") from None
    if isinstance(b64, str):
        try:
            return base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("its recorded data_b64 is not base64") from None
    size = rec.get("data_size")
    if isinstance(size, int) and not isinstance(size, bool) and size > RECORD_DATA:
        raise ValueError(f"its data ({size} bytes) was over {RECORD_DATA} bytes, so the record has only its size")
    raise ValueError("the record has no data for it (recorded by an older geartask)")


class BackgroundRecord(JsonLinesFile):
    """Accepted background jobs as JSON lines, rotated like the logs: past ``max_bytes`` the
    file becomes FILE.1 (FILE.1 becomes FILE.2 ...), and ``backups`` old files are kept;
    senders share it (a JsonLinesFile: whole lines or nothing)."""

    def append_records(self, records: list[dict]) -> None:
        """Append whole lines or nothing; raises OSError."""
        self.append("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))

    def entries(self) -> Iterator[_Ask]:
        """Every line of every file, oldest first, as an _Ask (a bad line's problem set)."""
        for path in self.files():
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                continue
            except OSError as e:
                yield _Ask(handle="-", server=None, problem=f"{path}: cannot read: {e.strerror}")
                continue
            with f:
                for n, raw in enumerate(f, 1):
                    if raw.strip():
                        yield _record_ask(raw, f"{path}:{n}")

    def records(self) -> Iterator[dict]:
        """The well-formed records."""
        for ask in self.entries():
            if ask.record is not None:
                yield ask.record


def _record_ask(raw: bytes, where: str) -> _Ask:
    def bad(why: str, handle: Any = "-", server: Any = None) -> _Ask:
        return _Ask(handle=handle if isinstance(handle, str) else "-",
                    server=server if isinstance(server, str) else None, problem=f"{where}: {why}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return bad(f"not UTF-8 (byte {e.start + 1})")
    try:
        rec = json.loads(text)
    except (ValueError, RecursionError):
        return bad("not a JSON record")
    if not isinstance(rec, dict):
        return bad("not a JSON record")
    handle, server = rec.get("handle"), rec.get("server")
    why = handle_problem(handle) or server_problem(server)
    if why:
        return bad(why, handle, server)
    task, unique = rec.get("task"), rec.get("unique")
    return _Ask(handle=str(handle), server=server, task=task if isinstance(task, str) else None,
                unique=unique if isinstance(unique, str) else None, recorded=True, record=rec)


def asks_for(handles: Iterable[Any], record: BackgroundRecord) -> list[_Ask]:
    """What to ask for the handles a caller named: ``HANDLE``, ``HANDLE@HOST:PORT``,
    (handle, server) pairs or record mappings; the record supplies servers and names."""
    asks: list[_Ask] = []
    for h in handles:
        if isinstance(h, dict):
            handle, server, from_record = h.get("handle"), h.get("server"), True
        elif isinstance(h, (tuple, list)) and len(h) == 2:
            (handle, server), from_record = h, False
        else:
            text = str(h)
            handle, at, server = text.rpartition("@")  # HANDLE@HOST:PORT, as the CLI prints it
            if not at:
                handle, server = text, None
            from_record = False
        why = handle_problem(handle) or (server_problem(server) if server is not None else None)
        if why:
            asks.append(_Ask(handle=str(handle), server=server if isinstance(server, str) else None, problem=why))
            continue
        if server is not None and not from_record:  # the one spelling records and lanes use ('[::1]:4730')
            server = format_address(*split_server(server))
        ask = _Ask(handle=str(handle), server=server, recorded=from_record)
        if from_record:
            task, unique = h.get("task"), h.get("unique")
            ask.task = task if isinstance(task, str) else None
            ask.unique = unique if isinstance(unique, str) else None
        asks.append(ask)
    wanted = {a.handle for a in asks if a.problem is None and not a.recorded}
    if wanted:
        found: dict[str, list[_Ask]] = {}
        for rec in record.entries():
            if rec.problem is None and rec.handle in wanted:
                found.setdefault(rec.handle, []).append(rec)
        for a in asks:
            for rec in found.get(a.handle, []) if not a.recorded else []:
                if a.server is None or a.server == rec.server:
                    a.server, a.task, a.unique, a.recorded = rec.server, rec.task, rec.unique, True
                    break
    return asks


class StatusQuery:
    """GET_STATUS for many handles: pipelined per server, one connection per server, and a
    server that fails once is not asked again (its other handles are reported unreachable)."""

    def __init__(self, servers: list[str], timeout: float):
        self.servers, self.timeout = servers, timeout
        self.conns: dict[str, p.Connection] = {}
        self.failed: dict[str, str] = {}

    def close(self) -> None:
        for c in self.conns.values():
            c.close()
        self.conns.clear()

    def run(self, asks: Iterable[_Ask]) -> Iterator[StatusResult]:
        chunk: list[_Ask] = []
        for ask in asks:
            chunk.append(ask)
            if len(chunk) >= STATUS_CHUNK:
                yield from self._chunk(chunk)
                chunk = []
        yield from self._chunk(chunk)

    def _chunk(self, asks: list[_Ask]) -> list[StatusResult]:
        by_server: dict[str, list[int]] = {}
        for i, a in enumerate(asks):
            if a.problem is None:
                for addr in [a.server] if a.server else self.servers:
                    by_server.setdefault(addr, []).append(i)
        replies: dict[tuple[int, str], StatusResult | str] = {}
        for addr, idx in by_server.items():
            for i, reply in zip(idx, self._ask(addr, [asks[i] for i in idx]), strict=False):
                replies[(i, addr)] = reply
        out = []
        for i, a in enumerate(asks):
            if a.problem is not None:
                out.append(a.result("unknown", error=a.problem))
                continue
            answers = [replies[(i, addr)] for addr in ([a.server] if a.server else self.servers)]
            if a.server:
                out.append(_final(a, answers[0]))
                continue
            known = [r for r in answers if isinstance(r, StatusResult) and r.known]
            problems = [r if isinstance(r, str) else r.error for r in answers
                        if isinstance(r, str) or r.state == "unknown"]
            if known:
                out.append(known[0])
            elif problems:
                out.append(a.result("unreachable" if any(isinstance(r, str) for r in answers) else "unknown",
                                    error="; ".join(p or "unknown" for p in problems)))
            else:
                out.append(a.result("unknown", error="not in the background record and no server knows it"))
        return out

    def _ask(self, addr: str, asks: list[_Ask]) -> list[StatusResult | str]:
        """One reply per ask from ``addr``: a StatusResult, or a string saying why there is none."""
        if addr in self.failed:
            return [self.failed[addr]] * len(asks)
        replies: list[StatusResult | str] = []
        try:
            conn = self.conns.get(addr)
            if conn is None:
                host, port = split_address(addr)
                conn = self.conns[addr] = p.Connection(host, port, connect_timeout=self.timeout)
                conn.connect()
            conn.send_raw(b"".join(p.pack(p.GET_STATUS, job_handle=a.handle) for a in asks))
            for a in asks:
                replies.append(_reply(a, addr, self._next_reply(conn)))
        except ServerError as e:
            self.failed[addr] = str(e)
            self.conns.pop(addr, None)
            replies += [str(e)] * (len(asks) - len(replies))
        return replies

    def _next_reply(self, conn: p.Connection) -> p.Packet:
        # ERROR is wanted: it is that one handle's answer; anything else is not for us
        pkt = conn.recv_until({p.STATUS_RES, p.ERROR}, time.monotonic() + self.timeout)
        if pkt is None:
            conn.close()
            raise ServerError(f"no answer within {self.timeout:g}s", conn.address)
        return pkt


def _reply(a: _Ask, addr: str, pkt: p.Packet) -> StatusResult:
    if pkt.cmd == p.ERROR:
        return a.result("unknown", addr, f"{addr}: {p.error_text(pkt)}")
    args = pkt.args
    if args["job_handle"] != a.handle.encode("utf-8", "surrogatepass"):
        return a.result("unknown", addr, f"{addr}: answered about another handle "
                                         f"({p.to_text(args['job_handle'])[:MAX_HANDLE]!r})")
    nums = [args["numerator"] or b"0", args["denominator"] or b"0"]
    if args["known"] not in (b"0", b"1") or args["running"] not in (b"0", b"1") or \
            not all(n.isdigit() and len(n) <= _MAX_DIGITS for n in nums):
        return a.result("unknown", addr, f"{addr}: malformed STATUS_RES")
    if args["known"] == b"0":
        return a.result("done", addr, known=False)
    running = args["running"] == b"1"
    return a.result("running" if running else "queued", addr, known=True, running=running,
                    numerator=int(nums[0]), denominator=int(nums[1]))


def _final(a: _Ask, reply: StatusResult | str) -> StatusResult:
    """The answer for a handle asked of its one server."""
    if isinstance(reply, str):
        return a.result("unreachable", error=reply)
    if reply.state == "done" and not a.recorded:
        reply.state = "unknown"
        reply.error = (f"{reply.server} does not know it: finished, or never a job there "
                       f"(not in the background record)")
    return reply

