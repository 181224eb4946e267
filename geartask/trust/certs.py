"""A fleet CA and host certificates: ``geartask certs ca DIR`` and ``geartask certs issue``.

Host certificates serve both ends of TLS (serverAuth and clientAuth): the job server's
terminator presents one, every geartask process presents one as a client. Keys are ECDSA
P-256 (fast handshakes, supported by every TLS stack and by stunnel and HAProxy). The CA
key never leaves DIR; whoever holds it can admit a host to the fleet.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..address import parse_host
from ..errors import UsageError
from .files import CERT_MODE, read_limited, refuse_existing, write_private

CA_DAYS = 3650
HOST_DAYS = 825  # the longest lifetime clients commonly accept for a leaf certificate
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def make_ca(folder: Path, name: str = "geartask fleet CA", force: bool = False,
            days: int = CA_DAYS) -> tuple[Path, Path]:
    """Write ``folder/ca.pem`` and ``folder/ca.key`` (0600); returns their paths."""
    folder = Path(folder)
    cert_path, key_path = folder / "ca.pem", folder / "ca.key"
    refuse_existing([key_path, cert_path], force)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    write_private(key_path, _key_pem(key), force=force)
    write_private(cert_path, _cert_pem(cert), mode=CERT_MODE, force=force)
    return cert_path, key_path


def load_ca(folder: Path):
    """(certificate, key) of the CA in ``folder``."""
    folder = Path(folder)
    try:
        cert = x509.load_pem_x509_certificate(read_limited(folder / "ca.pem", "CA certificate"))
    except ValueError:
        raise UsageError(f"{folder / 'ca.pem'} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(read_limited(folder / "ca.key", "CA key"), password=None)
    except (ValueError, TypeError):
        raise UsageError(f"{folder / 'ca.key'} is not an unencrypted PEM private key") from None
    # SubjectPublicKeyInfo bytes: every key type has them (only RSA, DSA and EC have numbers).
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise UsageError(f"{folder / 'ca.key'} does not belong to {folder / 'ca.pem'}")
    return cert, key


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name or ""):
        raise UsageError(f"bad certificate name {name!r}: letters, digits, '.', '_' and '-', "
                         "at most 63, starting with a letter or digit (it names the files)")
    return name


def issue(folder: Path, name: str, ips: Sequence[str] = (), dns: Sequence[str] = (), force: bool = False,
          days: int = HOST_DAYS) -> tuple[Path, Path]:
    """Write ``folder/NAME.pem`` and ``folder/NAME.key`` (0600): a host certificate signed by
    the CA in ``folder``, for TLS servers and clients, naming ``ips`` and ``dns`` (default:
    NAME as a DNS name)."""
    folder = Path(folder)
    check_name(name)
    if name == "ca":
        raise UsageError("'ca' names the CA's own files; choose another certificate name")
    addresses = []
    for ip in ips:
        try:
            # an IPv6 address may come bracketed, as geartask writes it in server names
            addresses.append(ipaddress.ip_address(parse_host(ip)))
        except (ValueError, TypeError):
            raise UsageError(f"--ip {ip!r} is not an IP address") from None
    for d in dns:
        if not re.fullmatch(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?", d or "") \
                or len(d) > 253:
            raise UsageError(f"--dns {d!r} is not a DNS name")
    dns = list(dns) or ([] if addresses else [name])
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    refuse_existing([key_path, cert_path], force)
    ca_cert, ca_key = load_ca(folder)
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(a) for a in addresses]
    now = _now()
    not_after = min(now + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False, data_encipherment=False,
                                         key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    write_private(key_path, _key_pem(key), force=force)
    write_private(cert_path, _cert_pem(cert), mode=CERT_MODE, force=force)
    return cert_path, key_path
