"""Reaching a server: address parsing, the one place a socket is connected, tuned and wrapped
in TLS (blocking for most roles, non-blocking for the sender's lanes), and TLS error words."""

from __future__ import annotations

import errno
import os
import select
import socket
import ssl
import time
from typing import Any

from ..address import format_address, split_address
from ..errors import ServerError

DEFAULT_PORT = 4730
SCHEMES = ("tcp", "tls")

# (host, port) -> a callable giving the ssl context for that server, for every server a config
# writes tls://HOST:PORT (trust.tls.install, once per process when the config is loaded). Every
# connection that is given no context looks itself up here, so no role can reach a tls:// server
# in clear by forgetting to pass one; the context is built on first use (a config mistake in
# tls.* is then said when a connection needs it, as the ConfigError naming the key).
_TLS: dict[tuple[str, int], Any] = {}


def use_tls(host: str, port: int, context: Any) -> None:
    """Reach ``host:port`` over TLS with ``context`` (an ssl.SSLContext or a callable giving
    one); None: in clear."""
    if context is None:
        _TLS.pop((host, port), None)
    else:
        _TLS[(host, port)] = context


def registered_tls() -> dict[tuple[str, int], Any]:
    """A copy of what use_tls registered: (host, port) -> context (or the callable giving one)."""
    return dict(_TLS)


def forget_tls(host: str) -> None:
    """Reach every port of ``host`` in clear again (one process that meets several networks in
    turn, where an address that was a TLS server may later be a plain one: the tests)."""
    for key in [k for k in _TLS if k[0] == host]:
        del _TLS[key]


def tls_for(host: str, port: int) -> ssl.SSLContext | None:
    """The context registered for ``host:port`` by use_tls, None for a plain server."""
    found = _TLS.get((host, port))
    if found is None or isinstance(found, ssl.SSLContext):
        return found
    return found()


def parse_address(text: str) -> tuple[str, str, int]:
    """``tls://host:port``, ``host:port``, ``[v6]:port``, ``host`` -> (scheme, host, port).

    ValueError names what is wrong; the scheme is "tcp" unless written. The rest is
    geartask.address.split_address (a bare IPv6 address is the whole host, port 4730).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"expected 'host:port' or 'tls://host:port', got {text!r}")
    rest = text.strip()
    scheme = "tcp"
    if "://" in rest:
        scheme, _, rest = rest.partition("://")
        scheme = scheme.lower()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {scheme!r} in {text!r}: use tls:// or none")
    host, port = split_address(rest)
    return scheme, host, port


def tune(sock: socket.socket, keepalive: Any) -> None:
    """The socket options every geartask connection gets: no Nagle delay (one packet per job
    each way), TCP keepalive and TCP_USER_TIMEOUT (``keepalive``: a connection.Keepalive)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if keepalive is not None:
        keepalive.apply(sock)


# -- TLS error words -----------------------------------------------------------------------
_VERIFY_WORDS = {
    2: "unknown CA (the server's certificate is not signed by tls.ca)",
    18: "unknown CA (the server's certificate is self-signed)",
    19: "unknown CA (the server's certificate is not signed by tls.ca)",
    20: "unknown CA (the server's certificate is not signed by tls.ca)",
    21: "unknown CA (the server's certificate is not signed by tls.ca)",
    9: "certificate not yet valid (the server's)",
    10: "certificate expired (the server's)",
    62: "name mismatch (the server's certificate is not for {name})",
    64: "name mismatch (the server's certificate is not for {name})",
}
_ALERT_WORDS = (  # OpenSSL reason -> what it means to an operator, and whether it is our certificate refused
    ("CERTIFICATE_REQUIRED", "no client certificate (the server requires one: set tls.cert and tls.key)", True),
    ("UNKNOWN_CA", "unknown CA (the server does not trust our certificate)", True),
    ("CERTIFICATE_EXPIRED", "certificate expired (the server says ours is)", True),
    ("BAD_CERTIFICATE", "bad certificate (the server refused ours)", True),
    ("CERTIFICATE_UNKNOWN", "certificate refused by the server", True),
    ("HANDSHAKE_FAILURE", "handshake failure (no client certificate, or no common cipher)", False),
    ("PROTOCOL_VERSION", "no common TLS version (1.2 or newer needed)", False),
    ("WRONG_VERSION_NUMBER", "not a TLS server (it answered in plain text)", False),
    ("PACKET_LENGTH_TOO_LONG", "not a TLS server (it answered in plain text)", False),
    ("RECORD_LAYER_FAILURE", "not a TLS server (it answered in plain text)", False),
)
_EOF_WORDS = "connection closed during the TLS handshake (not a TLS server, or one that refused us)"
# Every refusal's line starts with one of these (after "TLS: "): how a role that only has the
# text (a scheduler's send errors, a NoServerError's reasons) tells a refusal from an outage.
_REFUSAL_STARTS = tuple(sorted({w.split(" (")[0] for w in _VERIFY_WORDS.values()}
                               | {w.split(" (")[0] for _, w, _ in _ALERT_WORDS}
                               | {"server certificate refused"}))


