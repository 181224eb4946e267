"""The signed forms: a signature line in front of a job's payload (or a message's body).

A signed job on the wire (``docs/outcomes.md``, "Signed jobs")::

    \\x1e geartask-sig/1 SP {"key":"ed25519:...","t":1765000000,"sig":"BASE64"} LF <payload>

where <payload> is exactly what an unsigned job would carry: the geartask envelope (if any)
and the user's bytes. The signature is Ed25519 over a canonical byte string made of
netstrings (``LEN:BYTES,``, LEN in ASCII decimal), so no field can bleed into the next::

    job:     ns("geartask-sig/1") ns("job") ns(FUNCTION) ns(UNIQUE) ns(T) ns(SHA256HEX(payload))
    group:   ns("geartask-sig/1") ns("batch") ns(T) ns(ROOT_HEX)
    requeue: ns("geartask-sig/1") ns("requeue") ns(FUNCTION) ns(UNIQUE) ns(ORIGINAL_SIG) ns(OF) ns(T) [ns(MI)]
    message: ns("geartask-sig/1") ns(PURPOSE) ns(T) ns(SHA256HEX(body))

FUNCTION and UNIQUE are UTF-8, T the signing time in whole Unix seconds (ASCII decimal),
ORIGINAL_SIG the job signature's base64 text, OF the requeued outcome's id. A requeued job
keeps the original line's ``key``, ``t`` and ``sig`` and adds ``"rq":{"key","t","sig","of"}``,
the requeue note signed by whoever requeued it: the payload is never re-signed, so a requeue
can't launder bytes nobody trusted. Messages (control commands, outcome reports, query
answers) carry the same line in front of their body; the purpose word is not in the line but
in what is signed, so a signed report can't be replayed as a control command.

Jobs submitted together are signed as a group (``sign_jobs``): one signature over the root of
a Merkle tree whose leaves are the jobs' ``job`` bytes, and in each job's line its position
``"mi"`` and the sibling hashes ``"mp"`` that lead from its leaf to that root::

    leaf  = sha256(0x00 || job_bytes)      node = sha256(0x01 || left || right)
    empty = sha256(0x02)                    (positions past the last job, up to 2**depth)

A worker recomputes the root from the job itself, so the one signature covers every job of
the group; a root whose signature verified once is remembered (``_verified``), so a worker
verifies one signature per group, not one per job. Only a verified root is remembered.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import threading
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import sodium
from .keys import public_text

SIG_MAGIC = b"\x1egeartask-sig/1 "
VERSION = b"geartask-sig/1"
MAX_LINE = 1024  # a signature line is about 170 bytes; 2 stamps with ids stay far below this
MESSAGE_PURPOSES = ("control", "report", "answer")
GROUP = 32  # jobs under one signature (sign_jobs): a path of 5 hashes, about 220 bytes per line
MAX_DEPTH = 16  # the longest path a line may carry ("mp": 16 hashes)
VERIFIED_ROOTS = 4096  # verified group roots remembered, per process
_LEAF, _NODE, _EMPTY = b"\x00", b"\x01", hashlib.sha256(b"\x02").digest()


class SignatureFormatError(ValueError):
    """A payload starts like a signature line but is not a valid one."""


@dataclass(frozen=True)
class Stamp:
    """One signature: the signer's public key text, the signing time, the base64 signature;
    for a job signed in a group, its position ``mi`` and its path ``mp`` (the sibling hashes,
    leaf level first, as base64 text), both None otherwise."""

    key: str
    t: int
    sig: str
    mi: int | None = None
    mp: str | None = None

    def to_dict(self) -> dict:
        if self.mp is None:
            return {"key": self.key, "t": self.t, "sig": self.sig}
        return {"key": self.key, "t": self.t, "sig": self.sig, "mi": self.mi, "mp": self.mp}


@dataclass(frozen=True)
class RequeueNote:
    stamp: Stamp
    of: str  # the id of the failed outcome this job re-sends


@dataclass(frozen=True)
class SigLine:
    """What a signature line holds: the job's (or message's) stamp and, for a requeued job,
    the requeue note."""

    stamp: Stamp
    requeue: RequeueNote | None = None

    def encode(self) -> bytes:
        fields: dict = self.stamp.to_dict()
        if self.requeue is not None:
            fields["rq"] = {**self.requeue.stamp.to_dict(), "of": self.requeue.of}
        return SIG_MAGIC + json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode("ascii") + b"\n"


def _ns(data: bytes | str) -> bytes:
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    return b"%d:%s," % (len(data), data)


def _text(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


_JOB_HEAD = _ns(VERSION) + _ns(b"job")


def job_bytes(function: bytes | str, unique: bytes | str, payload: bytes, t: int) -> bytes:
    """The canonical bytes a job signature covers."""
    f, u, when = _text(function), _text(unique), b"%d" % int(t)
    return b"%s%d:%s,%d:%s,%d:%s,64:%s," % (_JOB_HEAD, len(f), f, len(u), u, len(when), when,
                                          hashlib.sha256(payload).hexdigest().encode("ascii"))


def batch_bytes(root: bytes, t: int) -> bytes:
    """The canonical bytes a group signature covers: the tree's root (32 bytes) and the time."""
    return b"".join((_ns(VERSION), _ns(b"batch"), _ns(str(int(t))), _ns(root.hex())))


