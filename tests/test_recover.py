"""`send recover` (issue 21 Must 4): the background jobs of a dead server without persistence,
sent again from the sender's record. Real gearmand processes, real workers, a real collector."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

import gearclient
from geartask import JobSender, gearman as gp, load_config
from geartask.errors import UsageError
from geartask.server import free_port, port_open
from geartask.sender.background import RECORD_DATA, recorded_data, recorded_fields
from geartask.sender.recover import EXIT_NOTHING, NothingRecorded, StillAnswering, plan, recover
from geartask.sender.routing import rendezvous
from helpers import REPO, run_script, wait_until, write_config
from test_outcomes_collector import collector_config, collectors  # noqa: F401  (collectors: a fixture)
from test_worker import TEST_PLUGINS
from workers import WorkerProc

SEND = "send_job_client/send_job_client.py"


def runs(path: Path) -> Counter:
    if not path.exists():
        return Counter()
    text = path.read_text()
    return Counter(json.loads(line)["unique"] for line in text[:text.rfind("\n") + 1].splitlines() if line.strip())


def queued(address: str, function: str) -> int:
    """gearmand's count of ``function``'s jobs (queued or running), from its admin status."""
    host, port = address.rsplit(":", 1)
    for line in gp.admin_command(host, int(port), "status"):
        fields = line.split("\t")
        if fields[0] == function:
            return int(fields[1])
    return 0


def uniques_for(server: str, servers: list[str], n: int, prefix: str) -> list[str]:
    """``n`` unique keys that rendezvous routing sends to ``server`` first."""
    out, i = [], 0
    while len(out) < n:
        u = f"{prefix}-{i}"
        if rendezvous(u, servers)[0] == server:
            out.append(u)
        i += 1
    return out


def record_line(server: str, unique: str, *, at: float | None = None, task: str = "t.record",
                data: bytes = b'{"x":1}', **kw) -> dict:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() if at is None else at))
    return {"time": stamp, "task": task, "unique": unique, "handle": f"H:dead:{unique}", "server": server,
            "priority": "normal", "host": "h", "pid": 1, **recorded_fields(data), **kw}


def write_record(config_path: Path, lines: list[dict | str]) -> Path:
    path = config_path.parent / "logs" / "sender-background.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def test_recover_resends_the_300_unfinished_of_500_jobs_of_a_killed_server_and_each_runs_once(
        tmp_path, gearmand_factory, collectors):  # noqa: F811
    """Must show: A (builtin queue) dies -9 with 500 recorded background jobs, 200 of them
    finished (outcomes stored); `send recover --server A` sends 300, skips 200, and each of the
    500 then ran exactly once."""
    a, b = gearmand_factory("builtin"), gearmand_factory("builtin")
    servers = [a.address, b.address]
    collectors(collector_config(tmp_path, servers), servers)
    sender_cfg = write_config(tmp_path / "sender" / "config.yaml", servers)
    worker_cfg = write_config(tmp_path / "w" / "config.yaml", servers, "worker:\n  poll_timeout: 1\n",
                              plugin_paths=[REPO / "plugins", TEST_PLUGINS])
    ran = tmp_path / "ran.jsonl"
    keys = uniques_for(a.address, servers, 500, "rc")
    jobs = [{"task": "t.record", "data": {"file": str(ran), "id": i}, "unique": u, "background": True}
            for i, u in enumerate(keys)]

    worker = WorkerProc(worker_cfg, "rcw1", 4).wait_attached(servers, 30)
    try:
        with JobSender(load_config(sender_cfg)) as sender:
            first = sender.submit_many(jobs[:200], wait=False)
        assert {(r.state, r.server) for r in first} == {("queued", a.address)}
        wait_until(lambda: len(runs(ran)) == 200, 60, 0.1, message="the first 200 jobs run")
        # their outcomes stored: what recover will ask (send status resolves them the same way)
        from geartask.sender.status_outcomes import OutcomeBatch
        batch = OutcomeBatch(load_config(sender_cfg).with_servers([b.address]))
        try:
            wait_until(lambda: all(batch.latest([(u, None, None) for u in keys[:200]])), 60, 0.2,
                       message="200 outcomes stored")
        finally:
            batch.close()
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0, worker.text()[-2000:]
    finally:
        worker.stop()

    with JobSender(load_config(sender_cfg)) as sender:  # no worker now: they stay queued on A
        rest = sender.submit_many(jobs[200:], wait=False)
    assert {(r.state, r.server) for r in rest} == {("queued", a.address)}
    assert queued(a.address, "t.record") == 300
    os.kill(a.pid(), signal.SIGKILL)  # the 300 queued jobs die with it: no persistence
    host, port = a.address.rsplit(":", 1)
    wait_until(lambda: not port_open(host, int(port), 0.2), 10, message="A gone")

    worker = WorkerProc(worker_cfg, "rcw2", 4).wait_attached([b.address], 30)
    try:
        r = run_script(SEND, "--config", str(sender_cfg), "recover", "--server", a.address, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"{a.address}: resent 300 (300 to {b.address}), skipped 200 as done, 0 undecided, 0 not resent" \
            in r.stdout, r.stdout
        wait_until(lambda: len(runs(ran)) == 500, 60, 0.1, message="all 500 jobs run")
        wait_until(lambda: queued(b.address, "t.record") == 0, 30, message="B's queue empty")
        counted = runs(ran)
        assert set(counted) == set(keys) and max(counted.values()) == 1, \
            [u for u, n in counted.items() if n > 1][:10]
        # the resent jobs are recorded under B, so `send status` follows them there
        recorded = [rec for rec in JobSender(load_config(sender_cfg)).background_records()
                    if rec["server"] == b.address]
        assert sorted(rec["unique"] for rec in recorded) == sorted(keys[200:])
        # a second run finds every job done: nothing is sent twice
        again = run_script(SEND, "--config", str(sender_cfg), "recover", "--server", a.address, timeout=120)
        assert again.returncode == 0 and "resent 0, skipped 500 as done" in again.stdout, again.stdout + again.stderr
    finally:
        worker.stop()


def test_recover_without_a_collector_sends_nothing_unless_told(tmp_path, fresh_gearmand):
    """No collector answers: every job is undecided and none is sent (exit 1, the reason said);
    --resend-undecided sends them. --older-than leaves the recent ones alone; --dry-run sends nothing."""
    live, dead = fresh_gearmand.address, f"127.0.0.1:{free_port()}"
    cfg_path = write_config(tmp_path / "s" / "config.yaml", [dead, live])
    now = time.time()
    write_record(cfg_path, [record_line(dead, "old-1", at=now - 600), record_line(dead, "old-2", at=now - 600),
                            record_line(dead, "new-1", at=now), record_line(live, "other", at=now - 600)])
    config = load_config(cfg_path)

    r = recover(config, dead, older_than=300, timeout=2)
    assert (r.count("undecided"), r.count("resent"), r.too_new, r.exit_status) == (2, 0, 1, 1)
    assert "no outcomes collector answered" in (r.undecided_reason or "")
    assert queued(live, "t.record") == 0

    cli = run_script(SEND, "--config", str(cfg_path), "recover", "--server", dead, "--older-than", "300")
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert "2 undecided" in cli.stdout and "--resend-undecided" in cli.stdout and "1 recorded too recently" in cli.stdout

    dry = recover(config, dead, resend_undecided=True, dry_run=True, timeout=2)
    assert dry.count("would_resend") == 3 and queued(live, "t.record") == 0

    r = recover(config, dead, older_than=300, resend_undecided=True, timeout=2)
    assert (r.count("resent"), r.exit_status) == (2, 0) and r.resent_to == {live: 2}
    assert queued(live, "t.record") == 2  # the same unique keys: sent again, they coalesce
    recover(config, dead, older_than=300, resend_undecided=True, timeout=2)
    assert queued(live, "t.record") == 2


def test_recover_bad_input_is_one_line_and_a_defined_exit_status(tmp_path, fresh_gearmand):
    live, dead = fresh_gearmand.address, f"127.0.0.1:{free_port()}"
    cfg_path = write_config(tmp_path / "s" / "config.yaml", [dead, live])
    lone = write_config(tmp_path / "lone" / "config.yaml", [dead])
    write_record(lone, [record_line(dead, "x")])

    def send(cfg: Path, *args: str, one_line: bool = True):
        r = run_script(SEND, "--config", str(cfg), "recover", *args)
        lines = r.stderr.strip().splitlines()
        assert "Traceback" not in r.stderr and r.stdout == "", r.stdout + r.stderr
        assert len(lines) == 1 or not one_line, r.stderr  # argparse's own errors come after its usage
        return r.returncode, lines[-1]

    for spelling in ("nohost", "127.0.0.1:http", "127.0.0.1:70000", "ftp://127.0.0.1:1", ""):
        code, err = send(cfg_path, "--server", spelling)
        assert code == 2 and err.startswith("error: --server: "), err
    code, err = send(cfg_path, "--server", dead)  # nothing in the record yet
    assert code == EXIT_NOTHING and f"no background jobs recorded for {dead}" in err and "each sender host" in err
    code, err = send(cfg_path, "--server", "127.0.0.1:1")
    assert code == 2 and "not a configured server" in err, err
    code, err = send(lone, "--server", dead)
    assert code == 2 and "the only server" in err, err
    write_record(cfg_path, [record_line(live, "y")])
    code, err = send(cfg_path, "--server", live)
    assert code == 2 and "answers" in err and "--even-if-answering" in err, err
    code, err = send(cfg_path, "--older-than", "-1", "--server", dead, one_line=False)
    assert code == 2 and "--older-than: must not be negative" in err, err
    code, err = send(cfg_path, one_line=False)
    assert code == 2 and "--server" in err and "required" in err, err

    config = load_config(cfg_path)
    with pytest.raises(StillAnswering):
        plan(config, live)
    with pytest.raises(NothingRecorded):
        plan(config, dead)
    with pytest.raises(UsageError, match="expected HOST:PORT"):
        plan(config, "a b")


def test_hostile_record_lines_are_reported_and_not_sent(tmp_path, fresh_gearmand):
    """The record is a file: a broken or edited line of the dead server is named, never sent as
    something else; the good lines still go."""
    live, dead = fresh_gearmand.address, f"127.0.0.1:{free_port()}"
    cfg_path = write_config(tmp_path / "s" / "config.yaml", [dead, live])
    big = record_line(dead, "big", data=b"x" * (RECORD_DATA + 1))
    write_record(cfg_path, [
        record_line(dead, "good"),
        {**record_line(dead, "notask"), "task": ""},
        {**record_line(dead, "nodata"), "data": None, "data_size": None},
        big,
        {**record_line(dead, "b64"), "data": None, "data_b64": "***"},
        {**record_line(dead, "nouniq"), "unique": None},
        json.dumps({"handle": "H:x", "server": dead})[:-3],  # a half line: no server to tell, ignored
        json.dumps({"handle": "H: spaced", "server": dead, "task": "t.record", "unique": "sp"}),
    ])
    r = recover(load_config(cfg_path), dead, resend_undecided=True, timeout=2)
    reasons = {j.unique: j.reason for j in r.jobs if j.state == "not_resent"}
    assert r.count("resent") == 1 and [j.unique for j in r.jobs if j.state == "resent"] == ["good"]
    assert "bad record" in reasons["notask"] and "no data" in reasons["nodata"]
    assert "only its size" in reasons["big"] and "not base64" in reasons["b64"]
    assert "no unique key" in reasons[None]
    assert len(r.bad_lines) == 1 and "spaces" in r.bad_lines[0] and "sender-background.jsonl:8" in r.bad_lines[0]
    assert r.exit_status == 1


def test_the_record_keeps_a_background_jobs_data_to_send_it_again():
    assert recorded_data(recorded_fields('{"a":"é"}'.encode())) == '{"a":"é"}'.encode()
    raw = bytes(range(256))
    kept = recorded_fields(raw, retries=2, at=123)
    assert "data_b64" in kept and kept["retries"] == 2 and kept["at"] == 123 and recorded_data(kept) == raw
    big = recorded_fields(b"x" * (RECORD_DATA + 1))
    assert "data" not in big and "data_b64" not in big and big["data_size"] == RECORD_DATA + 1
    with pytest.raises(ValueError, match="only its size"):
        recorded_data(big)


def test_a_background_batch_records_its_data(tmp_path, fresh_gearmand):
    cfg_path = write_config(tmp_path / "s" / "config.yaml", [fresh_gearmand.address])
    with JobSender(load_config(cfg_path)) as sender:
        sender.submit_many([{"task": "t.none", "data": {"k": 1}, "unique": "j1", "retries": 3, "background": True},
                            {"task": "t.none", "data": b"\xff\x00", "unique": "j2", "background": True}], wait=False)
        recs = {r["unique"]: r for r in sender.background_records()}
    assert recorded_data(recs["j1"]) == b'{"k":1}' and recs["j1"]["retries"] == 3
    assert recorded_data(recs["j2"]) == b"\xff\x00"


def grab(address: str, task: str) -> tuple[str, bytes]:
    """One job of ``task`` as a bare Gearman worker gets it: (unique, payload)."""
    conn = gearclient.connect(address)
    try:
        conn.send(gp.CAN_DO, task=task)
        conn.send(gp.GRAB_JOB_UNIQ)
        pkt = conn.expect(gp.JOB_ASSIGN_UNIQ, 10)
        return pkt.text("unique"), pkt["data"]
    finally:
        conn.close()


def test_submit_raw_sends_the_exact_bytes_and_recover_sends_them_raw_again(tmp_path, gearmand_factory, fname):
    """JobSender.submit_raw (a requeue with its original signature): no envelope, no signature
    of ours; recorded as raw, so recover sends the same bytes again."""
    a, b = gearmand_factory("builtin"), gearmand_factory("builtin")
    servers = [a.address, b.address]
    cfg_path = write_config(tmp_path / "s" / "config.yaml", servers)
    unique = uniques_for(a.address, servers, 1, "raw")[0]
    payload = b"SIGNED-LINE\n\x1egeartask/1 {}\n\xff\x00 user bytes"
    with JobSender(load_config(cfg_path)) as sender:
        r, = sender.submit_raw([{"task": fname, "data": payload, "unique": unique}])
        assert (r.state, r.server) == ("queued", a.address)
        rec, = sender.background_records()
    assert rec["raw"] is True and recorded_data(rec) == payload
    assert grab(a.address, fname) == (unique, payload)
    os.kill(a.pid(), signal.SIGKILL)
    host, port = a.address.rsplit(":", 1)
    wait_until(lambda: not port_open(host, int(port), 0.2), 10, message="A gone")
    got = recover(load_config(cfg_path), a.address, resend_undecided=True, timeout=2)
    assert got.resent_to == {b.address: 1}, got.jobs
    assert grab(b.address, fname) == (unique, payload)


def test_the_record_is_private_to_its_user(tmp_path):
    """The record holds job data, which may carry secrets: a new file is mode 0600."""
    from geartask.jsonlines import JsonLinesFile

    f = JsonLinesFile(tmp_path / "sender-background.jsonl")
    f.append(b'{"data": "secret"}\n')
    assert (tmp_path / "sender-background.jsonl").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "sender-background.jsonl.lock").stat().st_mode & 0o777 == 0o600
