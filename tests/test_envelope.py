"""The job envelope: options in front of the payload, the user's bytes untouched."""

from __future__ import annotations

import pytest

from geartask.envelope import MAGIC, EnvelopeError, unwrap, wrap


@pytest.mark.parametrize("payload", [b"", b'{"a":1}', b"\x00\xff raw bytes\n\nwith newlines", MAGIC + b"{}\n"])
def test_round_trip_keeps_the_payload_byte_for_byte(payload):
    options, out = unwrap(wrap(payload, bg=True, retries=3, at=1.5, host="h", prio="high", nothing=None))
    assert out == payload
    assert options == {"bg": True, "retries": 3, "at": 1.5, "host": "h", "prio": "high"}


@pytest.mark.parametrize("payload", [b"", b'{"retries": 2}', b"plain text", b"\x1e not ours"])
def test_a_job_without_envelope_is_left_alone(payload):
    assert unwrap(payload) == (None, payload)


def test_unknown_fields_are_kept_for_newer_senders():
    options, _ = unwrap(MAGIC + b'{"future":1}\n')
    assert options == {"future": 1}


@pytest.mark.parametrize("raw, what", [
    (MAGIC + b"{}", "no end"),
    (MAGIC + b"x" * 5000 + b"\n", "no end"),
    (MAGIC + b"[1]\n", "JSON object"),
    (MAGIC + b"{bad\n", "one-line JSON"),
    (MAGIC + b"[" * 3000 + b"\n", "one-line JSON"),
    (MAGIC + b'{"bg":"yes"}\n', "'bg'"),
    (MAGIC + b'{"retries":-1}\n', "'retries'"),
    (MAGIC + b'{"retries":1.5}\n', "'retries'"),
    (MAGIC + b'{"at":NaN}\n', "'at'"),
    (MAGIC + b'{"prio":"urgent"}\n', "'prio'"),
    (MAGIC + b'{"host":"' + b"h" * 300 + b'"}\n', "'host'"),
])
def test_a_malformed_envelope_is_an_error_naming_what(raw, what):
    with pytest.raises(EnvelopeError, match=what):
        unwrap(raw)