def leaf_hash(function: bytes | str, unique: bytes | str, payload: bytes, t: int) -> bytes:
    """A job's leaf in its group's tree."""
    return hashlib.sha256(_LEAF + job_bytes(function, unique, payload, t)).digest()


def _tree(leaves: list[bytes]) -> tuple[bytes, list[bytes]]:
    """(root, each leaf's path): a tree of depth ceil(log2(len)), empty positions filled."""
    depth = (len(leaves) - 1).bit_length()
    level = leaves + [_EMPTY] * ((1 << depth) - len(leaves))
    paths: list[list[bytes]] = [[] for _ in leaves]
    for _ in range(depth):
        for i, path in enumerate(paths):
            path.append(level[(i >> len(path)) ^ 1])
        level = [hashlib.sha256(_NODE + level[i] + level[i + 1]).digest() for i in range(0, len(level), 2)]
    return level[0], [b"".join(path) for path in paths]


def path_root(leaf: bytes, index: int, path: bytes) -> bytes:
    """The root that ``leaf`` at ``index`` with ``path`` (32-byte siblings, leaf level first)
    leads to; the index's bits say on which side each sibling is."""
    node = leaf
    for at in range(0, len(path), 32):
        sibling = path[at:at + 32]
        node = hashlib.sha256(_NODE + (sibling + node if index & 1 else node + sibling)).digest()
        index >>= 1
    return node


def requeue_bytes(function: bytes | str, unique: bytes | str, original_sig: str, of: str, t: int,
                  index: int | None = None) -> bytes:
    """The canonical bytes a requeue note's signature covers. ``index``: the original's ``mi``
    when it was signed in a group, whose jobs share one signature: with it, the note fits that
    one job of the group only, even one with the same function and unique key."""
    parts = [_ns(VERSION), _ns(b"requeue"), _ns(_text(function)), _ns(_text(unique)), _ns(original_sig), _ns(of),
             _ns(str(int(t)))]
    if index is not None:
        parts.append(_ns(str(int(index))))
    return b"".join(parts)


def message_bytes(purpose: str, body: bytes, t: int) -> bytes:
    """The canonical bytes a message signature covers."""
    return b"".join((_ns(VERSION), _ns(purpose), _ns(str(int(t))), _ns(hashlib.sha256(body).hexdigest())))


_public_texts: dict[int, tuple[Ed25519PrivateKey, str]] = {}  # id -> (the key, kept alive; its public text)


def _public_text(key: Ed25519PrivateKey) -> str:
    known = _public_texts.get(id(key))
    if known is not None and known[0] is key:
        return known[1]
    text = public_text(key)
    if len(_public_texts) >= 256:
        _public_texts.clear()
    _public_texts[id(key)] = (key, text)
    return text


def _stamp(data: bytes, key: Ed25519PrivateKey, t: int) -> Stamp:
    sig = sodium.sign(key, data)  # libsodium where installed: same bytes, faster, GIL released
    if sig is None:
        sig = key.sign(data)
    return Stamp(_public_text(key), int(t), base64.b64encode(sig).decode("ascii"))


def _now(t: float | None) -> int:
    return int(time.time() if t is None else t)


def sign_job(function: bytes | str, unique: bytes | str, payload: bytes, key: Ed25519PrivateKey,
             t: float | None = None) -> bytes:
    """``payload`` (envelope included) with a signature line in front: what to submit.
    ``t`` is the signing time (default now), whole seconds."""
    t = _now(t)
    return SigLine(_stamp(job_bytes(function, unique, payload, t), key, t)).encode() + payload


