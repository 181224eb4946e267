"""Signed jobs, control and outcomes on the receiving side (issue 19 Must 4 and 5): real
gearmand, real worker processes, a real collector; jobs submitted by raw clients, signed in
the test with geartask.trust.signing."""

from __future__ import annotations

import json
import time

import pytest

import gearclient as gc
from geartask import load_config
from geartask.control import ping_request, shutdown_request, signed_request, stop_request
from geartask.envelope import wrap
from geartask.outcomes.answers import RogueAnswer, open_answer, sign_answer, sign_request
from geartask.outcomes.client import OutcomeClient
from geartask.outcomes.record import OUTCOME_FUNCTION, QUERY_FUNCTION, make_record, outcome_jobs
from geartask.outcomes.signed import NotResendable, original, requeue_payload
from geartask.trust import policy, signing
from geartask.trust.keys import new_key
from helpers import REPO, wait_until, write_config
from test_outcomes_collector import collector_config, collectors, reader_config  # noqa: F401
from test_worker import TEST_PLUGINS
from test_worker_control import control_function
from workers import WorkerProc


def security_yaml(keys: dict, require: bool, key: str | None = "worker", max_age: int = 3600) -> str:
    may = {"admin": ["*", "control"], "ops": ["reports.*"], "worker": ["report"]}
    lines = ["security:", f"  require_signed: {'true' if require else 'false'}", f"  max_job_age: {max_age}"]
    if key:
        lines.append(f"  key: {keys[key][2]}")
    lines.append("  trust:")
    for name, (_, pub, _) in keys.items():
        lines += [f"    - name: {name}", f"      public_key: \"{pub}\"", f"      may: {json.dumps(may[name])}"]
    return "\n".join(lines) + "\n"


@pytest.fixture
def keys(tmp_path):
    out = {}
    for name in ("admin", "ops", "worker"):
        path = tmp_path / "keys" / f"{name}.key"
        path.parent.mkdir(exist_ok=True)
        key, pub = new_key(path)
        out[name] = (key, pub, str(path))
    return out


@pytest.fixture
def secured(fresh_gearmand, tmp_path, collectors, keys):
    """(server address, start_worker(require), outcome client, collector): a collector
    with require_signed on, trusting the same keys."""
    srv = fresh_gearmand
    collector = collectors(collector_config(tmp_path, [srv.address], security_yaml(keys, True, key=None)),
                           [srv.address])
    started: list[WorkerProc] = []

    def start_worker(require: bool = True, name: str = "tw", host: str | None = None) -> WorkerProc:
        extra = ("worker:\n  poll_timeout: 1\n  shell:\n    allow: [touch, echo]\n"
                 + (f"  host: {host}\n" if host else "") + security_yaml(keys, require))
        cfg = write_config(tmp_path / name / "config.yaml", [srv.address], extra,
                           plugin_paths=[REPO / "plugins", TEST_PLUGINS])
        w = WorkerProc(cfg, name, 2)
        started.append(w)
        return w.wait_attached([srv.address])

    client = OutcomeClient(load_config(reader_config(tmp_path, [srv.address])), timeout=10)
    yield srv.address, start_worker, client, collector
    for w in started:
        w.stop()


def submit_raw(address: str, task: str, unique: str, payload: bytes):
    """A foreground job with exactly these bytes; its Outcome."""
    conn = gc.connect(address)
    try:
        handles = gc.submit(conn, task, [payload], uniques=[unique])
        return gc.wait(conn, handles, 30)[handles[0]]
    finally:
        conn.close()


def outcome_of(client: OutcomeClient, unique: str) -> dict:
    found: list = []
    wait_until(lambda: found.append(client.latest(unique=unique)) or found[-1], 15,
               message=f"outcome of {unique}")
    return client.get(found[-1]["id"])


def touch_job(marker) -> bytes:
    return json.dumps({"cmd": ["touch", str(marker)]}).encode()


def test_unsigned_and_unauthorised_jobs_never_run_and_their_refusals_are_outcomes(secured, keys, tmp_path):
    address, start_worker, client, _ = secured
    start_worker()
    now = time.time()
    cases = {  # unique -> (payload as submitted, the refusal)
        "unsigned": (touch_job(tmp_path / "m-unsigned"), "unsigned"),
        "ops": (signing.sign_job("shell", "ops", touch_job(tmp_path / "m-ops"), keys["ops"][0]),
                "signer ops may not run shell"),
        "old": (signing.sign_job("shell", "old", touch_job(tmp_path / "m-old"), keys["admin"][0], t=now - 7200),
                "too old"),
        "tampered": (signing.sign_job("shell", "tampered", touch_job(tmp_path / "m-ta"), keys["admin"][0])
                     .replace(b"m-ta", b"m-tb"), "bad signature"),
    }
    for unique, (payload, reason) in cases.items():
        o = submit_raw(address, "shell", unique, payload)
        assert o.state == "failed" and o.reason["error"] == reason and o.reason["refused"] is True, (unique, o)
        rec = outcome_of(client, unique)
        assert rec["state"] == "failed" and rec["reason"]["error"] == reason and rec["attempts"] == 0, rec
        assert "signer" not in rec
    for marker in ("m-unsigned", "m-ops", "m-old", "m-ta", "m-tb"):
        assert not (tmp_path / marker).exists(), marker