def _refusal(e: BaseException, name: str | None) -> tuple[str, bool] | None:
    """(words, ours) for an ssl error that is a refusal; ``ours``: the server refused our
    certificate (rather than we its, or no common protocol)."""
    if isinstance(e, ssl.SSLCertVerificationError):
        words = _VERIFY_WORDS.get(e.verify_code)
        if words:
            return "TLS: " + words.format(name=name or "this address"), False
        return f"TLS: server certificate refused: {e.verify_message}", False
    if isinstance(e, ssl.SSLEOFError):
        return None
    text = f"{getattr(e, 'reason', '') or ''} {e}"
    for key, words, ours in _ALERT_WORDS:
        if key in text:
            return "TLS: " + words, ours
    return None


def tls_refusal(e: BaseException, name: str | None = None) -> str | None:
    """The words for an ssl error that is a refusal (unknown CA, name mismatch, no client
    certificate, expired, not a TLS server...): a setup problem, not a passing fault. None
    for anything else (a connection cut during a handshake included)."""
    found = _refusal(e, name)
    return found[0] if found else None


def tls_reason(e: BaseException, name: str | None = None) -> str:
    """One line for an ssl error: unknown CA, name mismatch, no client certificate, expired..."""
    words = tls_refusal(e, name)
    if words:
        return words
    if isinstance(e, ssl.SSLEOFError) or "UNEXPECTED_EOF" in str(e):
        return "TLS: " + _EOF_WORDS
    return f"TLS: {getattr(e, 'reason', None) or e}"


def tls_error(e: BaseException, address: str, name: str | None = None) -> "TLSError | None":
    """The TLSError for an ssl error that is a refusal, naming the server; None for any other."""
    found = _refusal(e, name)
    return TLSError(found[0], address, ours=found[1]) if found else None


def is_refusal(error: BaseException | str) -> bool:
    """Whether ``error`` (an exception, or the text of one, a NoServerError's included) is or
    holds a TLS refusal: a certificate or protocol problem that retrying will not cure."""
    if isinstance(error, TLSError):
        return True
    text = str(error)
    return any(f"TLS: {start}" in text for start in _REFUSAL_STARTS)


class TLSError(ServerError):
    """Raised when a TLS handshake fails or the peer ends TLS with an alert: a setup problem
    (certificates, CA, name), so trying again the same way cannot help. ``ours``: the server
    refused this host's certificate (unknown CA, expired, none), which only a new certificate
    here (and a restart) cures; otherwise we refused the server's, or found no common TLS."""

    def __init__(self, message: str, server: str | None = None, ours: bool = False):
        super().__init__(message, server)
        self.ours = ours


# -- connecting ----------------------------------------------------------------------------
def _refused(err: int) -> bool:
    return err == errno.ECONNREFUSED


class ConnectError(ServerError):
    """Raised when a connect fails; ``refused``: nothing listens there (the process is gone)."""

    def __init__(self, message: str, server: str, refused: bool = False):
        super().__init__(message, server)
        self.refused = refused


