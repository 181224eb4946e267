"""Asking the outcomes collector from any machine that reaches a job server.

``OutcomeClient(config).latest(unique=...)`` sends a foreground high-priority job of
``geartask.outcomes.query`` to the first configured server that has a collector attached
(the admin ``status`` says so), and waits for the answer until a deadline.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

from .. import gearman as gp
from ..fleet.replies import parse_status
from ..address import format_address
from ..errors import ServerError
from .answers import RogueAnswer, open_answer, sign_request
from .errors import NoCollectorError, QueryError, RogueAnswerError
from .query import Refused, check_request
from .record import QUERY_FUNCTION, BadOutcome, check

DEFAULT_TIMEOUT = 5.0
UNIQUE_PREFIX = QUERY_FUNCTION + ":"


def query_unique(payload: bytes) -> str:
    """The unique key of a query: its request's hash and a random part, new for every request.

    A fixed key (the hash alone) let anyone who reaches gearmand hold a job under the key of
    `send result KEY` or of the default `failed list` in advance, and every such query then
    joined the held job and went unanswered for good (issue 20, item 5). With a random part
    nobody can know a key before it is used. What the fixed key bought, identical requests
    coalescing while no collector answers, comes from gearmand itself: a foreground query whose
    client gave up is marked ignored and dropped, unrun, when the collector next grabs it
    (docs/gearmand.md), so a dashboard polling a dead collector leaves only that backlog.
    """
    return UNIQUE_PREFIX + hashlib.sha256(payload).hexdigest()[:16] + os.urandom(8).hex()


class OutcomeClient:
    """Queries the collector (docs/outcomes.md lists the ops and what they return).

    Every call raises NoCollectorError when no collector answers within ``timeout`` seconds
    (none attached to any reachable server, or it did not answer in time), and QueryError when
    the collector refused the request or answered something that is not an answer.
    """

    def __init__(self, config: Any, timeout: float = DEFAULT_TIMEOUT):
        if not timeout > 0:
            raise ValueError(f"timeout must be greater than 0, got {timeout!r}")
        self.servers = list(config.server_addresses)
        self.max_packet = getattr(getattr(config, "gearman", None), "max_packet", None)
        self.timeout = timeout
        # Signed answers (docs/outcomes.md, "Signed outcomes"): with require_signed only an
        # answer signed for "answer" by a trusted signer is believed; store-changing requests
        # are signed with security.key.
        security = getattr(config, "security", None)
        self.require_signed = bool(getattr(security, "require_signed", False))
        self.max_age = float(getattr(security, "max_job_age", 86400.0))
        self.key, self.trust = None, None
        if getattr(security, "key", ""):
            from ..trust.keys import signing_key
            self.key = signing_key(config)
        if self.require_signed or getattr(security, "trust", None):
            from ..trust.policy import trust_of
            self.trust = trust_of(config)
        if hasattr(config, "tls"):
            from ..trust.tls import install
            install(config)  # tls:// servers over TLS, even for a config load_config did not read

    # -- the ops (answers checked: any peer can serve the query function) ----------------------
    def ping(self) -> dict:
        return _shaped(self.ask("ping"), dict, "ping")

    def size(self) -> int:
        return _shaped(self.ask("size"), int, "size")

    def latest(self, *, unique: str | None = None, handle: str | None = None,
               server: str | None = None) -> dict | None:
        return checked_record(self.ask("latest", unique=unique, handle=handle, server=server), "latest")

    def get(self, id: str) -> dict | None:
        return checked_record(self.ask("get", id=id), "get")

    def history(self, unique: str, limit: int | None = None) -> dict:
        return _listing(self.ask("history", unique=unique, limit=limit), "history")

    def failed(self, *, task: str | None = None, max_age: float | None = None, since: float | None = None,
               until: float | None = None, limit: int | None = None, include_requeued: bool | None = None) -> dict:
        return _listing(self.ask("failed", task=task, max_age=max_age, since=since, until=until, limit=limit,
                                 include_requeued=include_requeued), "failed")

    def recent(self, *, state: str | None = None, task: str | None = None, max_age: float | None = None,
               since: float | None = None, until: float | None = None, limit: int | None = None) -> dict:
        return _listing(self.ask("recent", state=state, task=task, max_age=max_age, since=since, until=until,
                                 limit=limit), "recent")

    def counts(self, *, max_age: float | None = None, since: float | None = None) -> list[dict]:
        rows = _shaped(self.ask("counts", max_age=max_age, since=since), list, "counts")
        for row in rows:
            _fields(row, {"task": str, "state": str, "count": int}, "counts")
        return rows

    def per_minute(self, *, max_age: float | None = None, since: float | None = None) -> list[dict]:
        """[{minute, state, count}]: outcomes finished per minute (OutcomeStore.per_minute)."""
        rows = _shaped(self.ask("per_minute", max_age=max_age, since=since), list, "per_minute")
        for row in rows:
            _fields(row, {"state": str, "count": int}, "per_minute")
            if isinstance(row.get("minute"), bool) or not isinstance(row.get("minute"), (int, float)):
                raise _malformed("per_minute")
        return rows

    def mark_requeued(self, id: str, by: str, handle: str | None = None, server: str | None = None) -> bool:
        return _shaped(self.ask("mark_requeued", id=id, by=by, handle=handle, server=server), bool, "mark_requeued")

    def purge(self, *, min_age: float | None = None, older_than: float | None = None,
              ids: list[str] | None = None) -> int:
        return _shaped(self.ask("purge", min_age=min_age, older_than=older_than, ids=ids), int, "purge")

    def import_records(self, records: list[dict]) -> dict:
        answer = _fields(self.ask("import", records=records),
                         {"added": int, "known": int, "refused": list, "refused_count": int}, "import")
        for r in answer["refused"]:
            _fields(r, {"index": int, "error": str}, "import")
        return answer

    # -- the protocol ----------------------------------------------------------------------
    def ask(self, op: str, **fields: Any) -> Any:
        """Send one request; its result. The request is checked here first (QueryError)."""
        request = {"op": op, **{k: v for k, v in fields.items() if v is not None}}
        try:
            check_request(request)
        except Refused as e:
            raise QueryError(f"bad query: {e}") from None
        payload = json.dumps(request, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                             allow_nan=False).encode("utf-8", "surrogatepass")
        unique = query_unique(payload)
        payload = sign_request(op, payload, self.key)
        deadline = time.monotonic() + self.timeout
        tried: dict[str, str] = {}
        for host, port in self.servers:
            address = format_address(host, port)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            conn = gp.Connection(host, port, connect_timeout=min(left, gp.CONNECT_TIMEOUT), max_packet=self.max_packet)
            try:
                conn.connect()
                if not collector_attached(conn, max(0.1, deadline - time.monotonic())):
                    tried[address] = "no collector attached"
                    continue
                reply = submit_query(conn, unique, payload, deadline)
                if reply is None:
                    tried[address] = f"no answer within {self.timeout:g}s"
                    break
                return query_answer(self.open_reply(reply, address), address)
            except ServerError as e:
                tried[address] = str(e).removeprefix(address + ": ")
            finally:
                conn.close()
        detail = "; ".join(f"{a}: {why}" for a, why in tried.items()) or "no server tried"
        if tried and all(gp.is_refusal(why) for why in tried.values()):  # not a collector missing: TLS
            raise NoCollectorError(f"no outcomes collector asked: TLS refused by every server: {detail}")
        within = f" within {self.timeout:g}s" if time.monotonic() >= deadline else ""
        raise NoCollectorError(f"no outcomes collector answered{within} (is `geartask manage outcomes serve` "
                               f"running?): {detail}")

    def open_reply(self, reply: bytes, address: str) -> bytes:
        """The answer's JSON; RogueAnswerError, naming the server, for one no trusted collector
        signed (with require_signed). The signer's name is not needed further: it is trusted."""
        try:
            _signer, body = open_answer(reply, self.trust, require_signed=self.require_signed,
                                        max_age=self.max_age)
        except RogueAnswer as e:
            raise RogueAnswerError(f"a rogue answerer on {address}: its answer is not signed by a trusted "
                                   f"collector ({e.reason}); nothing it said was used") from None
        return body


