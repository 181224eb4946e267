"""Who may do what: the ``security.trust`` list, and the decisions a worker, a collector and
an outcome client make with it.

``may`` holds task-name patterns and three words. A pattern is a task name in which ``*``
stands for any run of characters (``shell``, ``reports.*``, ``*``); a pattern without ``@``
covers a task and every targeted form of it (``shell`` covers ``shell@label:db``), a pattern
with ``@`` covers only the targeted names it matches. The words ``control`` (shutdown, stop,
ping), ``report`` (job outcomes) and ``answer`` (outcome queries) are never covered by a
pattern, ``*`` included: running jobs and speaking for the fleet are separate grants.

A job is refused with exactly one of these reasons: ``unsigned``, ``unknown signer``,
``bad signature``, ``signer NAME may not run TASK``, ``too old``. Messages use the same
reasons, with ``signer NAME may not PURPOSE``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..display import printable
from ..errors import ConfigError, UsageError
from . import signing
from .keys import parse_public, public_text
from .signing import SignatureFormatError, SigLine

if TYPE_CHECKING:
    from ..config import Config

WORDS = ("control", "report", "answer")
DEFAULT_MAX_AGE = 86400.0  # security.max_job_age: one day
FUTURE_SKEW = 300.0  # seconds a signing time may be ahead of our clock (clocks differ)
MAX_NAME = 64

UNSIGNED = "unsigned"
UNKNOWN = "unknown signer"
BAD = "bad signature"
TOO_OLD = "too old"


@dataclass(frozen=True)
class Signer:
    name: str
    public_key: str
    may: tuple[str, ...]
    key: Ed25519PublicKey = field(compare=False, repr=False)

    def may_run(self, function: str) -> bool:
        return any(p not in WORDS and _pattern_covers(p, function) for p in self.may)

    def may_do(self, word: str) -> bool:
        return word in self.may


@lru_cache(maxsize=1024)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")), re.DOTALL)


def _pattern_covers(pattern: str, function: str) -> bool:
    if "@" not in pattern:
        function = function.split("@", 1)[0]  # 'shell' covers 'shell@label:db' too
    return _compiled(pattern).fullmatch(function) is not None


class Trust:
    """The trusted signers, looked up by public key. One name may have several keys (a key
    being rotated); one key has exactly one name."""

    def __init__(self, signers: list[Signer] | None = None):
        self.by_key: dict[str, Signer] = {}
        for s in signers or []:
            self.by_key[s.public_key] = s

    @classmethod
    def from_config(cls, entries: list, path: str | None = None, key: str = "security.trust") -> "Trust":
        """Build from the config's list of {name, public_key, may}; ConfigError names the entry."""
        if not isinstance(entries, list):
            raise ConfigError(f"expected a list of {{name, public_key, may}}, got {entries!r}", path, key)
        signers = []
        seen: dict[str, str] = {}
        for i, entry in enumerate(entries):
            where = f"{key}[{i}]"
            if not isinstance(entry, dict):
                raise ConfigError(f"expected a mapping with name, public_key and may, got {entry!r}", path, where)
            unknown = set(entry) - {"name", "public_key", "may"}
            if unknown:
                raise ConfigError("unknown key (known here: may, name, public_key)", path, f"{where}.{sorted(unknown)[0]}")
            name = entry.get("name")
            if not isinstance(name, str) or not name or len(name) > MAX_NAME or not name.isprintable() \
                    or any(c.isspace() for c in name):
                raise ConfigError(f"expected a name of 1-{MAX_NAME} printable characters without spaces, "
                                  f"got {name!r}", path, f"{where}.name")
            try:
                pub = parse_public(entry.get("public_key"), "public_key")
            except UsageError as e:
                raise ConfigError(str(e).removeprefix("public_key: "), path, f"{where}.public_key") from None
            may = entry.get("may", [])
            if isinstance(may, str):
                may = [may]
            if not isinstance(may, list) or not all(isinstance(m, str) and m and m.isprintable() for m in may):
                raise ConfigError(f"expected a list of task patterns and the words {', '.join(WORDS)}, "
                                  f"got {may!r}", path, f"{where}.may")
            text = public_text(pub)  # normalised: the same key written twice is found
            if text in seen:
                raise ConfigError(f"the same public key is already trusted as {seen[text]!r}; "
                                  "a key has one name", path, f"{where}.public_key")
            seen[text] = name
            signers.append(Signer(name, text, tuple(may), pub))
        return cls(signers)

    def __len__(self) -> int:
        return len(self.by_key)

    def find(self, public_key: str) -> Signer | None:
        return self.by_key.get(public_key)

    def anyone_may(self, word: str) -> bool:
        return any(s.may_do(word) for s in self.by_key.values())


@dataclass(frozen=True)
class Decision:
    """What a worker does with a job: run it (``allowed``) or fail it once with ``reason``.

    ``payload`` is the job without its signature line (the envelope and the user's bytes), to
    be unwrapped as today. ``signer`` is the verified signer's name (None for an unsigned job
    that was allowed because signatures are not required); ``requeue_by``/``requeue_of`` name
    the requeue note's signer and the outcome it re-sends; ``line`` is the signature line, to be
    kept with the outcome so that ``failed requeue`` can resend the job with it.
    """

    allowed: bool
    reason: str | None
    payload: bytes
    signer: str | None = None
    signed_at: int | None = None
    requeue_by: str | None = None
    requeue_of: str | None = None
    line: SigLine | None = None


