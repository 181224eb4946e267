"""``geartask init --secure DIR``: a one-host fleet with trust switched on, ready to run.

It writes, next to init's config.yaml and example plugin: a CA (``tls/ca.pem``, ``tls/ca.key``),
one host certificate for 127.0.0.1 and localhost that serves as the terminator's and every
client's (``tls/host.pem``, ``tls/host.key``), an Ed25519 key (``keys/geartask.key``), and a
config with ``server.tls: true``, ``tls://`` servers, ``tls.*``, ``security.key``, a trust list
holding that key with ``*``, control, report and answer, and ``require_signed: true``.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

from ..errors import UsageError
from .certs import issue, make_ca
from .files import refuse_existing
from .keys import new_key

CA, HOST, KEY = Path("tls/ca.pem"), Path("tls/host.pem"), Path("keys/geartask.key")


def targets(folder: Path) -> list[Path]:
    folder = Path(folder)
    return [folder / p for p in (CA, CA.with_suffix(".key"), HOST, HOST.with_suffix(".key"), KEY)]


def check_free(folder: Path, force: bool) -> None:
    """Refuse (before anything is written) when a key or certificate is already there."""
    refuse_existing(targets(folder), force)


def signer_name() -> str:
    name = "".join(c for c in (socket.gethostname().split(".")[0] or "") if c.isalnum() or c in "-_")
    return name[:64] or "local"


def secure_config_text(template: str, public_key: str, port: int = 4730) -> str:
    """init's config text with trust switched on."""
    plain = f"servers:\n  - 127.0.0.1:{port}\n"
    server = f"server:\n  host: 127.0.0.1      # loopback: gearmand has no authentication\n  port: {port}\n"
    if plain not in template or server not in template:
        raise UsageError("the config template changed shape; init --secure cannot edit it")  # a bug, said plainly
    text = template.replace(plain, f"servers:\n  - tls://127.0.0.1:{port}   # TLS, with this host's certificate\n")
    text = text.replace(server, (
        "server:\n  host: 127.0.0.1\n"
        f"  port: {port}           # stunnel: TLS, client certificates signed by tls.ca only\n"
        "  tls: true\n"
        f"  backend_port: {port + 1}   # gearmand itself, on 127.0.0.1 behind stunnel\n"))
    trust = json.dumps([{"name": signer_name(), "public_key": public_key,
                         "may": ["*", "control", "report", "answer"]}])
    return text.rstrip("\n") + "\n\n" + "\n".join([
        "# TLS (docs/security.md, \"Trust: TLS and signatures\"). Certificates: geartask certs issue tls NAME --ip IP",
        "tls:",
        f"  ca: {CA}          # the CA every certificate is checked against (keep tls/ca.key offline)",
        f"  cert: {HOST}      # this host's certificate, for the server and as a client",
        f"  key: {HOST.with_suffix('.key')}",
        "",
        "# Signed jobs, control commands, outcomes and answers. Other hosts: geartask keys new PATH,",
        "# and add its public key here with what it may do.",
        "security:",
        f"  key: {KEY}",
        "  require_signed: true",
        f"  trust: {trust}",
        "",
    ])


def write_secure(folder: Path, template: str, force: bool = False) -> tuple[list[Path], str]:
    """Write the CA, the host certificate and the key into ``folder``; returns the written
    paths and the config text to write."""
    folder = Path(folder)
    written = list(make_ca(folder / CA.parent, force=force))
    written += issue(folder / CA.parent, HOST.stem, ips=["127.0.0.1"], dns=["localhost"], force=force)
    _, public = new_key(folder / KEY, force=force)
    written.append(folder / KEY)
    return written, secure_config_text(template, public)
