"""What an operator may type: it goes into gearmand's line-based text protocol."""

from __future__ import annotations

import ipaddress
import re

from ..control import check_name
from ..errors import UsageError

MAX_FUNCTION = 512  # gearmand's GEARMAN_FUNCTION_MAX_SIZE
MAX_HANDLE = 64  # gearmand's GEARMAND_JOB_HANDLE_SIZE
MAX_QUEUE = 2**31 - 1


def check_function(name: str) -> str:
    """A function name for ``clear``/``maxqueue``: a newline in it would be a second admin
    command to gearmand, a space would split ``maxqueue F N`` differently."""
    if not name or len(name) > MAX_FUNCTION or not name.isprintable() or any(c.isspace() for c in name):
        raise UsageError(f"bad function name {name[:80]!r}: 1-{MAX_FUNCTION} printable "
                         "characters without spaces")
    return name


def check_clear_function(name: str) -> str:
    """A function name for ``clear``: any name gearmand can hold (spaces and newlines too, as a
    peer may register them), since clearing goes over the binary protocol (CAN_DO + GRAB), not
    a text command. Only NUL, which no packet field can carry, and over-long names are refused."""
    if not name or len(name) > MAX_FUNCTION or "\0" in name:
        raise UsageError(f"bad function name {name[:80]!r}: 1-{MAX_FUNCTION} characters without NUL")
    return name


def check_handle(handle: str) -> str:
    """A job handle as gearmand makes them ('H:host:42'): printable ASCII, at most 64 characters."""
    if not re.fullmatch(rf"[!-~]{{1,{MAX_HANDLE}}}", handle):
        raise UsageError(f"bad job handle {handle[:80]!r} ({len(handle)} characters): handles are "
                         f"1-{MAX_HANDLE} printable ASCII characters without spaces, like H:host:42")
    return handle


def check_host(ip: str) -> str:
    """An IP address (IPv6 bare or bracketed, '[::1]') in the form the client ids carry."""
    try:
        return str(ipaddress.ip_address(ip[1:-1] if ip.startswith("[") and ip.endswith("]") else ip))
    except ValueError:
        raise UsageError(f"--host: expected an IP address, got {ip[:80]!r}") from None


def check_worker_name(name: str) -> str:
    if len(name) > 255 or not name.isprintable():
        raise UsageError(f"--name: bad worker name {name[:80]!r}")
    return check_name(name)
