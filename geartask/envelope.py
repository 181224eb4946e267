"""The job envelope: geartask's per-job options, carried in front of the user's payload.

Gearman gives a job only a function name, a unique key and one opaque payload, so options
that the worker must know (is this a background job? how many retries?) travel in front of
the payload, leaving the user's bytes untouched::

    \\x1e geartask/1 SP {"bg":true,"retries":2,...} LF <the user's payload, as it is>

(one ASCII RS byte, then ``geartask/1``, a space, a one-line JSON object, a newline, the
payload). Any client in any language can build it; a job without it (the C ``gearman``
tool, other clients) is an ordinary job with the worker's defaults. Known fields, all
optional: ``bg`` (bool: background job), ``retries`` (int >= 0), ``at`` (submission time,
Unix seconds), ``host`` (the sending host), ``prio`` (low|normal|high), ``requeue_of``
(the id of the failed outcome this job re-sends). Unknown fields are ignored, so newer
senders can add some. A signed job carries a signature line in front of the envelope
(``geartask/trust/signing.py``): strip it with ``signing.split`` before unwrapping.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAGIC = b"\x1egeartask/1 "
MAX_HEADER = 4096  # a header longer than this is not one of ours


class EnvelopeError(ValueError):
    """Raised for a payload that starts like an envelope but is not a valid one."""


def header(**options: Any) -> bytes:
    """The envelope that goes in front of a payload (None values are left out): build it once
    and reuse it for every job with the same options."""
    fields = {k: v for k, v in options.items() if v is not None}
    return MAGIC + json.dumps(fields, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii") + b"\n"


def wrap(payload: bytes, **options: Any) -> bytes:
    """The payload with an envelope holding ``options``."""
    return header(**options) + payload


def unwrap(raw: bytes) -> tuple[dict | None, bytes]:
    """(options, payload): options None for a job without an envelope.

    Raises EnvelopeError (naming the field) for a malformed one: a job that says it is
    geartask's but can't be read must fail clearly, not run with guessed options.
    """
    if not raw.startswith(MAGIC):
        return None, raw
    end = raw.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER + 1)
    if end < 0:
        raise EnvelopeError(f"envelope header has no end within {MAX_HEADER} bytes")
    try:
        header = json.loads(raw[len(MAGIC):end].decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise EnvelopeError("envelope header is not a one-line JSON object") from None
    if not isinstance(header, dict):
        raise EnvelopeError(f"envelope header must be a JSON object, got {type(header).__name__}")
    _check(header)
    return header, raw[end + 1:]


def _check(h: dict) -> None:
    if "bg" in h and not isinstance(h["bg"], bool):
        raise EnvelopeError(f"envelope 'bg' must be true or false, got {h['bg']!r}")
    if "retries" in h:
        r = h["retries"]
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise EnvelopeError(f"envelope 'retries' must be a whole number >= 0, got {r!r}")
    if "at" in h:
        at = h["at"]
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at):
            raise EnvelopeError(f"envelope 'at' must be a finite number, got {at!r}")
    for key, limit in (("host", 255), ("requeue_of", 64)):
        if key in h and (not isinstance(h[key], str) or len(h[key]) > limit):
            raise EnvelopeError(f"envelope {key!r} must be a string of at most {limit} characters")
    if "prio" in h and h["prio"] not in ("low", "normal", "high"):
        raise EnvelopeError(f"envelope 'prio' must be low, normal or high, got {h['prio']!r}")


_CACHE: dict[bytes, dict] = {}
_CACHE_SIZE = 256  # distinct headers remembered: a sender builds one per set of options per call


def unwrap_cached(raw: bytes) -> tuple[dict | None, bytes]:
    """unwrap(), remembering recent headers: a worker sees the same few over and over, and
    parsing one per job would be a JSON decode on every no-op job's path."""
    if not raw.startswith(MAGIC):
        return None, raw
    end = raw.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER + 1)
    head = raw[:end + 1] if end >= 0 else b""
    options = _CACHE.get(head)
    if options is None:
        options, _ = unwrap(raw)  # raises EnvelopeError for a bad one: not cached
        if options is None:  # not reached: raw starts with MAGIC, so unwrap read a header or raised
            return None, raw
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.clear()
        _CACHE[head] = options
    return dict(options), raw[end + 1:]
