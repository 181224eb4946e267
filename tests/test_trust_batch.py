"""Jobs signed in a group (geartask.trust.signing.sign_jobs): one signature over a Merkle root,
a path per job, a worker's verified-root cache. Pure logic with the documented key and a fixed
clock, then a real gearmand, a real require_signed worker and a real signing sender.

The vector is the one in docs/outcomes.md ("Jobs signed in a group")."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import uuid

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import gearclient as gc

from geartask import gearman as gp, load_config
from geartask.outcomes.record import make_record
from geartask.outcomes.signed import original, requeue_payload
from geartask.sender.sender import JobSender
from geartask.trust import signing
from geartask.trust.keys import public_text
from geartask.trust.policy import Refused, Trust, decide, verify_message
from geartask.worker.trust import Signed
from helpers import REPO, wait_until, write_config
from test_trust_worker import keys, security_yaml  # noqa: F401  (keys: a fixture)
from test_worker import TEST_PLUGINS
from workers import WorkerProc

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))  # the documented test key
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
T = 1765000000
PAYLOAD = b'\x1egeartask/1 {"bg":true,"retries":1}\n{"cmd": ["uname", "-a"]}'
VECTOR_JOBS = [("shell", "job-1", PAYLOAD), ("shell", "job-2", b'{"cmd": ["true"]}'),
               ("shell", "job-3", b'{"cmd": ["false"]}')]
VECTOR_ROOT = "86cdc05b518acca5981a02ea93264960db8dee164e4af54bbd4e1bf19e529739"
VECTOR_SIG = "nbJYToPZyTJhd4TWouliBayE0S77tFwy5NY5AMjXGH5KADYJQkCoki1kqV2Zf8hCYTSgv9Ss5KF5iXG/zhL2CQ=="
VECTOR_MP3 = "28G0yQD/5I1XW12lxjgEASX2XbD+PiRJS3bqmGRX2YYSxyTaIlYxfZsRWuBOOIBBMXDBDpjiMomknrC9g1zHsA=="


def trust(*entries) -> Trust:
    return Trust.from_config([{"name": n, "public_key": public_text(k), "may": may} for n, k, may in entries])


OPS = trust(("ops", KEY, ["*"]))


def group(n: int, key=KEY, t: int = T, task: str = "shell") -> list[tuple[str, str, bytes, bytes]]:
    """n jobs signed together, each (function, unique, payload, signed bytes); uniques never
    seen before, so no root is in the cache yet."""
    tag = uuid.uuid4().hex[:8]
    items = [(task, f"{tag}-{i}", b'{"cmd": ["echo", "%d"]}' % i) for i in range(n)]
    return [(f, u, p, raw) for (f, u, p), raw in zip(items, signing.sign_jobs(items, key, t), strict=True)]


def reason(raw: bytes, function: str = "shell", unique: str = "", now: float = T, t: Trust = OPS) -> str | None:
    d = decide(function, unique, raw, t, now)
    return None if d.allowed else d.reason


def line_of(raw: bytes) -> dict:
    return json.loads(raw[len(signing.SIG_MAGIC):raw.index(b"\n")])


def with_line(raw: bytes, **changes) -> bytes:
    """``raw`` with fields of its signature line changed (None: removed)."""
    fields = {**line_of(raw), **changes}
    fields = {k: v for k, v in fields.items() if v is not None}
    return signing.SIG_MAGIC + json.dumps(fields, separators=(",", ":")).encode() + raw[raw.index(b"\n"):]


def path_of(raw: bytes) -> bytes:
    return base64.b64decode(line_of(raw)["mp"])


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- the form ------------------------------------------------------------------------------------
def test_the_documented_group_vector():
    """The tree rule computed here from its definition, not by signing.py."""
    def h(*parts: bytes) -> bytes:
        return hashlib.sha256(b"".join(parts)).digest()
    leaves = [h(b"\x00", signing.job_bytes(f, u, p, T)) for f, u, p in VECTOR_JOBS]
    empty = h(b"\x02")
    left, right = h(b"\x01", leaves[0], leaves[1]), h(b"\x01", leaves[2], empty)
    root = h(b"\x01", left, right)
    assert root.hex() == VECTOR_ROOT
    assert signing.batch_bytes(root, T) == (
        b"14:geartask-sig/1,5:batch,10:1765000000,64:" + VECTOR_ROOT.encode() + b",")
    out = signing.sign_jobs(VECTOR_JOBS, KEY, T)
    head = (b'\x1egeartask-sig/1 {"key":"ed25519:A6EHv/POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg=",'
            b'"t":1765000000,"sig":"' + VECTOR_SIG.encode() + b'",')
    assert out[2] == head + b'"mi":2,"mp":"' + VECTOR_MP3.encode() + b'"}\n' + b'{"cmd": ["false"]}'
    assert base64.b64decode(VECTOR_MP3) == empty + left  # leaf level first
    assert out[0].startswith(head + b'"mi":0,"mp":"' + b64(leaves[1] + right).encode() + b'"}\n')
    KEY.public_key().verify(base64.b64decode(VECTOR_SIG), signing.batch_bytes(root, T))  # plain Ed25519
    documented = (REPO / "docs" / "outcomes.md").read_text()
    assert signing.batch_bytes(root, T).decode() in documented
    assert out[2][:out[2].index(b"\n")].decode().replace("\x1e", "\\x1e") + "\\n" in documented


@pytest.mark.parametrize("n", [2, 3, 5, 32])
def test_every_job_of_a_group_verifies_and_names_its_signer(n):
    jobs = group(n)
    assert len({line_of(raw)["sig"] for *_, raw in jobs}) == 1  # one signature
    assert [line_of(raw)["mi"] for *_, raw in jobs] == list(range(n))
    depth = (n - 1).bit_length()
    assert all(len(path_of(raw)) == 32 * depth for *_, raw in jobs)
    for f, u, p, raw in jobs:
        d = decide(f, u, raw, OPS, T + 5)
        assert d.allowed and d.signer == "ops" and d.signed_at == T and d.payload == p


def test_a_group_of_one_is_signed_as_sign_job_and_longer_lists_are_cut_into_groups():
    assert signing.sign_jobs([("shell", "job-1", PAYLOAD)], KEY, T) == [signing.sign_job("shell", "job-1", PAYLOAD, KEY, T)]
    assert signing.sign_jobs([], KEY, T) == []
    items = [("shell", f"u{i}", b"p%d" % i) for i in range(signing.GROUP * 2 + 1)]
    out = signing.sign_jobs(items, KEY, T)
    sigs = [line_of(raw)["sig"] for raw in out]
    assert len(set(sigs[:signing.GROUP])) == 1 and len(set(sigs[signing.GROUP:-1])) == 1 and sigs[0] != sigs[-2]
    assert "mp" not in line_of(out[-1])  # the last group holds one job: today's form
    assert all(decide(f, u, raw, OPS, T).allowed for (f, u, _), raw in zip(items, out, strict=True))


def test_the_line_round_trips_through_split_and_encode():
    for _, _, p, raw in group(5):
        line, rest = signing.split(raw)
        assert rest == p and line.stamp.mi is not None and line.encode() + rest == raw
        assert line.stamp.to_dict() == line_of(raw)


# -- what is refused -----------------------------------------------------------------------------
def changed_path(raw: bytes, path: bytes) -> bytes:
    return with_line(raw, mp=b64(path))


ATTACKS = {
    "payload byte": lambda jobs: (jobs[1][3][:-2] + b"9" + jobs[1][3][-1:], jobs[1][0], jobs[1][1]),
    "function": lambda jobs: (jobs[1][3], "shell2", jobs[1][1]),
    "unique": lambda jobs: (jobs[1][3], jobs[1][0], jobs[2][1]),
    "mi": lambda jobs: (with_line(jobs[1][3], mi=3), jobs[1][0], jobs[1][1]),
    "mi of the neighbour": lambda jobs: (with_line(jobs[1][3], mi=0), jobs[1][0], jobs[1][1]),
    "one sibling": lambda jobs: (changed_path(jobs[1][3], bytes([path_of(jobs[1][3])[0] ^ 1]) + path_of(jobs[1][3])[1:]),
                                 jobs[1][0], jobs[1][1]),
    "path truncated by a hash": lambda jobs: (changed_path(jobs[1][3], path_of(jobs[1][3])[:-32]), jobs[1][0], jobs[1][1]),
    "path extended by a hash": lambda jobs: (changed_path(jobs[1][3], path_of(jobs[1][3]) + bytes(32)),
                                             jobs[1][0], jobs[1][1]),
    "path not whole hashes": lambda jobs: (changed_path(jobs[1][3], path_of(jobs[1][3])[:-1]), jobs[1][0], jobs[1][1]),
    "t": lambda jobs: (with_line(jobs[1][3], t=T + 1), jobs[1][0], jobs[1][1]),
    "mp without mi": lambda jobs: (with_line(jobs[1][3], mi=None), jobs[1][0], jobs[1][1]),
    "mi without mp": lambda jobs: (with_line(jobs[1][3], mp=None), jobs[1][0], jobs[1][1]),
    "a path dropped": lambda jobs: (with_line(jobs[1][3], mi=None, mp=None), jobs[1][0], jobs[1][1]),
    "mi a bool": lambda jobs: (with_line(jobs[1][3], mi=True), jobs[1][0], jobs[1][1]),
    "mi negative": lambda jobs: (with_line(jobs[1][3], mi=-1), jobs[1][0], jobs[1][1]),
    "mi past the tree": lambda jobs: (with_line(jobs[0][3], mi=8), jobs[0][0], jobs[0][1]),
    "mi a string": lambda jobs: (with_line(jobs[1][3], mi="1"), jobs[1][0], jobs[1][1]),
    "mp empty": lambda jobs: (with_line(jobs[1][3], mp=""), jobs[1][0], jobs[1][1]),
    "mp not base64": lambda jobs: (with_line(jobs[1][3], mp="!" + line_of(jobs[1][3])["mp"][1:]), jobs[1][0], jobs[1][1]),
    "mp not canonical base64": lambda jobs: (with_line(jobs[1][3], mp=line_of(jobs[1][3])["mp"][:-1] + "="),
                                             jobs[1][0], jobs[1][1]),
    "mp a list": lambda jobs: (with_line(jobs[1][3], mp=[1]), jobs[1][0], jobs[1][1]),
    "depth 17": lambda jobs: (with_line(jobs[1][3], mi=1, mp=b64(bytes(32 * 17))), jobs[1][0], jobs[1][1]),
}


@pytest.mark.parametrize("attack", ATTACKS)
def test_a_changed_group_job_is_refused_as_bad_signature(attack):
    jobs = group(5)
    raw, function, unique = ATTACKS[attack](jobs)
    assert reason(raw, function, unique) == "bad signature"


def test_a_path_of_depth_17_is_a_format_error_and_16_is_read():
    raw = group(2)[0][3]
    with pytest.raises(signing.SignatureFormatError, match="'mp'"):
        signing.split(with_line(raw, mp=b64(bytes(32 * 17))))
    line, _ = signing.split(with_line(raw, mi=2 ** 16 - 1, mp=b64(bytes(32 * 16))))
    assert line.stamp.mi == 2 ** 16 - 1
    with pytest.raises(signing.SignatureFormatError, match="'mi'"):
        signing.split(with_line(raw, mi=2 ** 16, mp=b64(bytes(32 * 16))))


def test_a_job_moved_under_another_groups_signature_is_refused():
    a, b = group(4), group(4)
    f, u, _, raw = a[1]
    assert reason(raw, f, u) is None
    moved = with_line(raw, sig=line_of(b[1][3])["sig"])  # its leaf and path, b's signature
    assert reason(moved, f, u) == "bad signature"
    # with b's whole line (sig and path): its leaf is not in b's tree
    assert reason(b[1][3][:b[1][3].index(b"\n") + 1] + a[1][2], f, u) == "bad signature"


def test_a_group_signature_is_not_a_job_signature_nor_a_message():
    f, u, p, raw = group(2)[0]
    plain = with_line(raw, mi=None, mp=None)  # the group's sig as if over the job alone
    assert reason(plain, f, u) == "bad signature"
    control = trust(("ops", KEY, ["*", "control"]))
    ping = signing.sign_message("control", b'{"op":"ping"}', KEY, T)
    with pytest.raises(Refused, match="^bad signature$"):  # a message never carries a path
        verify_message("control", with_line(ping, mi=0, mp=line_of(raw)["mp"]), control, T)


# -- the cache -----------------------------------------------------------------------------------
def verifies(fn) -> int:
    before = signing.VerifyStats.verified
    fn()
    return signing.VerifyStats.verified - before


def test_a_group_of_32_costs_one_verification():
    jobs = group(32)
    assert verifies(lambda: [decide(f, u, raw, OPS, T) for f, u, _, raw in jobs]) == 1
    assert all(decide(f, u, raw, OPS, T).allowed for f, u, _, raw in jobs)  # again: none
    assert verifies(lambda: [decide(f, u, raw, OPS, T) for f, u, _, raw in jobs]) == 0
    assert verifies(lambda: [decide(f, u, raw, OPS, T) for f, u, _, raw in group(1)]) == 1  # alone: as today


def test_threads_taking_a_groups_jobs_at_once_verify_it_once():
    """A worker's threads start on a group's jobs together: one verifies, the rest wait for it
    (a forged job among them, its own root, is verified and refused apart)."""
    jobs = group(32)
    f, u, _, raw = jobs[7]
    forged = (f, u, b"", raw[:raw.index(b"\n") + 1] + b"forged")
    start = threading.Barrier(8)
    answers: dict[int, str | None] = {}

    def work(k: int) -> None:
        start.wait(10)
        for i in range(k, 33, 8):
            function, unique, _, data = (jobs + [forged])[i]
            answers[i] = reason(data, function, unique)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    assert verifies(lambda: ([t.start() for t in threads], [t.join(30) for t in threads])) == 2
    assert [answers[i] for i in range(32)] == [None] * 32 and answers[32] == "bad signature"


def test_a_verified_root_does_not_let_a_forged_job_in():
    jobs = group(4)
    assert all(reason(raw, f, u) is None for f, u, _, raw in jobs)
    f, u, _, raw = jobs[2]
    # same key, t and sig, another payload: its path leads to another root, which is verified (and fails)
    forged = raw[:raw.index(b"\n") + 1] + b'{"cmd": ["rm", "-rf", "/"]}'
    assert verifies(lambda: reason(forged, f, u) == "bad signature") == 1
    assert reason(forged, f, u) == "bad signature"  # a failure is never remembered as a success
    forged_path = changed_path(raw, bytes(32) + path_of(raw)[32:])
    assert reason(forged_path, f, u) == "bad signature"


def test_a_bad_group_first_does_not_spoil_the_good_one():
    jobs = group(4)
    f, u, _, raw = jobs[0]
    for bad in (raw[:-1] + b"X", changed_path(raw, path_of(raw)[::-1]), with_line(raw, mi=1)):
        assert reason(bad, f, u) == "bad signature"
    assert verifies(lambda: [reason(r, f, u) for f, u, _, r in jobs]) == 1
    assert all(reason(r, f, u) is None for f, u, _, r in jobs)


def test_a_cached_root_still_checks_the_signer_its_rights_and_each_jobs_age():
    jobs = group(3, task="reports.daily")
    both = trust(("ops", KEY, ["*"]), ("other", OTHER, ["*"]))
    assert all(reason(raw, f, u, t=both) is None for f, u, _, raw in jobs)
    f, u, _, raw = jobs[1]
    assert reason(raw, f, u, now=T + 86400 + 1, t=both) == "too old"
    assert reason(raw, f, u, t=trust(("viewer", KEY, ["shell"]))) == "signer viewer may not run reports.daily"
    assert reason(raw, f, u, t=trust(("other", OTHER, ["*"]))) == "unknown signer"
    claimed = with_line(raw, key=public_text(OTHER))  # same sig and root, another trusted key
    assert reason(claimed, f, u, t=both) == "bad signature"


# -- requeue -------------------------------------------------------------------------------------
def test_a_group_job_requeued_keeps_its_path_and_verifies_again():
    jobs = group(5, task="reports.x")
    f, u, p, raw = jobs[3]
    stamp = signing.split(raw)[0].stamp
    later = T + 30 * 86400
    requeued = signing.requeue_job(f, u, p, stamp, "rec1", OTHER, later)
    t = trust(("sched", KEY, ["reports.*"]), ("ops", OTHER, ["*"]))
    d = decide(f, u, requeued, t, later + 10)
    assert d.allowed and d.signer == "sched" and d.requeue_by == "ops" and d.line.stamp == stamp
    assert len(requeued) - len(p) < signing.MAX_LINE  # a requeued group line fits where lines are read
    assert decide(f, u, requeued.replace(b'"mi":3', b'"mi":2'), t, later).reason == "bad signature"
    # the note on another job of the group (same signature): the note covers the unique key
    note = signing.split(requeued)[0].requeue
    f4, u4, p4, raw4 = jobs[4]
    assert decide(f4, u4, signing.SigLine(signing.split(raw4)[0].stamp, note).encode() + p4, t, later).reason \
        == "bad signature"
    assert decide(f4, u4, signing.requeue_job(f4, u4, p4, signing.split(raw4)[0].stamp, "rec1", OTHER, later), t,
                  later).allowed


def test_a_requeue_note_fits_only_its_position_in_the_group_even_for_the_same_unique_key():
    """Two jobs of one group with the same function and unique key (gearmand would coalesce
    them; a sender may still sign both): the note for one does not carry the other's payload."""
    items = [("reports.x", "same", b'{"n": 1}'), ("reports.x", "same", b'{"n": 2}'), ("reports.x", "u3", b"{}")]
    raws = signing.sign_jobs(items, KEY, T)
    later = T + 30 * 86400
    t = trust(("sched", KEY, ["reports.*"]), ("ops", OTHER, ["*"]))
    first, second = (signing.split(r)[0].stamp for r in raws[:2])
    requeued = signing.requeue_job("reports.x", "same", b'{"n": 1}', first, "rec1", OTHER, later)
    assert decide("reports.x", "same", requeued, t, later).allowed
    note = signing.split(requeued)[0].requeue
    swapped = signing.SigLine(second, note).encode() + b'{"n": 2}'  # the other job, under the first's note
    assert signing.split(raws[1])[0].stamp.sig == first.sig  # one signature for the group
    assert decide("reports.x", "same", swapped, t, later).reason == "bad signature"


