"""What a worker checks before it runs a job or obeys a control job (docs/security.md, "Trust").

Built once per process from ``security.*``. Every worker strips a leading signature line,
so a signed job never reaches a task with the line in its data; with
``security.require_signed`` a job runs only when ``policy.decide`` allows it, and a control
job is obeyed only when it is signed for ``control``. ``key`` (``security.key``) signs the
outcome jobs the worker sends (purpose ``report``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..targets import aliases
from ..trust import policy, signing
from ..trust.keys import signing_key
from ..trust.signing import SIG_MAGIC

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["WorkerTrust", "SIG_MAGIC"]


class WorkerTrust:
    """The process's trust: whom it believes (``trust``), whether jobs must be signed, and its
    own signing key (None without ``security.key``)."""

    def __init__(self, config: Config):
        sec = config.security
        self.require_signed = bool(sec.require_signed)
        self.max_age = float(sec.max_job_age)
        self.trust = policy.trust_of(config) if sec.trust else policy.Trust()
        self.key = signing_key(config)
        # Jobs are checked (decide) only when someone is trusted or signatures are required;
        # else only a signature line is stripped, and only from a job that has one.
        self.checks = self.require_signed or len(self.trust) > 0
        self.labels = tuple(config.worker.labels)  # a job for our host is also one for our labels

    def decide(self, function: str, unique: str, raw: bytes) -> policy.Decision:
        """The policy's decision on one job (verifies at most once per job)."""
        return policy.decide(function, unique, raw, self.trust, time.time(),
                             require_signed=self.require_signed, max_age=self.max_age,
                             also=aliases(function, self.labels))

    def control(self, raw: bytes) -> tuple[str | None, bytes]:
        """(signer, body) of a control job: verified for ``control`` when signatures are
        required (policy.Refused otherwise), else the body with any signature line stripped."""
        if self.require_signed:
            return policy.verify_message("control", raw, self.trust, time.time(), max_age=self.max_age)
        if raw.startswith(SIG_MAGIC):
            try:
                return None, signing.split(raw)[1]
            except signing.SignatureFormatError:
                return None, raw  # not JSON either: parse_command says what is wrong
        return None, raw

    def sign_report(self, payload: bytes) -> bytes:
        """An outcome job's payload, signed for ``report`` when this process has a key."""
        if self.key is None:
            return payload
        return signing.sign_message("report", payload, self.key)


class Signed:
    """What a worker keeps of a signed (or refused) job for its outcome: the policy's decision
    and the original signature line's bytes, so ``failed requeue`` can resend the job with
    its original signature (geartask.outcomes.signed)."""

    __slots__ = ("decision", "line", "payload")

    def __init__(self, decision: policy.Decision, line: bytes, payload: bytes):
        self.decision, self.line, self.payload = decision, line, payload

    def fields(self, data: bytes, failed: bool) -> dict:
        """The record fields: ``signer``, and for a failed job ``signed`` (the line) and
        ``envelope`` (the envelope in front of ``data``, the job's bytes without it), when
        they are ASCII as every valid one is."""
        out: dict = {}
        if self.decision.signer is not None:
            out["signer"] = self.decision.signer
        if failed and self.line:
            payload = self.payload
            envelope = payload[:len(payload) - len(data)] if payload.endswith(data) else b""
            try:
                out["signed"] = self.line.decode("ascii")
                if envelope:
                    out["envelope"] = envelope.decode("ascii")
            except UnicodeDecodeError:
                out.pop("signed", None)
        return out
