"""Text for a terminal from text a peer chose: what is not printable is shown as an escape.

Client ids, function names, unique keys and server replies are hostile input: printed raw,
a newline forges a row and an escape sequence rewrites the operator's terminal.
"""

from __future__ import annotations

import json

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    if ch.isprintable():
        return ch
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else (f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")


def printable(text: object) -> str:
    """``text`` (str() of anything) on one line, every non-printable character as a backslash
    escape (``\\n``, ``\\t``, ``\\x1b``, ``\\u202e``). Printable text, non-ASCII included
    (``é``, ``中``), is kept as it is, backslashes too: escaping twice changes nothing, so a
    message that quotes a name with repr() can be passed through again safely."""
    s = text if isinstance(text, str) else str(text)
    if s.isprintable():
        return s  # the common case: one C-level scan, no copy
    return "".join(map(_escape, s))


def _json_escape(ch: str) -> str:
    code = ord(ch)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # JSON spells characters past the BMP as a surrogate pair
    return f"\\u{0xd800 + (code >> 10):04x}\\u{0xdc00 + (code & 0x3ff):04x}"


def json_line(obj: object, **kwargs: object) -> str:
    """``obj`` as one line of JSON for a terminal: readable non-ASCII kept as it is, every
    character that is not printable (C1 controls such as U+009B, bidi overrides such as U+202E,
    lone surrogates) as a ``\\uXXXX`` escape, so it is still the same JSON value."""
    text = json.dumps(obj, ensure_ascii=False, **kwargs)  # type: ignore[arg-type]
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _json_escape(ch) for ch in text)
