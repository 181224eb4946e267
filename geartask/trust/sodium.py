"""Ed25519 through the system's libsodium, where it is installed: the per-job sign and verify.

Why: every signed job (every group of jobs signed together, signing.sign_jobs) costs one
signature in the sender and one verification in the worker.
``cryptography`` runs OpenSSL's portable Ed25519 code while holding the GIL (measured on the
benchmark machine: verify 60-130 µs, sign 25-45 µs); libsodium's is about twice as fast, and a
ctypes call lets go of the GIL, so a worker's other threads go on meanwhile
(docs/benchmarks.md).

Same answers, never more lenient: Ed25519 signing is deterministic (RFC 8032), so libsodium
signs byte for byte what OpenSSL signs, and this module checks that with a probe before it is
used. libsodium's verification is the same cofactorless equation as OpenSSL's, plus
refusals of its own (small-order keys and R): every signature it accepts, OpenSSL accepts.
Where libsodium is missing or the probe disagrees, ``sign``/``verify`` return None and the
caller uses ``cryptography``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

_RAW, _RAW_PUB = serialization.Encoding.Raw, serialization.PublicFormat.Raw
_CACHE_LIMIT = 256  # keys remembered (a trust list is short; tests make many)


class _Sodium:
    def __init__(self, name: str):
        lib = ctypes.CDLL(name)  # CDLL: the GIL is released during each call
        if lib.sodium_init() < 0:
            raise OSError("sodium_init failed")
        self.verify = lib.crypto_sign_ed25519_verify_detached
        self.verify.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulonglong, ctypes.c_char_p]
        self.sign = lib.crypto_sign_ed25519_detached
        self.sign.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulonglong,
                              ctypes.c_char_p]
        self.seed_keypair = lib.crypto_sign_ed25519_seed_keypair
        self.seed_keypair.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p]


_lib: _Sodium | None = None
_tried = False
_lock = threading.Lock()
_publics: dict[int, tuple[Ed25519PublicKey, bytes]] = {}  # id -> (the key, kept alive; its 32 bytes)
_secrets: dict[int, tuple[Ed25519PrivateKey, ctypes.Array]] = {}  # id -> (the key; libsodium's 64 bytes)


def _load() -> _Sodium | None:
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        name = ctypes.util.find_library("sodium")
        if name is None:
            return None
        try:
            lib = _Sodium(name)
        except (OSError, AttributeError):
            return None
        if _agrees(lib):
            _lib = lib
        return _lib


def _agrees(lib: _Sodium) -> bool:
    """A probe: libsodium signs what OpenSSL signs, and each accepts the other's signature
    and refuses a changed message."""
    key = Ed25519PrivateKey.generate()
    data = b"geartask ed25519 probe"
    want = key.sign(data)
    got = _sign_with(lib, _secret(lib, key), data)
    pub = key.public_key().public_bytes(_RAW, _RAW_PUB)
    return (got == want and lib.verify(want, data, len(data), pub) == 0
            and lib.verify(want, data + b"!", len(data) + 1, pub) != 0)


def _secret(lib: _Sodium, key: Ed25519PrivateKey) -> ctypes.Array:
    seed = key.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    pk, sk = ctypes.create_string_buffer(32), ctypes.create_string_buffer(64)
    if lib.seed_keypair(pk, sk, seed) != 0:
        raise OSError("crypto_sign_ed25519_seed_keypair failed")
    return sk


def _sign_with(lib: _Sodium, sk: ctypes.Array, data: bytes) -> bytes:
    sig = ctypes.create_string_buffer(64)
    if lib.sign(sig, None, data, len(data), sk) != 0:
        raise OSError("crypto_sign_ed25519_detached failed")
    return sig.raw


def _remember(cache: dict, key, value) -> None:
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[id(key)] = (key, value)


def verify(public: Ed25519PublicKey, signature: bytes, data: bytes) -> bool | None:
    """Whether ``signature`` (64 bytes) is ``public``'s over ``data``; None: use cryptography."""
    lib = _lib if _tried else _load()
    if lib is None:
        return None
    known = _publics.get(id(public))
    if known is None or known[0] is not public:
        raw = public.public_bytes(_RAW, _RAW_PUB)
        _remember(_publics, public, raw)
    else:
        raw = known[1]
    return lib.verify(signature, data, len(data), raw) == 0


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes | None:
    """``key``'s signature of ``data`` (what ``key.sign(data)`` returns); None: use cryptography."""
    lib = _lib if _tried else _load()
    if lib is None:
        return None
    known = _secrets.get(id(key))
    if known is None or known[0] is not key:
        sk = _secret(lib, key)
        _remember(_secrets, key, sk)
    else:
        sk = known[1]
    return _sign_with(lib, sk, data)
