"""A JSON-lines file that many processes append to: whole lines or nothing, rotated by size."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path


class JsonLinesFile:
    """``path`` plus ``backups`` rotated files (FILE.1 the newest of them), past ``max_bytes``
    like the logs. Appends take an advisory lock (FILE.lock), so one process's rotation never
    races another's append; a short write (a full disk) is cut back, and a half line a crashed
    writer left is ended first, so a record is never glued to another. New files are 0600: the
    sender's record and the dead letters hold job data, which may carry secrets."""

    def __init__(self, path: Path, max_bytes: int = 10 * 1024 * 1024, backups: int = 5):
        self.path, self.max_bytes, self.backups = Path(path), max_bytes, backups

    def files(self) -> list[Path]:
        """Oldest first: FILE.N ... FILE.1, FILE."""
        return [self.path.with_name(f"{self.path.name}.{i}") for i in range(self.backups, 0, -1)] + [self.path]

    def append(self, data: bytes) -> None:
        """Append ``data`` (whole lines); OSError when it could not be written (nothing half-written stays)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(f"{self.path}.lock", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._rotate_if_full(len(data))
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                self._write_whole(fd, data)
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
        files = self.files()  # oldest first; the oldest is overwritten
        for older, newer in zip(files, files[1:], strict=False):
            try:
                os.replace(newer, older)
            except FileNotFoundError:
                pass

    @staticmethod
    def _write_whole(fd: int, data: bytes) -> None:
        start = os.fstat(fd).st_size
        if start and os.pread(fd, 1, start - 1) != b"\n":
            data = b"\n" + data  # an earlier writer died mid-line: don't glue this record to it
        try:
            written = os.write(fd, data)
        except OSError:
            os.ftruncate(fd, start)
            raise
        if written != len(data):
            os.ftruncate(fd, start)
            raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes): the disk may be full")
