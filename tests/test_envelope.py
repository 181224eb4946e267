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


# -- through a real worker -------------------------------------------------------------

import gearclient as gc  # noqa: E402
from geartask import JobSender, load_config  # noqa: E402
from test_worker import start_worker  # noqa: E402,F401 (a fixture)


def test_the_senders_options_reach_the_worker_and_the_data_is_untouched(gearmand, start_worker):
    w = start_worker(gearmand, name="env")
    with JobSender(load_config(w.config)) as sender:
        r = sender.submit_many([{"task": "t.describe", "data": {"x": [1, "two"]}, "retries": 4}])[0]
    assert r.state == "complete", r.error
    assert r.result["data"] == {"x": [1, "two"]}  # no "retries" key added to the user's data
    assert r.result["retries"] == 4
    assert r.result["options"]["bg"] is False and r.result["options"]["retries"] == 4
    assert r.result["options"]["prio"] == "normal" and r.result["options"]["host"]


def test_a_plain_job_has_no_envelope_and_the_worker_defaults(gearmand, start_worker):
    start_worker(gearmand, name="plain")
    o = gc.run_one(gearmand.address, "t.describe", {"retries": 1, "y": 2})
    assert o.state == "complete" and o.result["options"] is None
    assert o.result["retries"] == 1  # a plain client's data key, as before the envelope


def test_a_hostile_envelope_fails_the_job_once_with_the_reason(gearmand, start_worker):
    """A client sends a payload that starts like an envelope but isn't one: the job fails at
    once, not retried, with a reason naming the envelope; the worker goes on."""
    start_worker(gearmand, name="badenv")
    for raw in (MAGIC + b"{not json\n{}", MAGIC + b'{"retries": -3}\n{}', MAGIC + b"x" * 10000):
        conn = gc.connect(gearmand.address)
        try:
            [h] = gc.submit(conn, "t.describe", [raw])
            o = gc.wait(conn, [h], 20)[h]
        finally:
            conn.close()
        assert o.state == "failed" and "envelope" in o.reason["error"] and o.reason["attempts"] == 1, o.reason
    assert gc.run_one(gearmand.address, "t.describe", "ok").state == "complete"