def sign_jobs(items: list[tuple[bytes | str, bytes | str, bytes]], key: Ed25519PrivateKey,
              t: float | None = None) -> list[bytes]:
    """Each (function, unique, payload) of ``items`` with a signature line in front, in order:
    one signature per GROUP jobs (a Merkle root), so the sender signs and a worker verifies
    once per group. A group of one is signed as ``sign_job`` signs it."""
    t = _now(t)
    out: list[bytes] = []
    for start in range(0, len(items), GROUP):
        group = items[start:start + GROUP]
        if len(group) == 1:
            function, unique, payload = group[0]
            out.append(SigLine(_stamp(job_bytes(function, unique, payload, t), key, t)).encode() + payload)
            continue
        root, paths = _tree([leaf_hash(f, u, p, t) for f, u, p in group])
        stamp = _stamp(batch_bytes(root, t), key, t)
        # SigLine(Stamp(..., i, mp)).encode() for each job, the shared part made once (key
        # text and sig are base64: JSON writes them as they are).
        head = SigLine(stamp).encode()[:-2] + b',"mi":'
        out.extend(b'%s%d,"mp":"%s"}\n%s' % (head, i, base64.b64encode(path), payload)
                   for i, ((_, _, payload), path) in enumerate(zip(group, paths, strict=True)))
    return out


def requeue_job(function: bytes | str, unique: bytes | str, payload: bytes, original: Stamp, of: str,
                key: Ed25519PrivateKey, t: float | None = None) -> bytes:
    """A failed job's original payload and original stamp, with a requeue note signed by ``key``:
    what ``failed requeue`` submits (same function, same unique key)."""
    t = _now(t)
    note = RequeueNote(_stamp(requeue_bytes(function, unique, original.sig, of, t, original.mi), key, t), of)
    return SigLine(original, note).encode() + payload


def sign_message(purpose: str, body: bytes, key: Ed25519PrivateKey, t: float | None = None) -> bytes:
    """``body`` with a signature line for ``purpose`` (control, report or answer)."""
    if purpose not in MESSAGE_PURPOSES:
        raise ValueError(f"purpose must be one of {', '.join(MESSAGE_PURPOSES)}, got {purpose!r}")
    t = _now(t)
    return SigLine(_stamp(message_bytes(purpose, body, t), key, t)).encode() + body


