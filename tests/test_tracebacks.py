"""A failed plugin task's traceback: in its outcome record (``traceback``, capped at 16 KiB,
the tail kept), `failed show`, `send result --json` and the worker's log; none for a shell
failure. Real gearmand, real worker and collector processes; both stores."""

from __future__ import annotations

import json
import time

import pytest

from geartask.outcomes import open_store
from geartask.outcomes.record import MAX_TRACEBACK, BadOutcome, cap_record, cap_traceback, check, make_record
from geartask.outcomes.store import SqliteOutcomeStore
from helpers import REPO, run_script, wait_until, write_config
from test_outcomes_collector import collector_config, collectors, reader_config  # noqa: F401
from workers import WorkerProc

SEND = "send_job_client/send_job_client.py"
MANAGE = "manage_client/manage_client.py"
PLUGIN = '''
from geartask import hookimpl


def _down(n):
    if n == 0:
        raise ValueError("the bottom of the stack")
    return _across(n - 1)


def _across(n):  # two functions in turn: Python folds only a frame repeating the one before
    return _down(n)


def deep(job):
    return _down(int(job.data["depth"]))


def kaput(job):
    raise KeyError("kaput-" + str(job.data))


@hookimpl
def geartask_tasks():
    return {"tb.deep": deep, "tb.kaput": kaput}
'''


@pytest.fixture
def fleet(fresh_gearmand, tmp_path, collectors):
    """(server, worker, reader config) with a collector storing outcomes."""
    srv = fresh_gearmand
    collectors(collector_config(tmp_path, [srv.address]), [srv.address])
    plugins = tmp_path / "tbplugins"
    plugins.mkdir()
    (plugins / "tb.py").write_text(PLUGIN)
    cfg = write_config(tmp_path / "w" / "config.yaml", [srv.address],
                       "worker:\n  poll_timeout: 1\n  retries: 0\n  isolate: [tb.deep]\n"
                       "  shell:\n    allow: [\"false\"]\n",
                       plugin_paths=[REPO / "plugins", plugins])
    w = WorkerProc(cfg, "tbw", 1).wait_attached([srv.address])
    yield srv, w, reader_config(tmp_path, [srv.address])
    w.stop()


def send(cfg, *args):
    return run_script(SEND, "--config", str(cfg), *args, timeout=60)


