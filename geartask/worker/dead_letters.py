"""The dead-letter file: jobs that failed for good, one JSON line each, bounded in size.

gearmand never requeues a failed job, and a background job's failure has nobody listening,
so this file is where it is not lost. Records keep at most ``MAX_DATA`` bytes of a payload
(with its size and sha256) and ``MAX_REASON`` characters of a reason; the file is rotated
like the logs (log.max_bytes, log.backups); a line is written whole or not at all.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any

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
    """Appends records to ``path``; many worker processes may share one file.

    Appends take an advisory lock (``path`` + ".lock"), so a rotation by one process never
    races an append by another. A short write (full disk) is truncated away, so the file
    never holds half a line for the next record to be glued to.
    """

    def __init__(self, path: Path, max_bytes: int = 10 * 1024 * 1024, backups: int = 5):
        self.path = Path(path)
        self.max_bytes, self.backups = max_bytes, backups

    def append(self, record: dict) -> None:
        """Write one record; OSError when it could not be written (nothing half-written stays)."""
        # backslashreplace: a lone surrogate from a job's JSON ("\\ud800") must not fail the write
        line = (_dumps(record) + "\n").encode("utf-8", "backslashreplace")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(f"{self.path}.lock", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._rotate_if_full(len(line))
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                self._write_whole(fd, line)
            finally:
                os.close(fd)
        finally:
            os.close(lock)  # releases the lock

    def _rotate_if_full(self, adding: int) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size == 0 or size + adding <= self.max_bytes:
            return
        if self.backups <= 0:
            os.truncate(self.path, 0)
            return
        for i in range(self.backups - 1, 0, -1):
            older = Path(f"{self.path}.{i}")
            if older.exists():
                os.replace(older, f"{self.path}.{i + 1}")
        os.replace(self.path, f"{self.path}.1")

    @staticmethod
    def _write_whole(fd: int, line: bytes) -> None:
        start = os.fstat(fd).st_size
        if start and os.pread(fd, 1, start - 1) != b"\n":
            line = b"\n" + line  # an earlier writer died mid-line: don't glue this record to it
        try:
            written = os.write(fd, line)
        except OSError:
            os.ftruncate(fd, start)
            raise
        if written != len(line):
            os.ftruncate(fd, start)
            raise OSError(errno.ENOSPC, f"short write ({written} of {len(line)} bytes): the disk may be full")
