"""The dead-letter file: jobs that failed for good, one JSON line each, bounded in size.

gearmand never requeues a failed job, and a background job's failure has nobody listening,
so this file is where it is not lost. Records keep at most ``MAX_DATA`` bytes of a payload
(with its size and sha256) and ``MAX_REASON`` characters of a reason; the file is rotated
like the logs (log.max_bytes, log.backups); a line is written whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..jsonlines import JsonLinesFile

MAX_DATA = 16 * 1024  # bytes of a job's payload kept in its record
MAX_REASON = 4096  # characters of a failure reason kept (in the record and sent to the client)


def cap_text(text: str, limit: int = MAX_REASON) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit} more characters cut]"


def payload_fields(raw: bytes, decoded: Any = None, limit: int = MAX_DATA) -> dict[str, Any]:
    """How a record shows a payload: its size and sha256 always; then, when it fits in
    ``limit`` bytes, the payload itself (``decoded``, the JSON value, if given; else its text,
    or hex when it is not UTF-8); when it does not fit, only its head (``data_head``)."""
    fields: dict[str, Any] = {"data_bytes": len(raw), "data_sha256": hashlib.sha256(raw).hexdigest()}
    fits = len(raw) <= limit
    try:
        text = raw[:limit].decode("utf-8")
    except UnicodeDecodeError:
        fields["data_hex" if fits else "data_head_hex"] = raw[:limit].hex()
        return fields
    if not fits:
        fields["data_head"] = text
    elif decoded is not None and not isinstance(decoded, (bytes, str)) and _json_ok(decoded):
        fields["data"] = decoded
    else:
        fields["data"] = text
    return fields


def _json_ok(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
        return True
    except (TypeError, ValueError, RecursionError):  # NaN, or nested too deep for JSON
        return False


def _dumps(record: dict) -> str:
    try:
        return json.dumps(record, ensure_ascii=False, default=str, allow_nan=False)
    except (ValueError, RecursionError):  # a field a task filled with something JSON can't hold
        plain = (str, int, float, bool, type(None))
        record = {k: v if isinstance(v, plain) else f"<{type(v).__name__} not representable>"
                  for k, v in record.items()}
        return json.dumps(record, ensure_ascii=False)


class DeadLetters:
    """Appends records to ``path``; many worker processes may share one file (a JsonLinesFile:
    whole lines or nothing, rotated like the logs)."""

    def __init__(self, path: Path, max_bytes: int = 10 * 1024 * 1024, backups: int = 5):
        self.file = JsonLinesFile(path, max_bytes, backups)
        self.path = self.file.path

    def append(self, record: dict) -> None:
        """Write one record; OSError when it could not be written (nothing half-written stays)."""
        # backslashreplace: a lone surrogate from a job's JSON ("\\ud800") must not fail the write
        self.file.append((_dumps(record) + "\n").encode("utf-8", "backslashreplace"))