def split(raw: bytes) -> tuple[SigLine | None, bytes]:
    """(signature line or None, the rest). Raises SignatureFormatError for a line that starts
    like one of ours but can't be read: such a job is refused as "bad signature"."""
    if not raw.startswith(SIG_MAGIC):
        return None, raw
    end = raw.find(b"\n", len(SIG_MAGIC), len(SIG_MAGIC) + MAX_LINE + 1)
    if end < 0:
        raise SignatureFormatError(f"signature line has no end within {MAX_LINE} bytes")
    try:
        fields = json.loads(raw[len(SIG_MAGIC):end].decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise SignatureFormatError("signature line is not a one-line JSON object") from None
    if not isinstance(fields, dict):
        raise SignatureFormatError("signature line is not a JSON object")
    stamp = _read_stamp(fields, "")
    if "mi" in fields or "mp" in fields:
        stamp = _read_path(fields, stamp)
    note = None
    if "rq" in fields:
        rq = fields["rq"]
        if not isinstance(rq, dict):
            raise SignatureFormatError("signature line 'rq' is not an object")
        of = rq.get("of")
        if not isinstance(of, str) or not 0 < len(of) <= 64:
            raise SignatureFormatError("signature line 'rq.of' must be a string of 1-64 characters")
        note = RequeueNote(_read_stamp(rq, "rq."), of)
    return SigLine(stamp, note), raw[end + 1:]


def _read_stamp(fields: dict, prefix: str) -> Stamp:
    key, t, sig = fields.get("key"), fields.get("t"), fields.get("sig")
    if not isinstance(key, str) or len(key) > 100:
        raise SignatureFormatError(f"signature line '{prefix}key' must be 'ed25519:BASE64'")
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < 2 ** 53:
        raise SignatureFormatError(f"signature line '{prefix}t' must be whole Unix seconds")
    if not isinstance(sig, str) or len(sig) > 200:
        raise SignatureFormatError(f"signature line '{prefix}sig' must be base64 text")
    return Stamp(key, t, sig)


def _read_path(fields: dict, stamp: Stamp) -> Stamp:
    mi, mp = fields.get("mi"), fields.get("mp")
    if not isinstance(mp, str) or not 0 < len(mp) <= 4 * ((MAX_DEPTH * 32 + 2) // 3):
        raise SignatureFormatError(f"signature line 'mp' must be base64 of 1-{MAX_DEPTH} 32-byte hashes")
    try:
        path = base64.b64decode(mp, validate=True)
    except (binascii.Error, ValueError):
        path = b""
    depth = len(path) // 32
    if len(path) % 32 or not 0 < depth <= MAX_DEPTH or base64.b64encode(path).decode("ascii") != mp:
        raise SignatureFormatError(f"signature line 'mp' must be base64 of 1-{MAX_DEPTH} 32-byte hashes")
    if isinstance(mi, bool) or not isinstance(mi, int) or not 0 <= mi < 1 << depth:
        raise SignatureFormatError(f"signature line 'mi' must be a position below 2**{depth}")
    return Stamp(stamp.key, stamp.t, stamp.sig, mi, mp)


class VerifyStats:
    """Counts, per process: Ed25519 verifications run (``verified``) and group jobs accepted
    from the verified-root cache without one (``cached``)."""

    verified = 0
    cached = 0
    _lock = threading.Lock()

    @classmethod
    def count(cls, verified: int = 0, cached: int = 0) -> None:
        with cls._lock:  # += is not atomic between threads
            cls.verified += verified
            cls.cached += cached


_verified: dict[tuple[bytes, int, str, bytes], bool] = {}  # (public key, t, sig, root): verified
_verifying: dict[tuple[bytes, int, str, bytes], threading.Lock] = {}  # roots being verified now
_verifying_lock = threading.Lock()


def check_job(public: Ed25519PublicKey, stamp: Stamp, function: bytes | str, unique: bytes | str,
              payload: bytes) -> bool:
    """Whether ``stamp`` is ``public``'s signature of this job: alone (``job_bytes``) or, with
    a path, in a group whose root the path leads to (``batch_bytes``). A group root whose
    signature verified is remembered, so its other jobs cost a few hashes; a failure never is,
    so a forged job can't spoil a good group."""
    if stamp.mp is None and stamp.mi is None:
        return check(public, stamp, job_bytes(function, unique, payload, stamp.t))
    try:
        path = base64.b64decode(stamp.mp or "", validate=True)  # split checked it; a Stamp made here may not be
    except (binascii.Error, ValueError):
        return False
    mi = stamp.mi
    if not path or len(path) % 32 or len(path) > 32 * MAX_DEPTH or not isinstance(mi, int) \
            or not 0 <= mi < 1 << (len(path) // 32):
        return False
    root = path_root(leaf_hash(function, unique, payload, stamp.t), mi, path)
    known = (public.public_bytes_raw(), stamp.t, stamp.sig, root)
    if known in _verified:
        VerifyStats.count(cached=1)
        return True
    # A worker's threads take a group's first jobs at the same moment: one verifies, the
    # others wait for its answer instead of verifying the same root again.
    with _verifying_lock:
        lock = _verifying.setdefault(known, threading.Lock())
    try:
        with lock:
            if known in _verified:
                VerifyStats.count(cached=1)
                return True
            if not check(public, stamp, batch_bytes(root, stamp.t)):
                return False
            if len(_verified) >= VERIFIED_ROOTS:
                _verified.clear()
            _verified[known] = True
            return True
    finally:
        with _verifying_lock:
            if _verifying.get(known) is lock:
                del _verifying[known]


def check(public: Ed25519PublicKey, stamp: Stamp, data: bytes) -> bool:
    """Whether ``stamp.sig`` is ``public``'s signature of ``data``."""
    try:
        raw = base64.b64decode(stamp.sig, validate=True)
    except (binascii.Error, ValueError):
        return False
    if len(raw) != 64:
        return False
    VerifyStats.count(verified=1)
    fast = sodium.verify(public, raw, data)  # never accepts what OpenSSL would refuse (sodium.py)
    if fast is not None:
        return fast
    try:
        public.verify(raw, data)
    except InvalidSignature:
        return False
    return True
