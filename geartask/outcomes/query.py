"""The query protocol of ``geartask.outcomes.query``: requests checked, run on the store, answered.

A request is one JSON object ``{"op": NAME, ...fields}``; the answer is ``{"ok": true,
"result": ...}`` or ``{"ok": false, "error": "..."}``. Every field is checked (anyone who
reaches gearmand can send one); unknown fields are refused. docs/outcomes.md lists the ops.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from typing import Any, Callable

from .record import STATES, BadOutcome, utf8_encodable, shown_value, cap_record, check
from .store import OutcomeStore

MAX_REQUEST = 64 * 1024 * 1024  # bytes of one request (an import carries records)
MAX_LIST = 1000  # records in one list answer
DEFAULT_LIST = 100
MAX_IDS = 10_000  # ids in one purge
MAX_IMPORT = 10_000  # records in one import
MAX_KEY = 1024  # characters of a unique, handle, server, id, task or name in a request
MAX_AGE = 100 * 366 * 86400.0
REFUSED_SHOWN = 20  # refused records named in an import's answer



class Refused(ValueError):
    """A request that can't be run; the message names what is wrong."""


def _text(value: Any, name: str, limit: int = MAX_KEY) -> str:
    if not isinstance(value, str) or not value:
        raise Refused(f"{name!r} must be a non-empty string, got {shown_value(value)}")
    if len(value) > limit:
        raise Refused(f"{name!r} is {len(value)} characters, over {limit}")
    if not utf8_encodable(value):
        raise Refused(f"{name!r} is not Unicode text (it holds a lone surrogate)")
    return value


