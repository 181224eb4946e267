"""Outcome records, the query protocol's checks, dead-letter conversion, config and durations:
the contracts of geartask.outcomes that need no server."""

from __future__ import annotations

import argparse
import base64
import json
import math

import pytest

from geartask.cli import duration
from geartask.config import _CHOICES, parse_config
from geartask.errors import ConfigError
from geartask.outcomes import BACKENDS, BadOutcome, check, decode_bytes, encode_batches, make_record, open_store
from geartask.outcomes.failed import ImportReport, from_dead_letter, read_dead_letters
from geartask.outcomes.query import MAX_LIST, Queries, Refused, check_request, parse_request
from geartask.outcomes.record import cap_record, resend_function
from geartask.worker.dead_letters import DeadLetters, payload_fields


def rec(**kw):
    base = dict(server="127.0.0.1:4730", handle="H:x:1", task="t", state="complete", unique="u1")
    base.update(kw)
    return make_record(**base)


# -- make_record: what a worker builds ----------------------------------------------------

def test_make_record_passes_check_with_every_field():
    r = rec(state="failed", started_at=100.0, finished_at=101.5, submitted_at=99.0, attempts=3, retries=2,
            background=True, worker="w1:10.0.0.1:42", host="h1", sender_host="s1", priority="high",
            result=b"out", reason={"error": "boom", "returncode": 1}, data=b'{"cmd":["false"]}', requeue_of="abc")
    assert check(r) == r
    assert r["duration"] == 1.5 and r["result_encoding"] == "text" and r["data_size"] == 17
    assert len(r["id"]) == 32 and rec()["id"] != r["id"]  # new by default: idempotent only when resent as is


def test_make_record_keeps_binary_as_base64_and_cuts_at_max_result():
    r = rec(result=b"\xff\xfe" * 10, max_result=7)
    assert r["result_encoding"] == "base64" and r["result_cut"] and r["result_size"] == 20
    assert decode_bytes(r, "result") == (b"\xff\xfe" * 10)[:7]
    text = "é" * 10  # 2 bytes each: a cut at 7 bytes splits a character, which is dropped whole
    r = rec(result=text.encode(), max_result=7)
    assert r["result_encoding"] == "text" and r["result"] == "ééé" and r["result_cut"] and r["result_size"] == 20
    r = rec(result=b"small", max_result=7)
    assert r["result"] == "small" and "result_cut" not in r


def test_make_record_cuts_a_large_reason_and_flags_it():
    r = rec(state="failed", reason={"error": "x", "output": "y" * 100}, max_result=50)
    assert r["reason_cut"] is True and isinstance(r["reason"], str) and len(r["reason"]) == 50
    assert check(r)["reason_cut"] is True
    r = rec(state="failed", reason={"error": float("nan")})  # JSON can't hold it: said so, not raised
    assert r["reason_cut"] and "JSON" in r["reason"]
    r = rec(state="failed", reason={"error": "bad \udc80 byte", "raw": b"\x00"})  # what a task may put there
    assert check(r)["reason"] == {"error": "bad ? byte", "raw": "b'\\x00'"}


def test_encode_batches_bounds_records_and_bytes():
    records = [rec(handle=f"H:x:{i}", result=b"r" * 100) for i in range(45)]
    payloads = list(encode_batches(records, max_records=20))
    assert [len(json.loads(p)) for p in payloads] == [20, 20, 5]
    payloads = list(encode_batches(records, max_records=20, max_bytes=1000))
    assert all(len(p) <= 1000 for p in payloads) and sum(len(json.loads(p)) for p in payloads) == 45
    big = rec(result=b"z" * 5000)
    assert [len(json.loads(p)) for p in encode_batches([big, big], max_bytes=1000)] == [1, 1]


def test_cap_record_cuts_what_the_worker_did_not():
    r = check(dict(rec(result=b"a" * 100, state="failed", reason="r" * 100),
                   data=base64.b64encode(b"\x00" * 100).decode(), data_encoding="base64"))
    capped = cap_record(r, 10)
    assert capped["result"] == "a" * 10 and capped["result_cut"] and capped["result_size"] == 100
    assert decode_bytes(capped, "data") == b"\x00" * 10 and capped["data_cut"] and capped["data_size"] == 100
    assert capped["reason_cut"] and len(capped["reason"]) <= 12
    small = check(rec(result=b"\x00" * 9))  # base64 of 9 bytes is 12 characters: not over 10 bytes
    assert cap_record(small, 10) is small


