"""Targeted function names: ``TASK@host:HOST`` and ``TASK@label:LABEL`` (docs/sender.md, "Fleet commands").

A worker registers, for each task it serves, the task itself plus one function per its host
and per label, so gearmand routes a targeted job natively: ``shell@host:web3`` reaches only
the workers of host web3, ``shell@label:db`` any worker labelled db. The names travel
through gearmand's ``workers`` list, which anyone who reaches a server can fill, so
``parse`` and ``identity_of`` accept only names built from the checked charset.
"""

from __future__ import annotations

import functools
import re
import socket
from typing import Iterable

HOST_SEP = "@host:"
LABEL_SEP = "@label:"
MAX_HOST = 253  # a DNS name's limit
MAX_LABEL = 63
# Letters, digits, '.', '-', '_': nothing that splits a gearmand admin line (space, newline,
# NUL), ends a target (':', '@') or fools a terminal.
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class TargetError(ValueError):
    """A host or label name that may not be used; the message says why."""


def check_host(host: str, what: str = "host") -> str:
    if not isinstance(host, str) or not host or len(host) > MAX_HOST or not _HOST.fullmatch(host):
        raise TargetError(f"{what} {str(host)[:80]!r} must be 1-{MAX_HOST} characters of letters, digits, "
                          "'.', '-' and '_', starting with a letter or digit")
    return host


def check_label(label: str, what: str = "label") -> str:
    if not isinstance(label, str) or not label or len(label) > MAX_LABEL or not _LABEL.fullmatch(label):
        raise TargetError(f"{what} {str(label)[:80]!r} must be 1-{MAX_LABEL} characters of letters, digits, "
                          "'.', '-' and '_', starting with a letter or digit")
    return label


@functools.lru_cache(maxsize=1)
def machine_host() -> str:
    """This machine's name for targeted jobs when worker.host is not set: the FQDN, or the host
    name when the FQDN is 'localhost' (an /etc/hosts that maps the name to 127.0.0.1 first) or
    outside the charset; "" when neither will do. Looked up once."""
    for candidate in (socket.getfqdn(), socket.gethostname()):
        if candidate.split(".")[0].lower() in ("localhost", "localhost6", "ip6-localhost"):
            continue
        try:
            return check_host(candidate)
        except TargetError:
            continue
    return ""


def host_function(task: str, host: str) -> str:
    return f"{task}{HOST_SEP}{host}"


def label_function(task: str, label: str) -> str:
    return f"{task}{LABEL_SEP}{label}"


def expand(tasks: Iterable[str], host: str = "", labels: Iterable[str] = ()) -> list[str]:
    """The functions a worker registers for ``tasks``: each task, then its host and label forms."""
    labels = list(labels)
    out: list[str] = []
    for task in tasks:
        out.append(task)
        if host:
            out.append(host_function(task, host))
        out.extend(label_function(task, label) for label in labels)
    return out


def parse(function: str) -> tuple[str, str, str] | None:
    """'shell@host:web3' -> ('shell', 'host', 'web3'); 'shell@label:db' -> ('shell', 'label', 'db');
    None for a plain task name or a target whose name is not a valid host or label."""
    for sep, kind, check in ((HOST_SEP, "host", check_host), (LABEL_SEP, "label", check_label)):
        task, found, name = function.rpartition(sep)
        if found and task:
            try:
                check(name)
            except TargetError:
                return None
            return task, kind, name
    return None


def base_task(function: str) -> str:
    """The task a (possibly targeted) function name runs: 'shell@label:db' -> 'shell'."""
    parsed = parse(function)
    return parsed[0] if parsed else function


def identity_of(functions: Iterable[str]) -> tuple[str | None, list[str]]:
    """(host, sorted labels) a worker connection announces through its registered functions;
    host None when it registers none (or, from a hostile peer, more than one)."""
    hosts: set[str] = set()
    labels: set[str] = set()
    for f in functions:
        parsed = parse(f)
        if parsed is None:
            continue
        (hosts if parsed[1] == "host" else labels).add(parsed[2])
    return (next(iter(hosts)) if len(hosts) == 1 else None), sorted(labels)


def aliases(function: str, labels: Iterable[str]) -> tuple[str, ...]:
    """The label forms of a host-targeted job, for a worker of that host with ``labels``:
    'shell@host:db1' with labels [db] -> ('shell@label:db',). Only gearmand's routing makes
    the job ours, so only the worker's own (configured) labels are named; () for other names."""
    parsed = parse(function)
    if parsed is None or parsed[1] != "host":
        return ()
    return tuple(label_function(parsed[0], label) for label in labels)