def dial(host: str, port: int, timeout: float, keepalive: Any = None,
         tls: ssl.SSLContext | None = None, server_hostname: str | None = None) -> socket.socket:
    """A connected, tuned socket (TLS-wrapped and handshaken when ``tls``), within ``timeout``
    seconds overall. Raises ConnectError or TLSError naming the server."""
    address = format_address(host, port)
    deadline = time.monotonic() + timeout
    if tls is None:
        tls = tls_for(host, port)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise ConnectError(f"cannot connect: {e.strerror or e}", address,
                           refused=isinstance(e, ConnectionRefusedError)) from None
    tune(sock, keepalive)
    if tls is None:
        sock.settimeout(None)
        return sock
    try:
        tsock = tls.wrap_socket(sock, server_hostname=server_hostname or host, do_handshake_on_connect=False)
    except (OSError, ValueError) as e:
        sock.close()
        raise TLSError(tls_reason(e, server_hostname or host), address) from None
    try:
        tsock.settimeout(max(0.001, deadline - time.monotonic()))
        tsock.do_handshake()
    except (socket.timeout, TimeoutError):
        tsock.close()
        raise ConnectError(f"cannot connect: no TLS handshake within {timeout:g}s", address) from None
    except ssl.SSLError as e:
        tsock.close()
        raise (tls_error(e, address, server_hostname or host)
               or TLSError(tls_reason(e, server_hostname or host), address)) from None
    except OSError as e:
        tsock.close()
        raise ConnectError(f"cannot connect: TLS handshake: {e.strerror or e}", address) from None
    tsock.setblocking(False)  # Connection reads TLS without blocking (a record may come in slices)
    return tsock


class Dial:
    """A non-blocking connect and TLS handshake (the sender's lanes: a silent host must not
    stall the other servers). Register ``self`` (it has fileno()) for ``events`` with poll and
    call ``step()`` when they fire: it returns the ready socket, None while not done, or raises
    ConnectError/TLSError."""

    def __init__(self, host: str, port: int, keepalive: Any = None, tls: ssl.SSLContext | None = None,
                 server_hostname: str | None = None):
        self.host, self.port = host, port
        self.address = format_address(host, port)
        if tls is None:
            tls = tls_for(host, port)
        self.keepalive, self.tls, self.server_hostname = keepalive, tls, server_hostname or host
        self.sock: socket.socket | None = None
        self.events = select.POLLOUT
        self.handshaking = False
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
        except OSError as e:
            raise ConnectError(f"cannot connect: {e.strerror or e}", self.address) from None
        sock.setblocking(False)
        err = sock.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            raise ConnectError(f"cannot connect: {os.strerror(err)}", self.address, refused=_refused(err))
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    @property
    def stage(self) -> str:
        return "TLS handshake" if self.handshaking else "connect"

    def step(self) -> socket.socket | None:
        sock = self.sock
        if sock is None:
            raise ConnectError("not connecting", self.address)
        if not self.handshaking:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.close()
                raise ConnectError(f"cannot connect: {os.strerror(err)}", self.address, refused=_refused(err))
            tune(sock, self.keepalive)
            if self.tls is None:
                self.sock = None
                sock.setblocking(True)
                return sock
            try:
                sock = self.sock = self.tls.wrap_socket(sock, server_hostname=self.server_hostname,
                                                        do_handshake_on_connect=False)
            except (OSError, ValueError) as e:
                self.close()
                raise TLSError(tls_reason(e, self.server_hostname), self.address) from None
            self.handshaking = True
        try:
            sock.do_handshake()  # type: ignore[attr-defined]
        except ssl.SSLWantReadError:
            self.events = select.POLLIN
            return None
        except ssl.SSLWantWriteError:
            self.events = select.POLLOUT
            return None
        except ssl.SSLError as e:
            self.close()
            raise (tls_error(e, self.address, self.server_hostname)
                   or TLSError(tls_reason(e, self.server_hostname), self.address)) from None
        except OSError as e:
            self.close()
            raise ConnectError(f"cannot connect: TLS handshake: {e.strerror or e}", self.address) from None
        self.sock = None
        return sock  # stays non-blocking: Connection reads and writes TLS without blocking

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