def test_a_signed_job_runs_and_its_outcome_names_the_signer(secured, keys, tmp_path):
    address, start_worker, client, _ = secured
    start_worker()
    marker = tmp_path / "ran"
    payload = wrap(touch_job(marker), bg=False, retries=0)
    o = submit_raw(address, "shell", "good", signing.sign_job("shell", "good", payload, keys["admin"][0]))
    assert o.state == "complete", o
    assert marker.exists()
    # A failing signed job keeps its original signed bytes: failed requeue can resend them
    bad = wrap(json.dumps({"cmd": ["echo-nope"]}).encode(), retries=0)
    signed = signing.sign_job("shell", "fails", bad, keys["admin"][0])
    assert submit_raw(address, "shell", "fails", signed).state == "failed"
    rec = outcome_of(client, "fails")
    assert rec["signer"] == "admin"
    stamp, rest = original(rec)
    assert rest == bad and signing.SigLine(stamp).encode() + rest == signed
    # requeued with the original signature and a fresh note by admin: runs again (and fails again)
    trust = policy.trust_of(load_config(tmp_path / "tw" / "config.yaml"))
    again = requeue_payload(rec, keys["admin"][0], trust)
    forged = {**rec, "data": rec["data"].replace("echo-nope", "touch")}
    with pytest.raises(NotResendable, match="bad signature"):
        requeue_payload(forged, keys["admin"][0], trust)
    assert submit_raw(address, "shell", "fails", again).state == "failed"
    wait_until(lambda: len(client.history("fails")["records"]) >= 2, 15, message="the requeued run's outcome")
    requeued = [r for r in client.history("fails")["records"] if r["id"] != rec["id"]][0]
    assert requeued.get("requeue_of") == rec["id"] and requeued["signer"] == "admin"
    with pytest.raises(NotResendable):
        original(make_record(server="s", handle="h", task="shell", state="failed", data=b"x"))


def test_without_require_signed_a_signed_job_runs_and_the_task_sees_no_signature_line(secured, keys):
    address, start_worker, client, _ = secured
    start_worker(require=False, name="open")
    o = submit_raw(address, "eg.reverse", "rev", signing.sign_job("eg.reverse", "rev", b"stressed", keys["ops"][0]))
    assert o.state == "complete" and o.result == {"reversed": "desserts"}, o
    # unsigned jobs run as today
    assert gc.run_one(address, "eg.reverse", "abc").state == "complete"


def test_control_needs_a_signature(secured, keys):
    address, start_worker, _, _ = secured
    w = start_worker()
    function = control_function(address, w.pid)
    for payload, reason in ((shutdown_request(), "unsigned"), (stop_request("H:nowhere:1"), "unsigned"),
                            (signed_request(shutdown_request(), function, keys["ops"][0]), "signer ops may not control"),
                            (signing.sign_message("control", shutdown_request(), keys["admin"][0]),
                             "not addressed to this worker ('to' missing)"),
                            (signed_request(shutdown_request(), function + "9", keys["admin"][0]),
                             "addressed to another worker")):
        o = gc.run_one(address, function, payload, timeout=10)
        assert o.state == "failed" and o.reason["error"] == f"control refused: {reason}", o
    reply = gc.run_one(address, function, signed_request(ping_request(), function, keys["admin"][0]), timeout=10)
    assert reply.state == "complete" and reply.result["control_refused"] == 5
    assert w.proc.poll() is None
    stop = gc.run_one(address, function, signed_request(stop_request("H:nowhere:1"), function, keys["admin"][0]),
                      timeout=10)
    assert stop.state == "complete" and stop.result["stopped"] is False
    o = gc.run_one(address, function, signed_request(shutdown_request(), function, keys["admin"][0]), timeout=10)
    assert o.state == "complete" and o.result["command"] == "shutdown"
    assert w.wait(30) == 0


