"""Signed query answers and signed outcome reports, both sides (docs/outcomes.md, "Signed outcomes").

The collector signs each query answer for ``answer`` with its ``security.key`` (``sign_answer``):
the signature line goes in front of the JSON answer. Without a key the answer is the bare JSON
of today, readable by every client. A client calls ``open_answer`` on the bytes of
WORK_COMPLETE before it parses them: with ``security.require_signed`` it believes only an
answer signed for ``answer`` by a trusted signer whose ``may`` holds ``answer`` (RogueAnswer
otherwise: a rogue answerer is reported as such, never believed); without, it only strips a
signature line.

``open_report`` is the collector's check of an outcome job (purpose ``report``), with the
same rule. ``sign_request`` signs a query that changes the store, which a collector with
``require_signed`` takes only signed: ``import`` for ``report`` (it stores outcomes too),
``mark_requeued`` and ``purge`` for ``control`` (an operator's acts).
"""

from __future__ import annotations

import time
from typing import Any

from ..trust import policy, signing
from ..trust.signing import SIG_MAGIC


class RogueAnswer(Exception):
    """A query answer not signed for ``answer`` by a trusted signer; ``reason`` says why."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(f"answer refused ({reason}): not from a trusted collector")


def sign_answer(answer: bytes, key: Any) -> bytes:
    """The collector's answer, signed for ``answer`` when it has a key (else unchanged)."""
    return answer if key is None else signing.sign_message("answer", answer, key)


def _open(purpose: str, raw: bytes, trust: policy.Trust | None, require_signed: bool, max_age: float,
          now: float | None) -> tuple[str | None, bytes]:
    if require_signed:  # nobody trusted (None): every answer is refused, as it should be
        return policy.verify_message(purpose, raw, trust if trust is not None else policy.Trust(),
                                     time.time() if now is None else now, max_age=max_age)
    if raw.startswith(SIG_MAGIC):
        try:
            line, body = signing.split(raw)
        except signing.SignatureFormatError:
            return None, raw
        return None, body
    return None, raw


def open_answer(raw: bytes, trust: policy.Trust | None, *, require_signed: bool,
                max_age: float = policy.DEFAULT_MAX_AGE, now: float | None = None) -> tuple[str | None, bytes]:
    """(signer or None, the answer's JSON bytes); RogueAnswer when signatures are required and
    this one is not an ``answer`` by a trusted signer. Build ``trust`` once
    (geartask.trust.policy.trust_of(config))."""
    try:
        return _open("answer", raw, trust, require_signed, max_age, now)
    except policy.Refused as e:
        raise RogueAnswer(e.reason) from None


def open_report(raw: bytes, trust: policy.Trust, *, require_signed: bool,
                max_age: float = policy.DEFAULT_MAX_AGE, now: float | None = None) -> tuple[str | None, bytes]:
    """(signer or None, the outcome job's JSON); policy.Refused when signatures are required
    and it is not a ``report`` by a trusted signer."""
    return _open("report", raw, trust, require_signed, max_age, now)


CHANGING_OPS = {"import": "report", "mark_requeued": "control", "purge": "control"}  # op -> purpose


def sign_request(op: str, request: bytes, key: Any) -> bytes:
    """A query request, signed when ``op`` changes the store (CHANGING_OPS) and there is a key;
    other requests go as they are."""
    purpose = CHANGING_OPS.get(op)
    return request if key is None or purpose is None else signing.sign_message(purpose, request, key)