def _task_text(function: str) -> str:
    text = printable(function)
    return text if len(text) <= 200 else text[:200] + "..."


def _age_ok(t: int, now: float, max_age: float) -> bool:
    return now - max_age <= t <= now + FUTURE_SKEW


def decide(function: bytes | str, unique: bytes | str, raw: bytes, trust: Trust, now: float, *,
           require_signed: bool = True, max_age: float = DEFAULT_MAX_AGE, also: tuple[str, ...] = ()) -> Decision:
    """Whether a worker may run the job ``function``/``unique`` whose payload is ``raw`` (the
    bytes gearmand handed over, signature line included), at time ``now`` (Unix seconds).

    ``also``: other names this worker serves the same job under (a job for ``shell@host:H`` on
    a worker of host H labelled db is also ``shell@label:db``, geartask.targets.aliases): a
    signer who may run any of them may run the job. The signature still covers ``function``.

    Without ``require_signed`` every job is allowed; a valid signature still names its signer.
    """
    if isinstance(function, bytes):
        function = function.decode("utf-8", "surrogateescape")
    try:
        line, payload = signing.split(raw)
    except SignatureFormatError:
        return _refuse(BAD, raw, require_signed)
    if line is None:
        return _refuse(UNSIGNED, payload, require_signed)
    refusal, signer, note_signer = _verify_job(function, unique, payload, line, trust, now, max_age, also)
    if refusal is not None or signer is None:  # _verify_job names a signer whenever it refuses nothing
        return _refuse(refusal or UNKNOWN, payload, require_signed, line)
    return Decision(True, None, payload, signer.name, line.stamp.t,
                    note_signer.name if note_signer else None,
                    line.requeue.of if line.requeue else None, line)


def _refuse(reason: str, payload: bytes, required: bool, line: SigLine | None = None) -> Decision:
    if required:
        return Decision(False, reason, payload, line=line)
    return Decision(True, None, payload, line=line)


def _may_run(signer: Signer, function: str, also: tuple[str, ...]) -> bool:
    return signer.may_run(function) or any(signer.may_run(name) for name in also)


def _verify_job(function: str, unique, payload: bytes, line: SigLine, trust: Trust, now: float,
                max_age: float, also: tuple[str, ...] = ()) -> tuple[str | None, Signer | None, Signer | None]:
    stamp = line.stamp
    signer = trust.find(stamp.key)
    if signer is None:
        return UNKNOWN, None, None
    if not signing.check_job(signer.key, stamp, function, unique, payload):
        return BAD, None, None
    if not _may_run(signer, function, also):
        return f"signer {signer.name} may not run {_task_text(function)}", None, None
    if line.requeue is None:
        return (None, signer, None) if _age_ok(stamp.t, now, max_age) else (TOO_OLD, None, None)
    # A requeue: the original signature holds whatever its age; the note must be fresh and
    # signed by someone who may run the task.
    note = line.requeue
    by = trust.find(note.stamp.key)
    if by is None:
        return UNKNOWN, None, None
    if not signing.check(by.key, note.stamp, signing.requeue_bytes(function, unique, stamp.sig, note.of, note.stamp.t,
                                                                   stamp.mi)):
        return BAD, None, None
    if not _may_run(by, function, also):
        return f"signer {by.name} may not run {_task_text(function)}", None, None
    if not _age_ok(note.stamp.t, now, max_age):
        return TOO_OLD, None, None
    return None, signer, by


class Refused(Exception):
    """A signed message (control, report, answer) that must not be obeyed, stored or believed;
    ``reason`` is one of the refusal reasons."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


def verify_message(purpose: str, raw: bytes, trust: Trust, now: float, *,
                   max_age: float = DEFAULT_MAX_AGE) -> tuple[str, bytes]:
    """(signer name, body) of a message signed for ``purpose`` by a signer whose ``may`` holds
    that word, within ``max_age``; raises Refused otherwise."""
    if purpose not in WORDS:
        raise ValueError(f"purpose must be one of {', '.join(WORDS)}, got {purpose!r}")
    try:
        line, body = signing.split(raw)
    except SignatureFormatError:
        raise Refused(BAD) from None
    if line is None:
        raise Refused(UNSIGNED)
    if line.requeue is not None or line.stamp.mp is not None:
        raise Refused(BAD)  # requeue notes and group paths belong to jobs only
    signer = trust.find(line.stamp.key)
    if signer is None:
        raise Refused(UNKNOWN)
    if not signing.check(signer.key, line.stamp, signing.message_bytes(purpose, body, line.stamp.t)):
        raise Refused(BAD)
    if not signer.may_do(purpose):
        raise Refused(f"signer {signer.name} may not {purpose}")
    if not _age_ok(line.stamp.t, now, max_age):
        raise Refused(TOO_OLD)
    return signer.name, body


def trust_of(config: Config) -> Trust:
    """The config's ``security.trust`` as a Trust (validated again; cheap: a few keys)."""
    return Trust.from_config(config.security.trust, str(config.source) if config.source else None)
