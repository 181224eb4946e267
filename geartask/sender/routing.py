"""Which server a job goes to: rendezvous hashing of its unique key (docs/sender.md)."""

from __future__ import annotations

import hashlib
from typing import Any

__all__ = ["rendezvous", "server_hash", "score"]


def server_hash(address: str) -> Any:
    """The hash state of one server ("host:port"); ``score`` finishes it with a unique key.
    Computed once per server, so ranking a job costs one copy and one update per server."""
    return hashlib.blake2b(address.encode() + b"\0", digest_size=8)


def score(prefix: Any, unique: str) -> bytes:
    """blake2b(server, unique): the higher, the earlier the server in the job's order."""
    h = prefix.copy()
    h.update(unique.encode("utf-8"))
    return h.digest()


def rendezvous(unique: str, servers: list[str]) -> list[str]:
    """``servers`` ("host:port") in the order a job with this unique key tries them: highest
    blake2b(server, unique) first.

    The order is the same in every process and run that names the servers the same way, so
    a resubmitted unique key reaches the server holding the original; removing a server
    moves only the keys it had.
    """
    return sorted(servers, key=lambda s: score(server_hash(s), unique), reverse=True)