def test_a_failed_plugin_tasks_traceback_in_show_result_and_worker_log(fleet):
    srv, w, reader = fleet
    r = send(w.config, "job", "tb.kaput", '"one"', "--unique", "tb-one")
    assert r.returncode == 1 and "KeyError" in r.stdout, r.stdout + r.stderr
    r = send(reader, "result", "tb-one", "--wait", "20", "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 1 and out["state"] == "failed", r.stdout
    tb = out["traceback"]
    assert tb.startswith("Traceback (most recent call last):") and "in kaput" in tb
    assert tb.rstrip().endswith("KeyError: 'kaput-one'") and "runner.py" not in tb  # from the task's frame
    assert "traceback_cut" not in out

    shown = run_script(MANAGE, "--config", str(reader), "failed", "show", "tb-one", timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "traceback:" in shown.stdout and "  KeyError: 'kaput-one'" in shown.stdout
    assert 'in kaput' in shown.stdout
    as_json = json.loads(run_script(MANAGE, "--config", str(reader), "failed", "show", "tb-one", "--json").stdout)
    assert as_json["latest"]["traceback"] == tb

    # the worker's log: one event, at the failure, with the traceback (JSON file; console lines)
    logs = list((w.config.parent / "logs").glob("*.log"))
    events = [json.loads(line) for f in logs for line in f.read_text().splitlines() if line.startswith("{")]
    failed = [e for e in events if e.get("event") == "job failed: the task raised" and e.get("unique") == "tb-one"]
    assert len(failed) == 1 and failed[0]["exception"] == tb, [e.get("event") for e in events][-20:]
    wait_until(lambda: "KeyError: 'kaput-one'" in w.output.read_text(), 10, message="the console's traceback")

    # a shell failure has stderr, not a traceback
    r = send(w.config, "shell", "--", "false")
    assert r.returncode == 1
    handle = r.stdout.split()[3].split("@")[0]
    shell = json.loads(send(reader, "result", handle, "--wait", "20", "--json").stdout)
    assert shell["state"] == "failed" and shell["traceback"] is None


def test_a_deep_traceback_is_capped_keeping_its_tail(fleet):
    """tb.deep runs isolated (worker.isolate): its traceback comes from the task's own process."""
    srv, w, reader = fleet
    r = send(w.config, "job", "tb.deep", '{"depth": 400}', "--unique", "tb-deep")
    assert r.returncode == 1, r.stdout + r.stderr
    out = json.loads(send(reader, "result", "tb-deep", "--wait", "20", "--json").stdout)
    tb = out["traceback"]
    assert out["traceback_cut"] is True and len(tb.encode()) <= MAX_TRACEBACK
    assert tb.startswith("[... ") and "bytes of the traceback's start cut" in tb.splitlines()[0]
    assert tb.rstrip().endswith("ValueError: the bottom of the stack") and "isolate.py" not in tb
    shown = run_script(MANAGE, "--config", str(reader), "failed", "show", "tb-deep", timeout=60).stdout
    assert "traceback (its start cut" in shown and "ValueError: the bottom of the stack" in shown


def _failed_record(**kw) -> dict:
    return make_record(server="s:1", handle="H:x:1", task="t", state="failed", unique="u1",
                       reason={"error": "ValueError: x"}, **kw)


def test_check_caps_a_forged_huge_traceback_and_refuses_a_non_string():
    huge = "frame\n" * 1_000_000 + "ValueError: end"
    rec = check({**_failed_record(), "traceback": huge})
    assert rec["traceback_cut"] is True and len(rec["traceback"].encode()) <= MAX_TRACEBACK
    assert rec["traceback"].endswith("ValueError: end")
    for bad in (5, ["a"], {"a": 1}, True):
        with pytest.raises(BadOutcome, match="'traceback' must be a string"):
            check({**_failed_record(), "traceback": bad})
    # a success has none; a lone surrogate is replaced, not refused; cap_record caps an unchecked one
    assert "traceback" not in check({**_failed_record(), "state": "complete", "traceback": "x"})
    assert check({**_failed_record(), "traceback": "a\ud800b"})["traceback"] == "a?b"
    capped = cap_record({**_failed_record(), "traceback": "y" * (MAX_TRACEBACK + 1)}, 1024 * 1024)
    assert capped["traceback_cut"] is True and len(capped["traceback"].encode()) <= MAX_TRACEBACK
    text, cut = cap_traceback("é" * MAX_TRACEBACK)  # a cut through a character drops its bytes
    assert cut and len(text.encode()) <= MAX_TRACEBACK and text.endswith("é")
    small = _failed_record(traceback="Traceback...\nValueError: x")
    assert cap_record(check(small), 1024) is not None and check(small)["traceback"] == small["traceback"]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_both_stores_keep_the_traceback_and_leave_it_out_of_summaries(backend, tmp_path, request):
    if backend == "sqlite":
        store = SqliteOutcomeStore(tmp_path / "o.sqlite")
    else:
        store = open_store("postgresql", request.getfixturevalue("pg_url"))
    try:
        rec = _failed_record(traceback="Traceback (most recent call last):\n  ...\nValueError: x\n",
                             finished_at=time.time())
        assert store.add([rec]) == 1
        assert store.get(rec["id"])["traceback"] == rec["traceback"]
        assert store.latest(unique="u1")["traceback"] == rec["traceback"]
        rows = store.failed()
        assert rows and all("traceback" not in r for r in rows)
    finally:
        store.close()