def collector_attached(conn: gp.Connection, timeout: float) -> bool:
    """Whether a worker of the query function is connected to this server: if none is, a
    query would only wait for its deadline (and stay queued, ignored, after it)."""
    for f in parse_status(conn.text_command("status", timeout)):
        if f.function == QUERY_FUNCTION:
            return f.workers > 0
    return False


_ANSWERS = frozenset((gp.JOB_CREATED, gp.WORK_COMPLETE, gp.WORK_WARNING, gp.WORK_FAIL, gp.WORK_EXCEPTION))


def submit_query(conn: gp.Connection, unique: str, payload: bytes, deadline: float) -> bytes | None:
    """Submit the query, wait for its answer until ``deadline``; None when none came."""
    conn.send(gp.submit_command("high", False), task=QUERY_FUNCTION, unique=unique, data=payload)
    handle, warning = None, None
    while True:
        pkt = conn.recv_until(_ANSWERS, deadline)  # ERROR raises ServerError with its text
        if pkt is None:
            return None
        if pkt.cmd == gp.JOB_CREATED and handle is None:
            handle = pkt["job_handle"]
        elif handle is None or pkt.args.get("job_handle") != handle:
            continue
        elif "oversize" in pkt.args:  # skipped by the connection (gearman.max_packet)
            if pkt.cmd in (gp.WORK_COMPLETE, gp.WORK_EXCEPTION):
                raise QueryError(f"the answer from {conn.address} is {gp.to_text(pkt['oversize'])} bytes, over "
                                 f"gearman.max_packet ({conn.max_packet} bytes)")
        elif pkt.cmd == gp.WORK_COMPLETE:
            return pkt["data"]
        elif pkt.cmd == gp.WORK_WARNING:
            warning = pkt["data"]
        elif pkt.cmd in (gp.WORK_FAIL, gp.WORK_EXCEPTION):
            raise QueryError(f"the query failed on {conn.address}: "
                             f"{warning[:300].decode('utf-8', 'replace') if warning else 'no reason given'}")


