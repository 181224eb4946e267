"""A signed job's original bytes, as its outcome record keeps them (docs/outcomes.md, "Signed jobs").

A worker records, for a failed job that came signed, ``signed`` (the signature line as it
arrived, ``\\x1egeartask-sig/1 {...}\\n``), ``envelope`` (the geartask envelope line, if any)
and ``data`` (the user's bytes); ``signer`` names who signed it. ``original`` gives back the
exact bytes the signature covers; ``requeue_payload`` verifies them again and builds what
``failed requeue`` submits (``geartask.trust.signing.requeue_job``), which a worker verifies again.
"""

from __future__ import annotations

from typing import Any

from ..trust import policy
from ..trust.signing import SignatureFormatError, SigLine, Stamp, requeue_job, split
from .record import decode_bytes, resend_function


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


def requeue_payload(record: dict, key: Any, trust: policy.Trust, *, t: float | None = None) -> bytes:
    """What ``failed requeue`` submits for a failed signed job's record (same task, same unique
    key): its original signature line and payload, with a requeue note naming the record,
    signed by ``key`` (the operator's ``security.key``).

    The original signature is verified again against today's ``trust`` (known signer, valid
    signature, a signer who may still run the task; its age does not matter): NotResendable
    with the reason otherwise, so a forged record is never sent under the operator's name.
    """
    stamp, payload = original(record)
    if key is None:
        raise NotResendable("no security.key to sign the requeue note with")
    task, unique = resend_function(record), record.get("unique") or ""  # a targeted job: its full name, signed
    check = policy.decide(task, unique, SigLine(stamp).encode() + payload, trust, float(stamp.t))
    if not check.allowed:
        raise NotResendable(f"its original signature does not verify: {check.reason}")
    return requeue_job(task, unique, payload, stamp, record["id"], key, t)
