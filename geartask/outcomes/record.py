"""One job outcome: what a worker reports and the store keeps (the fields: docs/outcomes.md).

Workers build records with ``make_record`` and send them, a JSON object or a list of
them, as background jobs of ``OUTCOME_FUNCTION`` (``encode_batches``). The collector checks
every record with ``check``, field by field, because anyone who reaches gearmand can
submit such a job.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import socket
import time
from typing import Any, Iterable, Iterator

from .. import targets
from ..jobs import too_deep

OUTCOME_FUNCTION = "geartask.outcomes"  # workers submit outcomes here (background jobs)
QUERY_FUNCTION = "geartask.outcomes.query"  # the collector answers queries here (foreground jobs)

STATES = ("complete", "failed")
PRIORITIES = ("low", "normal", "high")
ENCODINGS = ("text", "base64")
DEFAULT_MAX_RESULT = 1024 * 1024  # outcomes.max_result's default
MAX_ID = 64
MAX_NAME = 1024  # task, unique, handle, server, worker: gearmand's own limits are far lower
MAX_TEXT = 64 * 1024 * 1024  # result, data: the worker (and the collector) cap them much earlier
MAX_REASON_DEPTH = 32  # a failure reason is a small JSON value; deeper is not one of ours
BATCH_RECORDS = 20  # records per outcome job (encode_batches)
BATCH_BYTES = 4 * 1024 * 1024  # bytes per outcome job, unless one record alone is bigger
MAX_TRACEBACK = 16 * 1024  # bytes of a failed task's traceback kept: its tail, where the error is
DEFAULT_MAX_CLOCK_SKEW = 300.0  # outcomes.max_clock_skew's default: seconds a peer's time may be ahead of ours

_STR = {"id": MAX_ID, "server": MAX_NAME, "handle": MAX_NAME, "unique": MAX_NAME, "task": MAX_NAME,
        "worker": MAX_NAME, "host": MAX_NAME, "sender_host": MAX_NAME, "priority": 16,
        "result": MAX_TEXT, "data": MAX_TEXT, "result_encoding": 16, "data_encoding": 16, "requeue_of": MAX_ID,
        "signer": 256, "signed": 2048, "envelope": 8192,  # signer..envelope: a signed job (docs/outcomes.md)
        "function": MAX_NAME}  # a targeted job's gearmand function (shell@host:web1)
_NUM = ("finished_at", "started_at", "submitted_at", "duration")
_COUNT = ("attempts", "retries", "result_size", "data_size")
_BOOL = ("background", "result_cut", "data_cut", "reason_cut", "traceback_cut")
REQUIRED = ("id", "server", "handle", "task", "state", "finished_at")
HEAVY = ("result", "data", "reason")  # possibly large: kept apart by the store, left out of summaries


class BadOutcome(ValueError):
    """Raised for an outcome record that can't be stored; the message names the field."""


