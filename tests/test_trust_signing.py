"""Signed jobs and messages, and the worker's policy: pure logic with a fixed key and a fixed
clock. The vectors here are the ones in docs/outcomes.md ("Signed jobs"): a client in another
language can check its signer against them."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from geartask import envelope
from geartask.errors import ConfigError
from geartask.trust import signing
from geartask.trust.keys import public_text
from geartask.trust.policy import Refused, Trust, decide, verify_message

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))  # the documented test key
PUB = "ed25519:A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg="
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
T = 1765000000
DAY = 86400
PAYLOAD = b'\x1egeartask/1 {"bg":true,"retries":1}\n{"cmd": ["uname", "-a"]}'
VECTOR_SIG = "ysy4HVENLgFuXsDUslZkQ25DiDEIDB4/GhVzttfuQ3AReMu09eiCiCFC4IbOrdeI4GH0W3gtqqOHWWfR3yt1BA=="
VECTOR_NOTE_SIG = "Vl52OwaGHyYYraI2/R4iiDaiKe0JBAMu7nU/dc6LRAaYWWT6O+50oj9CPHXlO+Gy6LOOmSHOdYf3E2DGH2BACw=="
VECTOR_PING_SIG = "U40MvacPfauO7aM0mXa1+6P9Ufey2kq3igsaacmtYibgdJLJv3vQByDPtgbtqnUXBMvtohOSa8BOoOkNTiSECg=="


def trust(*entries) -> Trust:
    return Trust.from_config([{"name": n, "public_key": public_text(k), "may": may} for n, k, may in entries])


def test_the_documented_vector():
    assert public_text(KEY) == PUB
    assert envelope.wrap(b'{"cmd": ["uname", "-a"]}', bg=True, retries=1) == PAYLOAD
    assert signing.job_bytes("shell", "job-1", PAYLOAD, T) == (
        b"14:geartask-sig/1,3:job,5:shell,5:job-1,10:1765000000,"
        b"64:b9b2ba1096795f424303e4d328e5bc65a7613b71497728fd3b2c5de830b38bf6,")
    signed = signing.sign_job("shell", "job-1", PAYLOAD, KEY, T)
    assert signed == (b'\x1egeartask-sig/1 {"key":"' + PUB.encode() + b'","t":1765000000,"sig":"'
                      + VECTOR_SIG.encode() + b'"}\n' + PAYLOAD)
    line, rest = signing.split(signed)
    assert rest == PAYLOAD and line.stamp.sig == VECTOR_SIG
    requeued = signing.requeue_job("shell", "job-1", PAYLOAD, line.stamp, "f00d", KEY, T + 3600)
    assert signing.split(requeued)[0].requeue.stamp.sig == VECTOR_NOTE_SIG
    ping = signing.sign_message("control", b'{"op":"ping"}', KEY, T)
    assert signing.split(ping)[0].stamp.sig == VECTOR_PING_SIG


def test_a_signed_job_is_allowed_and_names_its_signer_and_the_payload_unwraps_as_before():
    d = decide("shell", "job-1", signing.sign_job("shell", "job-1", PAYLOAD, KEY, T), trust(("ops", KEY, ["*"])), T + 5)
    assert d.allowed and d.reason is None and d.signer == "ops" and d.signed_at == T
    assert envelope.unwrap(d.payload) == ({"bg": True, "retries": 1}, b'{"cmd": ["uname", "-a"]}')


@pytest.mark.parametrize("change, reason", [
    (lambda raw: raw[:-1] + b"X", "bad signature"),  # the user's bytes
    (lambda raw: raw.replace(b'"retries":1', b'"retries":9'), "bad signature"),  # the envelope
    (lambda raw: raw.replace(b"1765000000", b"1765000001"), "bad signature"),  # the signing time
    (lambda raw: raw.replace(b'"sig":"ysy4', b'"sig":"Ysy4'), "bad signature"),
    (lambda raw: raw.replace(b'"sig":"', b'"sig":"!'), "bad signature"),  # not base64
    (lambda raw: raw.replace(b'"t":1765000000', b'"t":"x"'), "bad signature"),  # malformed line
    (lambda raw: raw.replace(b"\n", b" ", 1), "bad signature"),  # no end of line
    (lambda raw: raw.split(b"\n", 1)[1], "unsigned"),
])
def test_tampering_is_refused_with_its_reason(change, reason):
    raw = change(signing.sign_job("shell", "job-1", PAYLOAD, KEY, T))
    d = decide("shell", "job-1", raw, trust(("ops", KEY, ["*"])), T)
    assert not d.allowed and d.reason == reason


def test_the_function_and_unique_key_are_covered():
    raw = signing.sign_job("shell", "job-1", PAYLOAD, KEY, T)
    t = trust(("ops", KEY, ["*"]))
    assert decide("shell", "job-1", raw, t, T).allowed
    assert decide("reports.daily", "job-1", raw, t, T).reason == "bad signature"
    assert decide("shell", "job-2", raw, t, T).reason == "bad signature"
    # netstrings: moving bytes between function and unique key changes what is signed
    assert signing.job_bytes("ab", "c", b"", T) != signing.job_bytes("a", "bc", b"", T)


def test_unknown_signer_and_may():
    raw = signing.sign_job("shell", "u", PAYLOAD, OTHER, T)
    assert decide("shell", "u", raw, trust(("ops", KEY, ["*"])), T).reason == "unknown signer"
    reports_only = trust(("ops", OTHER, ["reports.*", "control"]))
    assert decide("shell", "u", raw, reports_only, T).reason == "signer ops may not run shell"
    raw = signing.sign_job("reports.daily", "u", PAYLOAD, OTHER, T)
    assert decide("reports.daily", "u", raw, reports_only, T).allowed


@pytest.mark.parametrize("patterns, function, allowed", [
    (["shell"], "shell", True),
    (["shell"], "shell@label:db", True),  # a targeted form of an allowed task
    (["shell@label:db"], "shell@label:db", True),
    (["shell@label:db"], "shell@label:web", False),
    (["shell@label:db"], "shell", False),
    (["reports.*"], "reports.daily", True),
    (["reports.*"], "reportsXdaily", False),
    (["reports.*"], "shell", False),
    (["*"], "anything.at.all", True),
    (["*"], "shell@label:db", True),
    (["control", "report", "answer"], "shell", False),
    (["sh"], "shell", False),
])
def test_task_patterns(patterns, function, allowed):
    raw = signing.sign_job(function, "u", b"x", KEY, T)
    assert decide(function, "u", raw, trust(("ops", KEY, patterns)), T).allowed is allowed


def test_the_age_window_with_a_fake_clock():
    raw = signing.sign_job("shell", "u", b"x", KEY, T)
    t = trust(("ops", KEY, ["*"]))
    assert decide("shell", "u", raw, t, T + DAY).allowed
    assert decide("shell", "u", raw, t, T + DAY + 1).reason == "too old"
    assert decide("shell", "u", raw, t, T + 100, max_age=60).reason == "too old"
    assert decide("shell", "u", raw, t, T - 299).allowed  # a sender's clock a little ahead
    assert decide("shell", "u", raw, t, T - 301).reason == "too old"


def test_without_require_signed_everything_runs_and_a_valid_signer_is_still_named():
    t = trust(("ops", KEY, ["reports.*"]))
    assert decide("shell", "u", b"plain", t, T, require_signed=False) .allowed
    d = decide("reports.x", "u", signing.sign_job("reports.x", "u", b"p", KEY, T), t, T, require_signed=False)
    assert d.allowed and d.signer == "ops" and d.payload == b"p"
    d = decide("shell", "u", signing.sign_job("shell", "u", b"p", KEY, T), t, T, require_signed=False)
    assert d.allowed and d.signer is None and d.payload == b"p"


def test_a_requeue_keeps_the_original_signature_whatever_its_age_and_needs_a_fresh_note():
    ops = trust(("sched", KEY, ["reports.*"]), ("ops", OTHER, ["*", "control"]))
    original = signing.split(signing.sign_job("reports.x", "k1", PAYLOAD, KEY, T))[0].stamp
    later = T + 30 * DAY
    raw = signing.requeue_job("reports.x", "k1", PAYLOAD, original, "rec1", OTHER, later)
    d = decide("reports.x", "k1", raw, ops, later + 10)
    assert d.allowed and d.signer == "sched" and d.requeue_by == "ops" and d.requeue_of == "rec1"
    assert decide("reports.x", "k1", raw, ops, later + DAY + 1).reason == "too old"  # the note's age
    # the payload is the original's: another payload under the original signature is refused
    assert decide("reports.x", "k1", raw.replace(b"uname", b"reboo"), ops, later).reason == "bad signature"
    # the note is bound to the job's signature and the record id
    assert decide("reports.x", "k1", raw.replace(b'"of":"rec1"', b'"of":"rec2"'), ops, later).reason == "bad signature"


def test_a_requeue_note_by_a_signer_who_may_not_run_the_task_is_refused():
    t = trust(("sched", KEY, ["shell"]), ("viewer", OTHER, ["reports.*"]))
    original = signing.split(signing.sign_job("shell", "k", b"p", KEY, T))[0].stamp
    raw = signing.requeue_job("shell", "k", b"p", original, "r", OTHER, T + 10)
    assert decide("shell", "k", raw, t, T + 20).reason == "signer viewer may not run shell"


def test_a_forged_record_cannot_be_laundered_by_a_requeue():
    # a record whose "original signature" was made by no trusted key: the operator's note
    # does not make it runnable
    t = trust(("ops", OTHER, ["*"]))
    forged = signing.split(signing.sign_job("shell", "k", b"rm -rf", KEY, T))[0].stamp
    raw = signing.requeue_job("shell", "k", b"rm -rf", forged, "r", OTHER, T)
    assert decide("shell", "k", raw, t, T).reason == "unknown signer"
    unsigned_original = signing.Stamp(public_text(OTHER), T, "AAAA")
    raw = signing.requeue_job("shell", "k", b"rm -rf", unsigned_original, "r", OTHER, T)
    assert decide("shell", "k", raw, t, T).reason == "bad signature"


def test_messages_carry_their_purpose():
    t = trust(("ops", KEY, ["control"]), ("w1", OTHER, ["report"]))
    ping = signing.sign_message("control", b'{"op":"ping"}', KEY, T)
    assert verify_message("control", ping, t, T + 1) == ("ops", b'{"op":"ping"}')
    with pytest.raises(Refused, match="^bad signature$"):  # a control message is no report
        verify_message("report", ping, t, T)
    report = signing.sign_message("report", b"{}", OTHER, T)
    assert verify_message("report", report, t, T)[0] == "w1"
    with pytest.raises(Refused, match="^signer w1 may not answer$"):
        verify_message("answer", signing.sign_message("answer", b"{}", OTHER, T), t, T)
    with pytest.raises(Refused, match="^unsigned$"):
        verify_message("control", b'{"op":"ping"}', t, T)
    with pytest.raises(Refused, match="^too old$"):
        verify_message("control", ping, t, T + 61, max_age=60)
    with pytest.raises(Refused, match="^unknown signer$"):
        verify_message("control", ping, trust(("w1", OTHER, ["*", "control"])), T)
    with pytest.raises(Refused, match="^bad signature$"):
        verify_message("control", ping[:-2] + b"}}", t, T)
    # the words are never covered by '*'
    with pytest.raises(Refused, match="^signer any may not control$"):
        verify_message("control", ping, trust(("any", KEY, ["*"])), T)


@pytest.mark.parametrize("entries, key", [
    ("nope", "security.trust"),
    ([{"name": "a", "public_key": "rsa:xx", "may": ["*"]}], "security.trust[0].public_key"),
    ([{"name": "a", "public_key": "ed25519:AAAA", "may": ["*"]}], "security.trust[0].public_key"),
    ([{"name": "a b", "public_key": PUB}], "security.trust[0].name"),
    ([{"name": "a", "public_key": PUB, "may": [3]}], "security.trust[0].may"),
    ([{"name": "a", "public_key": PUB, "mai": ["*"]}], "security.trust[0].mai"),
    ([{"name": "a", "public_key": PUB}, {"name": "b", "public_key": PUB}], "security.trust[1].public_key"),
])
def test_a_bad_trust_list_names_the_entry(entries, key):
    with pytest.raises(ConfigError) as e:
        Trust.from_config(entries, "c.yaml")
    assert e.value.key == key and "\n" not in str(e.value)


def test_one_name_may_hold_an_old_and_a_new_key_during_a_rotation():
    t = Trust.from_config([{"name": "ops", "public_key": PUB, "may": ["*"]},
                           {"name": "ops", "public_key": public_text(OTHER), "may": ["*"]}])
    for k in (KEY, OTHER):
        assert decide("shell", "u", signing.sign_job("shell", "u", b"", k, T), t, T).signer == "ops"


def test_hostile_function_names_are_escaped_in_the_reason():
    fn = "evil\n\x1b[2Jtask"
    raw = signing.sign_job(fn, "u", b"", KEY, T)
    reason = decide(fn, "u", raw, trust(("ops", KEY, ["shell"])), T).reason
    assert reason == "signer ops may not run evil\\n\\x1b[2Jtask"


def test_hostile_bytes_in_the_function_unique_and_line_are_handled():
    t = trust(("ops", KEY, ["*"]))
    fn = b"\xff\xfe task"  # not UTF-8: signed and checked byte for byte
    raw = signing.sign_job(fn, b"\x00u", b"p", KEY, T)
    assert decide(fn, b"\x00u", raw, t, T).allowed
    assert decide(b"\xff\xfd task", b"\x00u", raw, t, T).reason == "bad signature"
    long_line = signing.SIG_MAGIC + b'{"key":"' + b"A" * 5000 + b'"}\n'
    assert decide("shell", "u", long_line, t, T).reason == "bad signature"
    for line in (b"[]", b'{"key":1,"t":1,"sig":"x"}', b'{"key":"k","t":true,"sig":"x"}',
                 b'{"key":"k","t":-1,"sig":"x"}', b'{"key":"k","t":1,"sig":"x","rq":[]}',
                 b'{"key":"k","t":1,"sig":"x","rq":{"key":"k","t":1,"sig":"x"}}', b"\xff"):
        assert decide("shell", "u", signing.SIG_MAGIC + line + b"\npayload", t, T).reason == "bad signature"
