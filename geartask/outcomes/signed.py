"""A signed job's original bytes, as its outcome record keeps them (docs/outcomes.md, "Signed jobs").

A worker records, for a failed job that came signed, ``signed`` (the signature line as it
arrived, ``\\x1egeartask-sig/1 {...}\\n``), ``envelope`` (the geartask envelope line, if any)
and ``data`` (the user's bytes); ``signer`` names who signed it. ``original`` gives back the
exact bytes the signature covers, so ``failed requeue`` can resend the job with its original
signature (``geartask.trust.signing.requeue_job``) and a worker verifies it again.
"""

from __future__ import annotations

from ..trust.signing import SignatureFormatError, Stamp, split
from .record import decode_bytes


class NotResendable(ValueError):
    """The record has no verifiable original signature; the message says why."""


def original(record: dict) -> tuple[Stamp, bytes]:
    """(original stamp, payload: envelope + data) of a failed signed job's record.

    NotResendable when the record keeps no signature line (an unsigned job, or a worker
    without trust), when its data was cut (the signed bytes are gone), or when the line
    can't be read. Whether the stamp verifies is the requeuer's (and the worker's) check.
    """
    line = record.get("signed")
    if not isinstance(line, str) or not line:
        raise NotResendable("no original signature kept with this outcome")
    if record.get("data_cut"):
        raise NotResendable("its data was cut to outcomes.max_result: the signed bytes are gone")
    data = decode_bytes(record, "data") or b""
    envelope = record.get("envelope") or ""
    try:
        sig, rest = split(line.encode("ascii") + envelope.encode("ascii") + data)
    except (UnicodeEncodeError, SignatureFormatError) as e:
        raise NotResendable(f"its signature line can't be read: {e}") from None
    if sig is None:
        raise NotResendable("its signature line can't be read")
    return sig.stamp, rest