def check(obj: Any) -> dict:
    """Return a clean copy of one outcome record, or raise BadOutcome naming the problem.

    Unknown keys are dropped (a newer worker may send more than this collector knows).
    """
    if not isinstance(obj, dict):
        raise BadOutcome(f"an outcome must be a JSON object, got {type(obj).__name__}")
    for key in REQUIRED:
        if obj.get(key) in (None, ""):
            raise BadOutcome(f"missing {key!r}")
    out: dict[str, Any] = {}
    for key, limit in _STR.items():
        value = obj.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise BadOutcome(f"{key!r} must be a string, got {type(value).__name__}")
        if len(value) > limit:
            raise BadOutcome(f"{key!r} is {len(value)} characters, over {limit}")
        if not utf8_encodable(value):
            raise BadOutcome(f"{key!r} is not Unicode text (it holds a lone surrogate)")
        out[key] = value
    for key in _NUM:
        value = obj.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BadOutcome(f"{key!r} must be a finite number, got {shown_value(value)}")
        out[key] = float(value)
    for key in _COUNT:
        value = obj.get(key, 1 if key == "attempts" else None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**53:
            raise BadOutcome(f"{key!r} must be a whole number >= 0, got {shown_value(value)}")
        out[key] = value
    for key in _BOOL:
        value = obj.get(key)
        if value is None:
            continue
        if not isinstance(value, bool):
            raise BadOutcome(f"{key!r} must be true or false, got {shown_value(value)}")
        out[key] = value
    if obj["state"] not in STATES:
        raise BadOutcome(f"'state' must be one of {', '.join(STATES)}, got {shown_value(obj['state'])}")
    out["state"] = obj["state"]
    if "priority" in out and out["priority"] not in PRIORITIES:
        raise BadOutcome(f"'priority' must be one of {', '.join(PRIORITIES)}, got {out['priority']!r}")
    for key in ("result", "data"):
        enc = out.get(f"{key}_encoding")
        if enc is not None and enc not in ENCODINGS:
            raise BadOutcome(f"'{key}_encoding' must be one of {', '.join(ENCODINGS)}, got {enc!r}")
        if key in out:
            out[f"{key}_encoding"] = enc = enc or "text"
            if enc == "base64":
                try:
                    base64.b64decode(out[key], validate=True)
                except (binascii.Error, ValueError):
                    raise BadOutcome(f"{key!r} is not valid base64") from None
    if obj.get("reason") is not None:
        if too_deep(obj["reason"], MAX_REASON_DEPTH):
            raise BadOutcome(f"'reason' is nested more than {MAX_REASON_DEPTH} levels deep")
        try:
            text = json.dumps(obj["reason"], ensure_ascii=False, allow_nan=False)
        except (ValueError, TypeError):
            raise BadOutcome("'reason' holds NaN or Infinity, which JSON can't") from None
        if not utf8_encodable(text):
            raise BadOutcome("'reason' is not Unicode text (it holds a lone surrogate)")
        out["reason"] = obj["reason"]  # any JSON value; it came out of json.loads already
    out.pop("traceback_cut", None)
    if obj.get("traceback") is not None and out["state"] == "failed":  # a success has no traceback
        value = obj["traceback"]
        if not isinstance(value, str):
            raise BadOutcome(f"'traceback' must be a string, got {type(value).__name__}")
        out["traceback"], cut = cap_traceback(value)  # a forged huge one is cut, not refused
        if cut or obj.get("traceback_cut") is True:
            out["traceback_cut"] = True
    return out


def check_times(rec: dict, now: float | None = None, max_skew: float = DEFAULT_MAX_CLOCK_SKEW,
                keys: Iterable[str] = _NUM[:3]) -> None:
    """Raise BadOutcome when a time of ``rec`` (finished_at, started_at, submitted_at, or the
    ``keys`` given: a worker checks an envelope's ``at`` with keys=("at",)) is not a finite
    number, is negative, or is more than ``max_skew`` seconds ahead of ``now``: a peer's clock
    (or a forger) must not date a record in the future, where it would sort newest for ever."""
    now = time.time() if now is None else now
    for key in keys:
        value = rec.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BadOutcome(f"{key!r} must be a finite number, got {shown_value(value)}")
        if value < 0:
            raise BadOutcome(f"{key!r} is negative ({value!r})")
        if value > now + max_skew:
            raise BadOutcome(f"{key!r} is {value - now:.0f} s ahead of this host's clock "
                             f"(more than max_clock_skew {max_skew:g} s)")


def utf8_encodable(text: str) -> bool:
    """UTF-8 can hold it: JSON's "\\ud800" escape gives a lone surrogate, which it can't (nor sqlite)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def shown_value(value: Any) -> str:
    """A peer's value for an error message: its repr, cut to 80 characters."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- building records (the worker side) -------------------------------------------------

_HOST = socket.gethostname()


def encode_bytes(raw: bytes | str, limit: int) -> dict[str, Any]:
    """How a record holds bytes: ``{"": text, "encoding", "size", "cut"}``, the value UTF-8 text
    when it is that, else base64; at most ``limit`` bytes of it (cut at a character boundary)."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    size, cut = len(raw), len(raw) > limit
    kept = raw[:limit] if cut else raw
    try:
        text = kept.decode("utf-8")
        enc = "text"
    except UnicodeDecodeError as e:
        if cut and e.start >= len(kept) - 3 and _utf8(raw):  # the cut split a character: drop its head
            text, enc = kept[:e.start].decode("utf-8"), "text"
        else:
            text, enc = base64.b64encode(kept).decode("ascii"), "base64"
    return {"": text, "encoding": enc, "size": size, "cut": cut}


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def decode_bytes(record: dict, key: str) -> bytes | None:
    """The bytes of a record's ``result`` or ``data`` (None when it has none)."""
    value = record.get(key)
    if value is None:
        return None
    if record.get(f"{key}_encoding") == "base64":
        return base64.b64decode(value)
    return value.encode("utf-8", "surrogatepass")


def _put_bytes(record: dict, key: str, raw: bytes | str, limit: int) -> None:
    enc = encode_bytes(raw, limit)
    record[key], record[f"{key}_encoding"], record[f"{key}_size"] = enc[""], enc["encoding"], enc["size"]
    if enc["cut"]:
        record[f"{key}_cut"] = True


def resend_function(record: dict) -> str:
    """The gearmand function to send a recorded job to again: its targeted ``function``
    (``shell@host:web1``) when that is a valid target of its ``task``, else the ``task``."""
    task = record.get("task")
    function = record.get("function")
    if isinstance(function, str) and isinstance(task, str):
        parsed = targets.parse(function)
        if parsed is not None and parsed[0] == task:
            return function
    return str(task or "")


def make_record(*, server: str, handle: str, task: str, state: str, unique: str | None = None,
                finished_at: float | None = None, started_at: float | None = None,
                submitted_at: float | None = None, attempts: int = 1, retries: int | None = None,
                background: bool | None = None, worker: str | None = None, host: str | None = None,
                sender_host: str | None = None, priority: str | None = None,
                result: bytes | str | None = None, reason: Any = None, data: bytes | str | None = None,
                requeue_of: str | None = None, max_result: int = DEFAULT_MAX_RESULT,
                id: str | None = None, signer: str | None = None, signed: str | None = None,
                envelope: str | None = None, traceback: str | None = None, function: str | None = None) -> dict:
    """One outcome record, as a worker reports it (the fields: docs/outcomes.md).

    ``result`` (a complete job's WORK_COMPLETE payload) and ``data`` (the job's own payload,
    without the envelope: pass it for failed jobs, so ``failed requeue`` can send it again) are
    kept up to ``max_result`` bytes each, as text or base64, with their full size and a
    ``*_cut`` flag. ``reason`` (a failure's JSON reason) longer than ``max_result`` as JSON
    becomes its cut JSON text with ``reason_cut``. ``id`` (new by default) makes the record
    idempotent: build it once and send that same dict again on a retry. ``traceback`` (a failed
    plugin task's, as text) is kept up to MAX_TRACEBACK bytes, its tail, with ``traceback_cut``.
    ``function``: the gearmand function a targeted job came as (``shell@host:web1``), when it
    is not ``task``.
    """
    now = time.time() if finished_at is None else finished_at
    rec: dict[str, Any] = {"id": id or os.urandom(16).hex(), "server": server, "handle": handle, "task": task,
                           "state": state, "finished_at": now, "attempts": attempts, "host": host or _HOST}
    for key, value in (("unique", unique), ("started_at", started_at), ("submitted_at", submitted_at),
                       ("retries", retries), ("background", background), ("worker", worker),
                       ("sender_host", sender_host), ("priority", priority), ("requeue_of", requeue_of),
                       ("signer", signer), ("signed", signed), ("envelope", envelope), ("function", function)):
        if value is not None:
            rec[key] = value
    if started_at is not None:
        rec["duration"] = round(max(0.0, now - started_at), 6)
    if result is not None:
        _put_bytes(rec, "result", result, max_result)
    if data is not None:
        _put_bytes(rec, "data", data, max_result)
    if reason is not None:
        rec.update(cap_reason(reason, max_result))
    if traceback is not None:
        rec["traceback"], cut = cap_traceback(traceback)
        if cut:
            rec["traceback_cut"] = True
    return rec


def cap_traceback(text: str, limit: int = MAX_TRACEBACK) -> tuple[str, bool]:
    """(text, cut): a traceback of at most ``limit`` UTF-8 bytes. A longer one keeps its tail
    (the innermost frames and the error) behind a line saying how many bytes were cut."""
    raw = text.encode("utf-8", "replace")  # a lone surrogate becomes '?': sqlite and JSON can't hold it
    if len(raw) <= limit:
        return raw.decode("utf-8"), False
    marker = "[... {} bytes of the traceback's start cut; its end follows ...]\n"
    keep = max(0, limit - len(marker.format(len(raw)).encode("utf-8")))
    tail = raw[len(raw) - keep:].decode("utf-8", "ignore")  # a character split by the cut is dropped
    return marker.format(len(raw) - len(tail.encode("utf-8"))) + tail, True


def cap_reason(reason: Any, limit: int) -> dict[str, Any]:
    """``{"reason": reason}``, or its JSON text cut to ``limit`` characters and ``reason_cut``."""
    try:
        text = json.dumps(reason, ensure_ascii=False, allow_nan=False, default=str)
    except (ValueError, RecursionError):
        return {"reason": f"<a {type(reason).__name__} JSON can't hold>", "reason_cut": True}
    if not utf8_encodable(text):  # a lone surrogate (from a task's text) would get the record refused
        text = text.encode("utf-8", "replace").decode("utf-8")
    if len(text) <= limit and not too_deep(reason, MAX_REASON_DEPTH):
        return {"reason": json.loads(text)}  # plain JSON now: what default=str made of the rest
    return {"reason": text[:limit], "reason_cut": True}


def cap_record(rec: dict, limit: int) -> dict:
    """A checked record with ``result``, ``data`` and ``reason`` cut to ``limit`` (the collector's
    ``outcomes.max_result``) and ``traceback`` to MAX_TRACEBACK, flagged; the record itself when
    nothing is over."""
    over = [k for k in ("result", "data") if k in rec and _bytes_over(rec, k, limit)]
    reason = rec.get("reason")
    reason_big = isinstance(reason, (str, list, dict)) and _json_len(reason) > limit
    tb = rec.get("traceback")
    tb_big = isinstance(tb, str) and len(tb) > MAX_TRACEBACK // 4 and len(tb.encode("utf-8", "replace")) > MAX_TRACEBACK
    if not over and not reason_big and not tb_big:
        return rec
    rec = dict(rec)
    if tb_big:
        rec["traceback"], rec["traceback_cut"] = cap_traceback(str(tb))[0], True
    for key in over:
        raw = decode_bytes(rec, key) or b""
        size = max(rec.get(f"{key}_size", 0), len(raw))
        _put_bytes(rec, key, raw, limit)
        rec[f"{key}_size"], rec[f"{key}_cut"] = size, True
    if reason_big:
        rec.update(cap_reason(reason, limit))
        rec["reason_cut"] = True
    return rec


def _bytes_over(rec: dict, key: str, limit: int) -> bool:
    value = rec[key]
    if value is None or len(value) <= limit // 4:  # no encoding makes that many characters more than limit bytes
        return False
    return len(decode_bytes(rec, key) or b"") > limit


def _json_len(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if len(value) == 0:
        return 2
    return len(json.dumps(value, ensure_ascii=False))


def dumps(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def outcome_jobs(records: Iterable[dict], max_records: int = BATCH_RECORDS,
                 max_bytes: int = BATCH_BYTES) -> Iterator[tuple[str, bytes]]:
    """(unique key, payload) of each outcome job for ``records`` (encode_batches): submit each
    as a background job of OUTCOME_FUNCTION with that unique key.

    The key is derived from the payload. It must not be empty nor shared by different
    payloads: gearmand's sqlite queue keeps one row per unique key and function, so such jobs
    overwrite each other there and all but one are lost if gearmand restarts (docs/gearmand.md).
    The same payload sent twice gets the same key, and gearmand runs it once.
    """
    for payload in encode_batches(records, max_records, max_bytes):
        yield job_unique(payload), payload


def job_unique(payload: bytes) -> str:
    """``geartask.outcomes:`` and 32 hex digits of the payload's hash (50 characters: gearmand takes 64)."""
    return f"{OUTCOME_FUNCTION}:{hashlib.blake2b(payload, digest_size=16).hexdigest()}"


def encode_batches(records: Iterable[dict], max_records: int = BATCH_RECORDS,
                   max_bytes: int = BATCH_BYTES) -> Iterator[bytes]:
    """Outcome job payloads for ``records``: JSON lists of at most ``max_records`` records and
    ``max_bytes`` bytes (a record bigger than that goes alone). outcome_jobs adds their keys."""
    parts: list[bytes] = []
    size = 0
    for rec in records:
        part = dumps(rec).encode("utf-8", "surrogatepass")
        if parts and (len(parts) >= max_records or size + len(part) + 1 > max_bytes):
            yield b"[" + b",".join(parts) + b"]"
            parts, size = [], 0
        parts.append(part)
        size += len(part) + 1
    if parts:
        yield b"[" + b",".join(parts) + b"]"
