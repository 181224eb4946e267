"""ssl contexts from the config's ``tls`` section: ``tls.ca`` (the CA bundle that signs the
fleet's certificates), ``tls.cert`` and ``tls.key`` (this host's certificate and key).

Every failure names the config key and the file: a missing file, one that can't be read, one
that is not PEM, a key that does not belong to the certificate. Nothing is retried.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, UsageError
from .files import read_limited

if TYPE_CHECKING:
    from ..config import Config


def _file(config: Config, name: str, needed_for: str) -> Path:
    value = getattr(config.tls, name, "") or ""
    where = str(config.source) if getattr(config, "source", None) else None
    if not value:
        raise ConfigError(f"needed for {needed_for} (a PEM file; write one with 'geartask certs')", where, f"tls.{name}")
    path = Path(value)
    try:
        read_limited(path, f"tls.{name}")
    except UsageError as e:  # said as a config error, naming the key
        raise ConfigError(str(e).removeprefix(f"tls.{name}: "), where, f"tls.{name}") from None
    return path


def _load_chain(ctx: ssl.SSLContext, config: Config, needed_for: str) -> None:
    cert = _file(config, "cert", needed_for)
    key = _file(config, "key", needed_for)
    where = str(config.source) if getattr(config, "source", None) else None
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as e:
        from cryptography import x509  # only on this error path: which of the two files is wrong?
        try:
            x509.load_pem_x509_certificate(read_limited(cert, "tls.cert"))
        except ValueError:
            raise ConfigError(f"{cert} is not a PEM certificate", where, "tls.cert") from None
        if "MISMATCH" in str(e).upper():
            raise ConfigError(f"{key} does not belong to the certificate in tls.cert ({cert})", where, "tls.key") from None
        raise ConfigError(f"{key} is not an unencrypted PEM private key", where, "tls.key") from None


def _load_ca(ctx: ssl.SSLContext, config: Config, needed_for: str) -> None:
    ca = _file(config, "ca", needed_for)
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except ssl.SSLError:
        raise ConfigError(f"{ca} holds no PEM certificate", str(config.source) if config.source else None,
                          "tls.ca") from None


def client_context(config: Config) -> ssl.SSLContext:
    """The context every geartask connection to a ``tls://`` server uses: TLS 1.2 or newer,
    the server's certificate checked against ``tls.ca`` including its name or IP (pass the
    host as ``server_hostname`` to wrap_socket), this host's ``tls.cert``/``tls.key``
    presented as the client certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_ca(ctx, config, "tls:// servers")
    _load_chain(ctx, config, "tls:// servers (the job server asks every client for a certificate)")
    return ctx


def server_context(config: Config) -> ssl.SSLContext:
    """A server-side context with the same rules as the terminator: TLS 1.2 or newer, a client
    certificate signed by ``tls.ca`` required. For geartask's own listeners (a dashboard or a
    test server); the job server itself is fronted by stunnel or HAProxy."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load_ca(ctx, config, "server.tls")
    _load_chain(ctx, config, "server.tls")
    return ctx


def tls_servers(config: Config) -> list[str]:
    """The ``servers`` entries written ``tls://HOST:PORT``."""
    return [s for s in config.servers if s.strip().lower().startswith("tls://")]


def install(config) -> None:
    """Make every connection of this process to one of ``config``'s ``tls://`` servers use TLS
    with ``client_context(config)``, built once, on first use (geartask.gearman.use_tls); the
    config's plain servers are reached in clear."""
    from ..gearman.dial import use_tls
    context = config.__dict__.get("_tls_context")  # one per config: a JobSender installs again
    if context is None:
        built: list[ssl.SSLContext] = []

        def context() -> ssl.SSLContext:
            if not built:
                built.append(client_context(config))
            return built[0]

        config.__dict__["_tls_context"] = context
    for address in config.server_addresses:
        use_tls(address[0], address[1], context if address.tls else None)


def refused_everywhere(config, timeout: float = 5.0) -> str | None:
    """At a worker's start: when every server in ``config`` is ``tls://`` and every one refuses
    this host's certificate (unknown CA, expired, none: a TLSError with ``ours``), one line
    naming each server and its reason; None as soon as one server does not (it accepts us, is
    down, or it is we who refuse its certificate: that is fixed on the server, and the worker
    picks it up by itself). One connection and one ECHO per server, all at once: a TLS 1.3
    server refuses a client's certificate only after the handshake, at the first read."""
    import queue
    import threading

    from ..gearman import Connection, TLSError
    servers = list(config.server_addresses)
    if not servers or not all(address.tls for address in servers):
        return None
    answers: queue.Queue = queue.Queue()

    def probe(host: str, port: int) -> None:
        conn = Connection(host, port, connect_timeout=timeout)
        try:
            conn.connect().echo(timeout)
            answers.put(None)
        except TLSError as e:
            answers.put(str(e) if e.ours else None)
        except Exception:  # down, slow, anything else: not a refusal of our certificate
            answers.put(None)
        finally:
            conn.close()

    for address in servers:
        threading.Thread(target=probe, args=(address[0], address[1]), daemon=True,
                         name=f"tls-probe-{address[0]}:{address[1]}").start()
    refusals = []
    for _ in servers:
        try:
            refusal = answers.get(timeout=2 * timeout + 1)
        except queue.Empty:
            return None
        if refusal is None:
            return None
        refusals.append(refusal)
    return "; ".join(sorted(refusals))
