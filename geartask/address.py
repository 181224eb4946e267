"""The text forms of a network address, the one place they are written and read.

``host:port`` with an IPv6 host bracketed, as in URLs (``[2001:db8::1]:4730``): every server
name, handle suffix (``H:vm:1@[::1]:4730``), config entry and client-id field goes through
``format_address``/``format_host`` one way and ``split_address``/``parse_host`` the other,
so an IPv6 address reads the same everywhere and no module splits on ':' by itself.

An IPv6 address written bare (``2001:db8::1``) is the whole host, with the default port: a
port can only follow a bracketed address (``[2001:db8::1]:4730``). Text with several ':' that
is not an IPv6 address is refused, naming the bracketed spelling.
"""

from __future__ import annotations

import ipaddress

DEFAULT_PORT = 4730
_BAD_HOST_CHARS = "/@?#[]"


def is_ipv6(host: str) -> bool:
    """True for an IPv6 address literal (with or without a ``%zone``), unbracketed."""
    if not isinstance(host, str) or ":" not in host:
        return False
    addr, _, zone = host.partition("%")
    if "%" in host and (not zone or not zone.isprintable() or any(c.isspace() or c in _BAD_HOST_CHARS for c in zone)):
        return False
    try:
        ipaddress.IPv6Address(addr)
    except ValueError:
        return False
    return True


def format_host(host: str) -> str:
    """``host`` as it is written before ``:port`` or inside a client id: IPv6 bracketed."""
    return f"[{host}]" if ":" in host else host


def format_address(host: str, port: int) -> str:
    """``host:port``; ``[v6]:port`` for an IPv6 host (the form every server name takes)."""
    return f"{format_host(host)}:{port}"


def format_last_colon(host: str, port: int) -> str:
    """``host:port`` with an IPv6 host NOT bracketed (``::1:4730``), for programs that split at
    the last ':' and resolve the rest as it is: stunnel's ``accept``/``connect`` (5.68 refuses
    ``[::1]:4730``: "Error resolving "[::1]""). Never for geartask's own names."""
    return f"{host}:{port}"


def _check_host(host: str, text: str) -> str:
    if not host or not host.isprintable() or any(c.isspace() or c in _BAD_HOST_CHARS for c in host):
        raise ValueError(f"bad host in {text!r}")
    if ":" in host and not is_ipv6(host):
        raise ValueError(f"bad host in {text!r}: not an IPv6 address (write an IPv6 address as [2001:db8::1]:4730)")
    return host


def parse_host(text: str) -> str:
    """A host alone (``--host``): ``name``, ``10.0.0.5``, ``::1`` or ``[::1]`` -> the bare host.

    ValueError names what is wrong."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"expected a host name or address, got {text!r}")
    host = text.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not is_ipv6(host):
            raise ValueError(f"bad host in {text!r}: brackets hold an IPv6 address only")
    return _check_host(host, text)


def split_address(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``host:port``, ``host``, ``[v6]:port``, ``[v6]`` or a bare IPv6 address -> (host, port),
    the host unbracketed; ``default_port`` when none is written.

    ValueError says what is wrong (the caller adds where: the config key, the option).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"expected 'host:port', got {text!r}")
    rest = text.strip()
    if rest.startswith("["):  # [v6] or [v6]:port
        host, sep, tail = rest[1:].partition("]")
        if not sep:
            raise ValueError(f"missing ']' in {text!r}")
        if tail and not tail.startswith(":"):
            raise ValueError(f"bad text after ']' in {text!r}")
        if not is_ipv6(host):
            raise ValueError(f"bad host in {text!r}: brackets hold an IPv6 address only")
        port_text = tail[1:] if tail else str(default_port)
    elif rest.count(":") > 1:  # a bare IPv6 address: the whole of it is the host
        if not is_ipv6(rest):
            raise ValueError(f"bad address {text!r}: not an IPv6 address; write IPv6 with a port "
                             "as [2001:db8::1]:4730")
        host, port_text = rest, str(default_port)
    else:
        host, sep, port_text = rest.partition(":")
        if not sep:
            port_text = str(default_port)
    _check_host(host, text)
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"bad port in {text!r}: not a number")
    if not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in {text!r}: must be 1-65535")
    return host, int(port_text)


def canonical_host(host: str) -> str:
    """An IPv6 host in its compressed form ('0:0::1' -> '::1', zone kept); others as given."""
    if not is_ipv6(host):
        return host
    addr, sep, zone = host.partition("%")
    return str(ipaddress.IPv6Address(addr)) + sep + zone


def split_server(text: str) -> tuple[str, int]:
    """A server name with its port, as handles and records carry it (``HOST:PORT``,
    ``[v6]:PORT``) -> (host, port). A bare IPv6 address is refused here: in ``::1:4730``
    no port can be told from the address."""
    if not isinstance(text, str) or ":" not in text.strip() or text.strip().endswith("]"):
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if not text.strip().startswith("[") and text.count(":") > 1:
        raise ValueError(f"bad address {text!r}: write an IPv6 address with its port as [ADDR]:PORT "
                         "([2001:db8::1]:4730)")
    host, port = split_address(text)
    return canonical_host(host), port


def canonical_address(text: str, default_port: int = DEFAULT_PORT) -> str:
    """``text`` in the one spelling servers are named by (``[::1]:4730``, ``h:4730``)."""
    host, port = split_address(text, default_port)
    return format_address(canonical_host(host), port)


def split_fields(text: str) -> list[str]:
    """``a:[v6]:b`` -> ['a', '[v6]', 'b']: split on ':' outside brackets (a client id, a
    control function name). A '[' without its ']' leaves the rest as one field."""
    fields: list[str] = []
    cur: list[str] = []
    depth = 0
    for c in text:
        if c == ":" and not depth:
            fields.append("".join(cur))
            cur = []
            continue
        if c == "[":
            depth += 1
        elif c == "]" and depth:
            depth -= 1
        cur.append(c)
    fields.append("".join(cur))
    return fields


def unbracket(field: str) -> str | None:
    """A client-id IP field -> the address: ``[v6]`` -> ``v6``; a field with ':' that is not
    bracketed, or brackets around no IPv6 address, -> None."""
    if field.startswith("[") and field.endswith("]"):
        inner = field[1:-1]
        return inner if is_ipv6(inner) else None
    if ":" in field or "[" in field or "]" in field:
        return None
    return field