def _nested(depth):
    value = "x"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("bad, what", [
    (dict(priority="urgent"), "'priority'"),
    (dict(retries=-1), "'retries'"),
    (dict(result_size=1.5), "'result_size'"),
    (dict(result="!!notbase64", result_encoding="base64"), "base64"),
    (dict(reason=_nested(40)), "nested"),
    (dict(duration=math.inf), "'duration'"),
    (dict(reason_cut="yes"), "'reason_cut'"),
    (dict(unique="\ud800"), "'unique' is not Unicode text"),
    (dict(reason={"error": "\udfff"}), "'reason' is not Unicode text"),
    (dict(reason={"n": math.nan}), "NaN"),
    (dict(function=["shell@host:a"]), "'function' must be a string"),
])
def test_check_names_the_bad_field(bad, what):
    with pytest.raises(BadOutcome, match=what):
        check(dict(rec(), **bad))


def test_check_drops_unknown_keys_and_defaults_encoding():
    r = check(dict(rec(), newer_field=1, result="x"))
    assert "newer_field" not in r and r["result_encoding"] == "text"


def test_a_targeted_jobs_record_keeps_its_function_and_is_resent_there_only_when_it_targets_the_task():
    """The record's ``function`` comes from a peer: a requeue goes to it only when it is a valid
    target of the record's own task; anything else goes to the task, as before."""
    r = check(rec(task="shell", function="shell@host:web1"))
    assert r["function"] == "shell@host:web1" and resend_function(r) == "shell@host:web1"
    assert resend_function(rec(task="shell", function="shell@label:db")) == "shell@label:db"
    for function in ("reports.x@host:web1", "shell", "shell@host:bad host", "shell@host:", "shell@nowhere:x", None):
        assert resend_function(dict(rec(task="shell"), function=function)) == "shell", function
    assert "function" not in rec(task="shell")


# -- the query protocol's checks ------------------------------------------------------------

@pytest.mark.parametrize("raw, what", [
    (b"\xff", "not UTF-8"),
    (b"not json", "not JSON"),
    (b"[" * 100_000, "nested too deeply"),
    (b"[]", "JSON object"),
    (b'{"op": "drop"}', "unknown op"),
    (b'{"op": ["latest"]}', "unknown op"),
    (b'{}', "unknown op"),
    (b'{"op": "latest"}', "exactly one of 'unique', 'handle'"),
    (b'{"op": "latest", "unique": "a", "handle": "b"}', "exactly one"),
    (b'{"op": "latest", "unique": "a", "server": "s"}', "'server' goes with 'handle'"),
    (b'{"op": "latest", "unique": 5}', "'unique' must be a non-empty string"),
    (b'{"op": "latest", "unique": ""}', "'unique' must be a non-empty string"),
    (b'{"op": "get", "id": "' + b"x" * 65 + b'"}', "'id' is 65 characters"),
    (b'{"op": "get"}', "needs 'id'"),
    (b'{"op": "failed", "limit": 0}', "'limit' must be a whole number 1-1000"),
    (b'{"op": "failed", "limit": 1001}', "'limit'"),
    (b'{"op": "failed", "limit": true}', "'limit'"),
    (b'{"op": "failed", "since": NaN}', "'since' must be a finite number"),
    (b'{"op": "failed", "since": 1, "max_age": 2}', "at most one"),
    (b'{"op": "failed", "include_requeued": "yes"}', "true or false"),
    (b'{"op": "failed", "sql": "DROP TABLE"}', "unknown field 'sql'"),
    (b'{"op": "recent", "state": "weird"}', "'state' must be one of"),
    (b'{"op": "counts"}', "exactly one of 'since', 'max_age'"),
    (b'{"op": "purge"}', "exactly one of"),
    (b'{"op": "purge", "ids": []}', "'ids' must be a list of 1-"),
    (b'{"op": "purge", "ids": [1]}', r"'ids\[0\]'"),
    (b'{"op": "purge", "min_age": -1}', "'min_age'"),
    (b'{"op": "mark_requeued", "id": "a"}', "needs 'by'"),
    (b'{"op": "import", "records": {}}', "'records' must be a list"),
    (b'{"op": "latest", "unique": "\\ud800"}', "lone surrogate"),
])
def test_hostile_requests_are_refused_with_the_reason(raw, what):
    with pytest.raises(Refused, match=what):
        parse_request(raw)


def test_answers_never_raise_and_cut_what_they_carry(tmp_path):
    store = open_store("sqlite", tmp_path / "o.sqlite")
    q = Queries(store, max_result=10, info=lambda: {"collector": "me"})
    store.add([rec(unique="big", result=b"x" * 100)])
    for raw in (b"\xff", b"{", b'{"op": 1}', b"[" * 100_000):
        answer = json.loads(q.answer(raw))
        assert answer["ok"] is False and answer["error"]
    got = json.loads(q.answer(b'{"op": "latest", "unique": "big"}'))["result"]
    assert got["result"] == "x" * 10 and got["result_cut"] and got["result_size"] == 100
    assert json.loads(q.answer(b'{"op": "ping"}'))["result"] == {"collector": "me", "size": 1}
    imported = q.run(check_request({"op": "import", "records": [rec(unique="i"), {"id": "x"}, rec(unique="i2")]}))
    assert imported["added"] == 2 and imported["refused_count"] == 1 and "missing" in imported["refused"][0]["error"]
    store.close()


