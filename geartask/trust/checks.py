"""What ``geartask check`` says about trust: a half-secured config is an error.

Half-secured means a setting that looks safe and is not, or one that can't work: ``tls://``
servers without this host's certificate (the terminator would refuse every connection),
``server.tls`` without the files stunnel needs, ``require_signed`` with nobody trusted for
``control`` (no worker could ever be stopped or pinged again) or without a key of our own
(nothing this host sends would be accepted), files that can't be read or don't match.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..address import format_address
from ..errors import GeartaskError
from .tls import client_context, tls_servers

if TYPE_CHECKING:
    from ..config import Config


def problems(config: Config) -> list[str]:
    """One line per problem, each naming the config key; empty when trust is coherent (or off)."""
    found: list[str] = []
    tls_list = tls_servers(config)
    if tls_list:
        for name in ("ca", "cert", "key"):
            if not getattr(config.tls, name):
                found.append(f"tls.{name}: not set, but servers has {tls_list[0]} (a TLS server needs "
                             f"tls.ca to check it, and tls.cert and tls.key to be let in)")
    if config.server.tls:
        for name in ("ca", "cert", "key"):
            if not getattr(config.tls, name):
                found.append(f"tls.{name}: not set, but server.tls is true (stunnel needs the CA, a certificate "
                             "and its key)")
    if config.server.tls:
        own = {format_address(config.server.host, config.server.port)}
        for entry in config.servers:
            if entry.strip() in own:
                found.append(f"servers: {entry.strip()} is the TLS terminator (server.tls is true): write it "
                             f"tls://{entry.strip()}")
    if not found and (tls_list or config.server.tls or config.tls.cert or config.tls.ca):
        try:
            client_context(config)  # every file read, the key matched against the certificate
        except GeartaskError as e:
            found.append(str(e))
    sec = config.security
    trust = None
    if sec.trust:
        from .policy import Trust
        trust = Trust.from_config(sec.trust)
    if sec.require_signed:
        if trust is None or not trust.anyone_may("control"):
            found.append("security.require_signed: nobody in security.trust may 'control': no worker could be "
                         "stopped or pinged (add 'control' to an operator's may)")
        if not sec.key:
            found.append("security.key: not set, but security.require_signed is true (what this host sends "
                         "must be signed: write a key with 'geartask keys new PATH')")
    if sec.key:
        from .keys import load_private
        try:
            load_private(sec.key, "security.key")
        except GeartaskError as e:
            found.append(str(e))
    return found