def query_answer(reply: bytes, address: str) -> Any:
    try:
        answer = json.loads(reply.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        answer = None
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise QueryError(f"the answer from {address} is not a collector's: {reply[:80]!r}")
    if not answer["ok"]:
        raise QueryError(f"the collector refused the query: {str(answer.get('error'))[:1000]}")
    return answer.get("result")


def _malformed(op: str) -> QueryError:
    return QueryError(f"the answer to {op!r} is not a collector's (wrong shape)")


def _shaped(value: Any, kind: type, op: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _malformed(op)
    return value


def _fields(value: Any, kinds: dict[str, type], op: str) -> dict:
    _shaped(value, dict, op)
    for key, kind in kinds.items():
        _shaped(value.get(key), kind, op)
    return value


def checked_record(value: Any, op: str) -> dict | None:
    """A record (or None), checked as the collector checked it when it stored it."""
    if value is None:
        return None
    try:
        check(value)
    except BadOutcome as e:
        raise QueryError(f"the answer to {op!r} holds a malformed record: {e}") from None
    requeues = value.get("requeues", [])
    if not isinstance(value.get("error", ""), str) or not isinstance(requeues, list) or \
            not all(isinstance(q, dict) for q in requeues):
        raise _malformed(op)
    return value


def _listing(value: Any, op: str) -> dict:
    _fields(value, {"records": list, "more": bool}, op)
    for r in value["records"]:
        checked_record(r, op)
    return value