def test_the_collector_stores_only_signed_reports(secured, keys):
    address, _, client, collector = secured
    conn = gc.connect(address)
    try:
        def report(unique: str, sign) -> None:
            rec = make_record(server=address, handle="H:x:1", task="shell", state="complete", unique=unique)
            (_, payload), = outcome_jobs([rec])
            gc.submit(conn, OUTCOME_FUNCTION, [sign(payload)], background=True, uniques=[f"o-{unique}"])
        report("forged-unsigned", lambda p: p)
        report("forged-ops", lambda p: signing.sign_message("report", p, keys["ops"][0]))
        report("forged-purpose", lambda p: signing.sign_message("control", p, keys["worker"][0]))
        report("signed", lambda p: signing.sign_message("report", p, keys["worker"][0]))
    finally:
        conn.close()
    assert outcome_of(client, "signed")["state"] == "complete"
    wait_until(lambda: gc.queued(address, OUTCOME_FUNCTION) == 0, 15)
    for unique in ("forged-unsigned", "forged-ops", "forged-purpose"):
        assert client.latest(unique=unique) is None, unique
    assert client.ping()["refused_reports"] == 3


def test_queries_that_change_the_store_must_be_signed(secured, keys):
    """import (for report), mark_requeued and purge (for control): unsigned or wrongly signed,
    refused and the store left alone; reading queries answered as today."""
    address, _, client, _ = secured

    def query(request: dict, sign=None):
        payload = json.dumps(request).encode()
        return gc.run_one(address, QUERY_FUNCTION, sign(payload) if sign else payload, timeout=15).result

    rec = make_record(server=address, handle="H:x:2", task="shell", state="failed", unique="imp")
    assert query({"op": "import", "records": [rec]}) == {"ok": False, "error": "import refused: unsigned"}
    ops = query({"op": "import", "records": [rec]}, lambda p: sign_request("import", p, keys["ops"][0]))
    assert ops == {"ok": False, "error": "import refused: signer ops may not report"}
    assert client.latest(unique="imp") is None
    ok = query({"op": "import", "records": [rec]}, lambda p: sign_request("import", p, keys["worker"][0]))
    assert ok["ok"] is True, ok
    assert client.latest(unique="imp")["state"] == "failed"
    for request in ({"op": "purge", "min_age": 0}, {"op": "mark_requeued", "id": rec["id"], "by": "eve"}):
        assert query(request) == {"ok": False, "error": f"{request['op']} refused: unsigned"}
    assert client.latest(unique="imp") is not None and not client.get(rec["id"]).get("requeues")
    signed = query({"op": "mark_requeued", "id": rec["id"], "by": "admin"},
                   lambda p: sign_request("mark_requeued", p, keys["admin"][0]))
    assert signed["ok"] is True and client.get(rec["id"])["requeues"][0]["by"] == "admin"
    assert client.ping()["refused_queries"] == 2


def test_signed_workers_reports_are_stored(secured, keys):
    """The worker signs its outcome jobs with security.key: the strict collector stores them."""
    address, start_worker, client, _ = secured
    start_worker()
    signed = signing.sign_job("eg.reverse", "bg1", wrap(b"abc", bg=True), keys["admin"][0])
    conn = gc.connect(address)
    try:
        gc.submit(conn, "eg.reverse", [signed], background=True, uniques=["bg1"])
    finally:
        conn.close()
    rec = outcome_of(client, "bg1")
    assert rec["state"] == "complete" and rec["signer"] == "admin"


def test_answers_are_believed_only_when_signed(keys):
    trust = policy.Trust.from_config([{"name": "coll", "public_key": keys["worker"][1], "may": ["answer"]},
                                      {"name": "ops", "public_key": keys["ops"][1], "may": ["reports.*"]}])
    body = b'{"ok":true,"result":1}'
    assert open_answer(sign_answer(body, keys["worker"][0]), trust, require_signed=True) == ("coll", body)
    assert open_answer(sign_answer(body, None), trust, require_signed=False) == (None, body)
    assert open_answer(sign_answer(body, keys["worker"][0]), trust, require_signed=False) == (None, body)
    for raw, reason in ((body, "unsigned"), (sign_answer(body, keys["ops"][0]), "signer ops may not answer"),
                        (sign_answer(body, keys["worker"][0]).replace(b"1}", b"2}"), "bad signature")):
        with pytest.raises(RogueAnswer) as e:
            open_answer(raw, trust, require_signed=True)
        assert e.value.reason == reason