def _number(value: Any, name: str, maximum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise Refused(f"{name!r} must be a finite number >= 0, got {shown_value(value)}")
    if maximum is not None and value > maximum:
        raise Refused(f"{name!r} must be at most {maximum:g}, got {shown_value(value)}")
    return float(value)


def _limit(value: Any, name: str = "limit") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIST:
        raise Refused(f"{name!r} must be a whole number 1-{MAX_LIST}, got {shown_value(value)}")
    return value


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise Refused(f"{name!r} must be true or false, got {shown_value(value)}")
    return value


def _state(value: Any, name: str) -> str:
    if value not in STATES:
        raise Refused(f"{name!r} must be one of {', '.join(STATES)}, got {shown_value(value)}")
    return value


def _records(value: Any, name: str) -> list:
    if not isinstance(value, list) or len(value) > MAX_IMPORT:
        raise Refused(f"{name!r} must be a list of at most {MAX_IMPORT} records")
    return value


def _ids(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not value or len(value) > MAX_IDS:
        raise Refused(f"{name!r} must be a list of 1-{MAX_IDS} ids")
    return [_text(v, f"{name}[{i}]", 64) for i, v in enumerate(value)]


_TIME = {"since": lambda v, n: _number(v, n), "max_age": lambda v, n: _number(v, n, MAX_AGE)}
_Checker = Callable[[Any, str], Any]
_LISTING: dict[str, _Checker] = {"task": _text, **_TIME, "until": lambda v, n: _number(v, n), "limit": _limit, "include_requeued": _flag}
# op -> {field: checker}; each checker returns the clean value or raises Refused
OPS: dict[str, dict[str, Callable[[Any, str], Any]]] = {
    "ping": {},
    "size": {},
    "latest": {"unique": _text, "handle": _text, "server": _text},
    "get": {"id": lambda v, n: _text(v, n, 64)},
    "history": {"unique": _text, "limit": _limit},
    "failed": dict(_LISTING),
    "recent": {**_LISTING, "state": _state},
    "counts": dict(_TIME),
    "per_minute": dict(_TIME),
    "mark_requeued": {"id": lambda v, n: _text(v, n, 64), "by": _text, "handle": _text, "server": _text},
    "purge": {"older_than": lambda v, n: _number(v, n), "min_age": lambda v, n: _number(v, n, MAX_AGE),
              "ids": _ids},
    "import": {"records": _records},
}
_REQUIRED = {"get": ("id",), "history": ("unique",), "mark_requeued": ("id", "by"), "import": ("records",)}
_ONE_OF = {"latest": ("unique", "handle"), "purge": ("older_than", "min_age", "ids"), "counts": ("since", "max_age"),
           "per_minute": ("since", "max_age")}
_AT_MOST_ONE = {"failed": ("since", "max_age"), "recent": ("since", "max_age")}


def parse_request(raw: bytes) -> dict:
    """The checked request in ``raw``; Refused names what is wrong."""
    if len(raw) > MAX_REQUEST:
        raise Refused(f"request of {len(raw)} bytes refused (at most {MAX_REQUEST})")
    try:
        req = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise Refused("request is not UTF-8 text") from None
    except RecursionError:
        raise Refused("request is JSON nested too deeply") from None
    except ValueError as e:
        raise Refused(f"request is not JSON: {e}") from None
    return check_request(req)


def check_request(req: Any) -> dict:
    """A request object checked against its op's fields (for callers in the same process)."""
    if not isinstance(req, dict):
        raise Refused(f"a request must be a JSON object like {{\"op\": \"size\"}}, got {type(req).__name__}")
    op = req.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise Refused(f"unknown op {shown_value(op)}; known: {', '.join(sorted(OPS))}")
    spec = OPS[op]
    clean: dict[str, Any] = {"op": op}
    for key, value in req.items():
        if key == "op":
            continue
        if key not in spec:
            known = ", ".join(sorted(spec)) or "none"
            raise Refused(f"unknown field {shown_value(key)} for op {op!r} (known: {known})")
        if value is None:
            continue
        clean[key] = spec[key](value, key)
    for key in _REQUIRED.get(op, ()):
        if key not in clean:
            raise Refused(f"op {op!r} needs {key!r}")
    for group, exactly in ((_ONE_OF, True), (_AT_MOST_ONE, False)):
        keys = group.get(op)
        if keys:
            given = [k for k in keys if k in clean]
            if len(given) > 1 or (exactly and not given):
                raise Refused(f"op {op!r} takes {'exactly' if exactly else 'at most'} one of "
                              f"{', '.join(repr(k) for k in keys)}")
    if op == "latest" and "server" in clean and "handle" not in clean:
        raise Refused("op 'latest': 'server' goes with 'handle'")
    return clean


class Queries:
    """Runs checked requests on a store. ``max_result`` cuts what an answer carries of a
    record's result, data and reason; ``info`` (for ``ping``) describes the collector."""

    def __init__(self, store: OutcomeStore, max_result: int, info: Callable[[], dict] | None = None,
                 on_error: Callable[[str, Exception], None] | None = None):
        self.store, self.max_result = store, max_result
        self.info = info or (lambda: {})
        self.on_error = on_error

    def answer(self, raw: bytes) -> bytes:
        """The JSON answer to one request's bytes; never raises."""
        try:
            reply = {"ok": True, "result": self.run(parse_request(raw))}
        except Refused as e:
            reply = {"ok": False, "error": str(e)}
        except (sqlite3.Error, OSError) as e:
            if self.on_error:
                self.on_error("outcome store failed a query", e)
            reply = {"ok": False, "error": f"the collector's store failed: {e}"}
        except Exception as e:  # a bug: the query must still be answered, or it would come back for ever
            if self.on_error:
                self.on_error("query failed", e)
            reply = {"ok": False, "error": f"the collector failed on this query: {type(e).__name__}: {e}"}
        return json.dumps(reply, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode(
            "utf-8", "backslashreplace")  # a lone surrogate quoted in an error stays a JSON escape

    def run(self, req: dict) -> Any:
        """The result of a checked request (check_request); Refused, or the store's errors."""
        op, s = req["op"], self.store
        if op == "ping":
            return {**self.info(), "size": s.size()}
        if op == "size":
            return s.size()
        if op == "latest":
            return self._full(s.latest(unique=req.get("unique"), handle=req.get("handle"), server=req.get("server")))
        if op == "get":
            return self._full(s.get(req["id"]))
        if op == "history":
            limit = req.get("limit", DEFAULT_LIST)
            rows = s.history(req["unique"], limit + 1)
            return {"records": rows[-limit:], "more": len(rows) > limit}
        if op in ("failed", "recent"):
            limit = req.get("limit", DEFAULT_LIST)
            rows = s.recent(state="failed" if op == "failed" else req.get("state"), task=req.get("task"),
                            since=_since(req), until=req.get("until"), limit=limit + 1,
                            include_requeued=req.get("include_requeued", op == "recent"))
            return {"records": rows[:limit], "more": len(rows) > limit}
        if op == "counts":
            since = _since(req)
            assert since is not None  # check_request lets counts through only with since or max_age
            return [{"task": t, "state": st, "count": n} for (t, st), n in sorted(s.counts(since).items())]
        if op == "per_minute":  # the dashboard's throughput chart: a few hundred rows at most
            since = _since(req)
            assert since is not None
            return [{"minute": m, "state": st, "count": n} for m, st, n in s.per_minute(since)]
        if op == "mark_requeued":
            return s.mark_requeued(req["id"], by=req["by"], at=time.time(), handle=req.get("handle"),
                                   server=req.get("server"))
        if op == "purge":
            if "ids" in req:
                return s.purge_failed(ids=req["ids"])
            return s.purge_failed(older_than=req.get("older_than", time.time() - req.get("min_age", 0.0)))
        if op == "import":
            return self._import(req["records"])
        raise Refused(f"unknown op {op!r}")  # OPS and this list are kept together

    def _full(self, rec: dict | None) -> dict | None:
        return None if rec is None else cap_record(rec, self.max_result)

    def _import(self, records: list) -> dict:
        good, refused = [], []
        for i, rec in enumerate(records):
            try:
                good.append(cap_record(check(rec), self.max_result))
            except BadOutcome as e:
                refused.append({"index": i, "error": str(e)})
        added = self.store.add(good)
        return {"added": added, "known": len(good) - added, "refused": refused[:REFUSED_SHOWN],
                "refused_count": len(refused)}


def _since(req: dict) -> float | None:
    if "max_age" in req:
        return time.time() - req["max_age"]
    return req.get("since")