def test_a_failed_group_jobs_record_is_resent_with_its_path():
    """What the worker keeps (Signed.fields) and failed requeue (outcomes.signed) carry mi/mp."""
    t = trust(("admin", KEY, ["*"]))
    f, u, p, raw = group(3)[2]
    decision = decide(f, u, raw, t, T)
    kept = Signed(decision, raw[:len(raw) - len(p)], p).fields(p, failed=True)
    rec = make_record(server="s", handle="h", task=f, unique=u, state="failed", data=p, **kept)
    stamp, rest = original(rec)
    assert stamp.mi == 2 and stamp.mp == line_of(raw)["mp"] and signing.SigLine(stamp).encode() + rest == raw
    again = requeue_payload(rec, OTHER, trust(("admin", KEY, ["*"]), ("ops", OTHER, ["*"])), t=T + 60)
    assert b'"mi":2' in again and decide(f, u, again, trust(("admin", KEY, ["*"]), ("ops", OTHER, ["*"])), T + 70).allowed


# -- end to end ----------------------------------------------------------------------------------
@pytest.fixture
def signed_worker(fresh_gearmand, tmp_path, keys):  # noqa: F811
    """(address, worker) with security.require_signed, trusting the test keys."""
    extra = "worker:\n  poll_timeout: 1\n" + security_yaml(keys, True)
    cfg = write_config(tmp_path / "w" / "config.yaml", [fresh_gearmand.address], extra,
                       plugin_paths=[REPO / "plugins", TEST_PLUGINS])
    w = WorkerProc(cfg, "bw", 2)
    try:
        yield fresh_gearmand.address, w.wait_attached([fresh_gearmand.address])
    finally:
        w.stop()