def test_a_failed_signed_jobs_record_rebuilds_its_exact_signed_bytes(keys):
    """Pure: what the worker keeps (Signed.fields) gives back the signed bytes, unless cut."""
    from geartask.worker.trust import Signed
    trust = policy.Trust.from_config([{"name": "admin", "public_key": keys["admin"][1], "may": ["*"]}])
    payload = wrap(b"\xff binary \x00 data", retries=0, bg=True)
    raw = signing.sign_job("t", "u1", payload, keys["admin"][0], t=1000)
    decision = policy.decide("t", "u1", raw, trust, 1000.0)
    assert decision.allowed and decision.payload == payload
    data = payload[payload.index(b"\n") + 1:]
    kept = Signed(decision, raw[:len(raw) - len(payload)], payload).fields(data, failed=True)
    assert kept["signer"] == "admin" and kept["envelope"].endswith("\n")
    rec = make_record(server="s", handle="h", task="t", unique="u1", state="failed", data=data, **kept)
    stamp, rest = original(rec)
    assert signing.SigLine(stamp).encode() + rest == raw
    assert Signed(decision, b"", payload).fields(data, failed=False) == {"signer": "admin"}
    cut = make_record(server="s", handle="h", task="t", unique="u1", state="failed", data=data, max_result=4, **kept)
    with pytest.raises(NotResendable, match="cut"):
        original(cut)
    with pytest.raises(NotResendable, match="no security.key"):
        requeue_payload(rec, None, trust)
    other = policy.Trust.from_config([{"name": "ops", "public_key": keys["ops"][1], "may": ["*"]}])
    with pytest.raises(NotResendable, match="unknown signer"):
        requeue_payload(rec, keys["ops"][0], other)


def test_failed_requeue_with_trust_resends_the_original_signature_and_refuses_the_rest(secured, keys, tmp_path):
    """`manage failed requeue --yes` with security.key and a trust list: a failed signed job is
    sent again with its original signature and runs on a require_signed worker (its new outcome
    points back); an unsigned job the worker refused is not sent, with the reason."""
    import subprocess
    import sys
    address, start_worker, client, _ = secured
    start_worker()
    bad = wrap(json.dumps({"cmd": ["echo-nope"]}).encode(), retries=0)
    assert submit_raw(address, "shell", "fails-2", signing.sign_job("shell", "fails-2", bad, keys["admin"][0])) \
        .state == "failed"
    assert submit_raw(address, "shell", "unsigned-2", touch_job(tmp_path / "m-u2")).state == "failed"
    rec = outcome_of(client, "fails-2")
    outcome_of(client, "unsigned-2")
    operator = write_config(tmp_path / "operator" / "config.yaml", [address], security_yaml(keys, False, key="admin"))
    r = subprocess.run([sys.executable, str(REPO / "manage_client" / "manage_client.py"), "--config", str(operator),
                        "failed", "requeue", "fails-2", "unsigned-2", "--yes", "--json"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 1 and r.stdout, (r.stdout, r.stderr)
    done = {x["unique"]: x for x in json.loads(r.stdout)["requeued"]}
    assert done["fails-2"]["error"] is None and done["fails-2"]["handle"], done
    assert done["unsigned-2"]["handle"] is None and "refused" in done["unsigned-2"]["error"], done
    wait_until(lambda: len(client.history("fails-2")["records"]) >= 2, 15, message="the requeued run's outcome")
    again = next(x for x in client.history("fails-2")["records"] if x["id"] != rec["id"])
    assert again.get("requeue_of") == rec["id"] and again["signer"] == "admin", again
    assert not (tmp_path / "m-u2").exists()


def test_a_failed_targeted_job_is_requeued_to_its_host_under_its_signature(secured, keys, tmp_path):
    """A signed job for shell@host:web1 fails: its outcome keeps the function it came as, and
    `failed requeue` sends it back to shell@host:web1 with the original signature (which covers
    that name), where the require_signed worker of web1 runs it again. Before: the record said
    only "shell", and the requeue was refused as a bad signature (or, without trust, sent to
    any worker of shell)."""
    import subprocess
    import sys
    address, start_worker, client, _ = secured
    start_worker(host="web1")
    bad = wrap(json.dumps({"cmd": ["echo-nope"]}).encode(), retries=0)
    function = "shell@host:web1"
    assert submit_raw(address, function, "t-1", signing.sign_job(function, "t-1", bad, keys["admin"][0])) \
        .state == "failed"
    rec = outcome_of(client, "t-1")
    assert rec["task"] == "shell" and rec["function"] == function, rec
    operator = write_config(tmp_path / "operator" / "config.yaml", [address], security_yaml(keys, False, key="admin"))
    r = subprocess.run([sys.executable, str(REPO / "manage_client" / "manage_client.py"), "--config", str(operator),
                        "failed", "requeue", "t-1", "--yes", "--json"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, (r.stdout, r.stderr)
    (done,) = json.loads(r.stdout)["requeued"]
    assert done["error"] is None and done["handle"], done
    wait_until(lambda: len(client.history("t-1")["records"]) >= 2, 15, message="the requeued run's outcome")
    again = next(x for x in client.history("t-1")["records"] if x["id"] != rec["id"])
    again = client.get(again["id"])
    assert again.get("requeue_of") == rec["id"] and again["function"] == function and again["signer"] == "admin", again

