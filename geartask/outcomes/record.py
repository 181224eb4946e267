"""One job outcome: what a worker reports and the store keeps. Checked field by field on
the way in, because anyone who reaches gearmand can submit a ``geartask.outcomes`` job."""

from __future__ import annotations

import math
from typing import Any

STATES = ("complete", "failed")
MAX_ID = 64
MAX_NAME = 1024  # task, unique, handle, server, worker: gearmand's own limits are far lower
MAX_TEXT = 64 * 1024 * 1024  # result, data, reason: the worker caps them much earlier

_STR = {"id": MAX_ID, "server": MAX_NAME, "handle": MAX_NAME, "unique": MAX_NAME, "task": MAX_NAME,
        "worker": MAX_NAME, "host": MAX_NAME, "sender_host": MAX_NAME, "priority": 16,
        "result": MAX_TEXT, "data": MAX_TEXT, "result_encoding": 16, "data_encoding": 16,
        "requeued_by": MAX_NAME, "requeue_of": MAX_ID}
_NUM = ("finished_at", "started_at", "submitted_at", "duration", "requeued_at", "result_size", "data_size")
_BOOL = ("background", "result_cut", "data_cut")
REQUIRED = ("id", "server", "handle", "task", "state", "finished_at")
ENCODINGS = ("text", "base64")


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
        out[key] = value
    for key in _NUM:
        value = obj.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BadOutcome(f"{key!r} must be a finite number, got {value!r}")
        out[key] = float(value)
    for key in _BOOL:
        value = obj.get(key)
        if value is None:
            continue
        if not isinstance(value, bool):
            raise BadOutcome(f"{key!r} must be true or false, got {value!r}")
        out[key] = value
    attempts = obj.get("attempts", 1)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or not 0 <= attempts <= 1_000_000:
        raise BadOutcome(f"'attempts' must be a whole number >= 0, got {attempts!r}")
    out["attempts"] = attempts
    if obj["state"] not in STATES:
        raise BadOutcome(f"'state' must be one of {', '.join(STATES)}, got {obj['state']!r}")
    out["state"] = obj["state"]
    for key in ("result_encoding", "data_encoding"):
        if key in out and out[key] not in ENCODINGS:
            raise BadOutcome(f"{key!r} must be one of {', '.join(ENCODINGS)}, got {out[key]!r}")
    if "reason" in obj and obj["reason"] is not None:
        out["reason"] = obj["reason"]  # any JSON value; it came out of json.loads already
    return out