def test_a_signing_sender_s_batch_runs_each_job_once_on_a_require_signed_worker(signed_worker, keys, tmp_path):  # noqa: F811
    address, _ = signed_worker
    sender_cfg = write_config(tmp_path / "s" / "config.yaml", [address], security_yaml(keys, False, key="admin"))
    ran = tmp_path / "ran.jsonl"
    jobs = [{"task": "t.record", "data": {"file": str(ran), "id": i}, "unique": f"b-{i}"} for i in range(100)]
    with JobSender(load_config(sender_cfg)) as sender:
        results = list(sender.stream(jobs, timeout=120))
    assert sorted(r.state for r in results) == ["complete"] * 100, [r.error for r in results if r.state != "complete"][:3]
    lines = [json.loads(line) for line in ran.read_text().splitlines()]
    assert sorted(line["unique"] for line in lines) == sorted(f"b-{i}" for i in range(100))  # each once


def test_a_tampered_job_in_a_group_is_refused_and_the_rest_run(signed_worker, keys, tmp_path):  # noqa: F811
    address, _ = signed_worker
    ran = tmp_path / "ran.jsonl"
    items = [("t.record", f"g-{i}", json.dumps({"file": str(ran), "id": i}).encode()) for i in range(8)]
    signed = signing.sign_jobs(items, keys["admin"][0])
    assert all(b'"mp":' in raw for raw in signed)
    signed[5] = signed[5].replace(b'"id": 5', b'"id": 55')
    conn = gc.connect(address)
    try:
        handles = gc.submit(conn, "t.record", signed, uniques=[u for _, u, _ in items])
        outcomes = gc.wait(conn, handles, 60)
    finally:
        conn.close()
    by_unique = dict(zip([u for _, u, _ in items], (outcomes[h] for h in handles), strict=True))
    assert by_unique["g-5"].state == "failed" and by_unique["g-5"].reason["error"] == "bad signature", by_unique["g-5"]
    assert all(o.state == "complete" for u, o in by_unique.items() if u != "g-5"), by_unique
    wait_until(lambda: ran.exists() and len(ran.read_text().splitlines()) == 7, 10, message="7 jobs ran")
    assert sorted(json.loads(line)["id"] for line in ran.read_text().splitlines()) == [0, 1, 2, 3, 4, 6, 7]


