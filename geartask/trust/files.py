"""Writing key and certificate files so that no one else can read a key, ever.

A key is created with O_EXCL and mode 0600 in the same system call, so there is no moment at
which it exists with wider permissions (a chmod after writing would leave one). ``force``
replaces a file by writing a new one beside it and renaming it over, never by opening the old
one (it might be a symlink planted by someone else).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError

KEY_MODE = 0o600
CERT_MODE = 0o644


def refuse_existing(paths: list[Path], force: bool) -> None:
    """UsageError naming the first of ``paths`` that exists, unless ``force``."""
    if force:
        return
    for p in paths:
        if os.path.lexists(p):
            raise UsageError(f"{p} already exists; nothing written (use --force to replace it)")


def write_private(path: Path, data: bytes, mode: int = KEY_MODE, force: bool = False) -> Path:
    """Write ``data`` to a new file of ``mode`` (0600 for keys, 0644 at most for certificates)."""
    path = Path(path)
    target = path
    if force and os.path.lexists(path):
        target = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise UsageError(f"{path} already exists; nothing written (use --force to replace it)") from None
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; never widened beyond ``mode``
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if target != path:
            os.replace(target, path)
    except OSError as e:
        try:
            os.unlink(target)
        except OSError:
            pass
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def read_limited(path: Path, what: str, limit: int = 1024 * 1024) -> bytes:
    """A key or certificate file's bytes; UsageError naming ``what`` (a config key or a path)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise UsageError(f"{what}: {path} not found") from None
    except IsADirectoryError:
        raise UsageError(f"{what}: {path} is a directory, not a file") from None
    except OSError as e:
        raise UsageError(f"{what}: cannot read {path}: {e.strerror or e}") from None
    if len(data) > limit:
        raise UsageError(f"{what}: {path} is larger than {limit // 1024} KiB: not a key or certificate")
    return data
