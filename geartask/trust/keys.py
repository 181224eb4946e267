"""Ed25519 signing keys: a private key in a 0600 PEM file, a public key as ``ed25519:BASE64``.

The public form is the raw 32-byte key in standard base64, one line, so it can be pasted
into a config's ``security.trust`` list and read by any Ed25519 library.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import UsageError
from .files import read_limited, write_private

if TYPE_CHECKING:
    from ..config import Config

PREFIX = "ed25519:"


def public_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """``ed25519:BASE64`` of a key's public half."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PREFIX + base64.b64encode(raw).decode("ascii")


def parse_public(text: object, where: str = "public key") -> Ed25519PublicKey:
    """An ``ed25519:BASE64`` string -> the key; UsageError naming ``where`` if it is not one."""
    if not isinstance(text, str) or not text.startswith(PREFIX):
        raise UsageError(f"{where}: expected 'ed25519:BASE64', got {str(text)[:60]!r}")
    try:
        raw = base64.b64decode(text[len(PREFIX):].strip(), validate=True)
    except (binascii.Error, ValueError):
        raise UsageError(f"{where}: not valid base64 after 'ed25519:'") from None
    if len(raw) != 32:
        raise UsageError(f"{where}: an Ed25519 public key is 32 bytes, this one is {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def new_key(path: Path, force: bool = False) -> tuple[Ed25519PrivateKey, str]:
    """Write a new private key to ``path`` (mode 0600, refused if it exists unless ``force``);
    returns the key and its public text."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    write_private(Path(path), pem, force=force)
    return key, public_text(key)


def load_private(path: str | Path, what: str = "security.key") -> Ed25519PrivateKey:
    """The Ed25519 private key in ``path``; UsageError naming ``what`` for anything else."""
    data = read_limited(Path(path), what)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise UsageError(f"{what}: {path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UsageError(f"{what}: {path} is not an Ed25519 key (write one with 'geartask keys new')")
    return key


def signing_key(config: Config) -> Ed25519PrivateKey | None:
    """The config's ``security.key`` loaded (None when unset); ConfigError names the key."""
    from ..errors import ConfigError
    path = config.security.key
    if not path:
        return None
    try:
        return load_private(Path(path), "security.key")
    except UsageError as e:
        raise ConfigError(str(e).removeprefix("security.key: "), str(config.source) if config.source else None,
                          "security.key") from None