def test_a_signing_sender_signs_its_jobs_in_groups_of_32(fresh_gearmand, keys, tmp_path):  # noqa: F811
    """What gearmand holds from a signing sender's 40 background jobs: 32 under one signature
    (paths of 5 hashes), 8 under another (3), each verifying with its own job."""
    address = fresh_gearmand.address
    sender_cfg = write_config(tmp_path / "s" / "config.yaml", [address], security_yaml(keys, False, key="admin"))
    with JobSender(load_config(sender_cfg)) as sender:
        results = list(sender.stream([{"task": "t.nobody", "data": {"i": i}, "unique": f"s-{i}"} for i in range(40)],
                                     wait=False, timeout=60))
    assert [r.state for r in results] == ["queued"] * 40
    conn = gc.connect(address)
    held: dict[str, bytes] = {}
    try:
        conn.send(gp.CAN_DO, task="t.nobody")
        for _ in range(40):
            conn.send(gp.GRAB_JOB_UNIQ)
            pkt = conn.expect(gp.JOB_ASSIGN_UNIQ, 10)
            held[pkt.text("unique")] = pkt["data"]
    finally:
        conn.close()
    lines = [line_of(held[f"s-{i}"]) for i in range(40)]
    assert len({line["sig"] for line in lines[:32]}) == 1 and len({line["sig"] for line in lines[32:]}) == 1
    assert [line["mi"] for line in lines] == list(range(32)) + list(range(8))
    assert [len(base64.b64decode(line["mp"])) // 32 for line in lines] == [5] * 32 + [3] * 8
    admin = Trust.from_config([{"name": "admin", "public_key": keys["admin"][1], "may": ["*"]}])
    assert verifies(lambda: [decide("t.nobody", u, raw, admin, lines[0]["t"]) for u, raw in held.items()]) == 2
    assert all(decide("t.nobody", u, raw, admin, lines[0]["t"]).signer == "admin" for u, raw in held.items())


def test_a_path_in_non_canonical_base64_is_refused():
    """Base64 whose unused bits are set decodes to the same hashes: still refused, so one path
    has one spelling (a line is kept and compared as text)."""
    import string
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"
    f, u, _, raw = group(2)[0]
    mp = line_of(raw)["mp"]
    assert len(mp) == 44 and mp.endswith("=")  # 32 bytes: the last character has 2 unused bits
    last = alphabet.index(mp[-2])
    odd = mp[:-2] + alphabet[last ^ 1] + "="
    assert base64.b64decode(odd) == base64.b64decode(mp)
    with pytest.raises(signing.SignatureFormatError, match="'mp'"):
        signing.split(with_line(raw, mp=odd))
    assert reason(with_line(raw, mp=odd), f, u) == "bad signature"