def test_list_answers_are_summaries_bounded_in_length(tmp_path):
    store = open_store("sqlite", tmp_path / "o.sqlite")
    store.add([rec(handle=f"H:x:{i}", state="failed", reason={"error": "e" * 1000}, data=b"d" * 100,
                   result=b"r") for i in range(MAX_LIST + 5)])
    answer = Queries(store, 1024).run(check_request({"op": "failed", "limit": MAX_LIST}))
    assert len(answer["records"]) == MAX_LIST and answer["more"] is True
    first = answer["records"][0]
    assert not {"result", "data", "reason"} & set(first) and len(first["error"]) <= 500
    store.close()


# -- dead-letter files: what `failed import` reads ----------------------------------------------

def test_dead_letters_written_by_the_worker_become_failed_outcomes(tmp_path):
    path = tmp_path / "dead-letter.jsonl"
    letters = DeadLetters(path)
    base = {"time": 1700000000.5, "task": "shell", "handle": "H:w:1", "reason": "command failed",
            "attempts": 3, "worker": "w1:10.0.0.1:9", "seconds": 0.25}
    letters.append({**base, "unique": "json", **payload_fields(b'{"cmd": ["false"]}', {"cmd": ["false"]})})
    letters.append({**base, "unique": "binary", **payload_fields(b"\xff\x00")})
    letters.append({**base, "unique": "cut", **payload_fields(b"a" * 100, limit=10)})
    outcome = rec(unique="record", state="failed", reason={"error": "x"})
    with open(path, "a") as f:
        f.write(json.dumps(outcome) + "\n")  # a worker that could reach no server writes the record itself
        f.write("{not json\n")
        f.write(json.dumps({"time": 1, "unique": "no-task"}) + "\n")
    report = ImportReport()
    records = {r["unique"]: r for r in read_dead_letters(path, report)}
    assert set(records) == {"json", "binary", "cut", "record"}
    assert report.refused == 2 and [n for n, _ in report.bad_lines] == [5, 6]
    assert "'task'" in report.bad_lines[1][1]
    j = records["json"]
    assert j["state"] == "failed" and j["reason"] == {"error": "command failed"} and j["attempts"] == 3
    assert json.loads(decode_bytes(j, "data")) == {"cmd": ["false"]} and j["finished_at"] == 1700000000.5
    assert decode_bytes(records["binary"], "data") == b"\xff\x00"
    assert records["cut"]["data_cut"] and records["cut"]["data_size"] == 100
    assert records["record"] == check(outcome)
    again = {r["unique"]: r["id"] for r in read_dead_letters(path, ImportReport())}
    assert again == {u: r["id"] for u, r in records.items()}  # the same ids: importing twice adds nothing


def test_a_dead_letter_that_is_no_record_is_named():
    with pytest.raises(BadOutcome, match="JSON object"):
        from_dead_letter([1], b"[1]")
    with pytest.raises(BadOutcome, match="hexadecimal"):
        from_dead_letter({"time": 1, "task": "t", "data_hex": "zz"}, b"x")


# -- config and durations -------------------------------------------------------------------

def test_outcomes_config_defaults_and_checks(tmp_path):
    cfg = parse_config({}, "c.yaml", tmp_path)
    assert cfg.outcomes.path == tmp_path / "var" / "outcomes.sqlite"
    assert (cfg.outcomes.keep_days, cfg.outcomes.max_result, cfg.outcomes.store) == (7.0, 1024 * 1024, "sqlite")
    assert set(_CHOICES["outcomes.store"]) == set(BACKENDS)
    for bad, what in (({"keep_days": 0}, "outcomes.keep_days: must be greater than 0"),
                      ({"max_result": 0}, "outcomes.max_result: must be greater than 0"),
                      ({"max_result": "1M"}, "outcomes.max_result: expected an integer"),
                      ({"store": "redis"}, "outcomes.store: must be one of sqlite"),
                      ({"keep_days": float("nan")}, "finite"),
                      ({"keep": 7}, "outcomes.keep: unknown key")):
        with pytest.raises(ConfigError, match=what):
            parse_config({"outcomes": bad}, "c.yaml", tmp_path)


def test_durations_are_parsed_strictly():
    assert [duration(t) for t in ("90s", "30m", "1h", "7d", "2w", "0.5h")] == [90, 1800, 3600, 604800, 1209600, 1800]
    for bad in ("1", "h", "0h", "-1h", "+1h", "1 h", "1H", "1e3h", "1_0h", "nanh", "infd", "1hh", "", "١h",
                "9999999999999d"):
        with pytest.raises(argparse.ArgumentTypeError, match="duration like 30m"):
            duration(bad)
