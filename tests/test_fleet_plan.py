"""Fleet commands' pure parts (issue 23), no server: targeted names and their checks, host
discovery from a `workers` reply, target resolution, batch planning (N and N%), the
result per host and the table."""

from __future__ import annotations

import time

import pytest

from geartask.config import parse_config
from geartask.errors import ConfigError, NoSuchHostError, UsageError
from geartask.fleet.replies import parse_workers
from geartask.fleet.reports import ServerResult, group_processes
from geartask.sender import fanout
from geartask.sender.fanout import HostResult, Target
from geartask.sender.fleet_cli import format_table, summary
from geartask.sender.results import JobResult
from geartask.targets import (TargetError, aliases, base_task, check_host, check_label, expand, identity_of,
                              parse)
from geartask.trust import policy, signing
from geartask.trust.keys import new_key


# -- names ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["", " web1", "web 1", "web1\n", "we\0b", "-web", "web:1", "web@1", "wéb",
                                 "a" * 254, "web/1", "\x1b[2J"])
def test_hostile_host_names_are_refused(bad):
    with pytest.raises(TargetError, match="must be 1-253 characters"):
        check_host(bad)


def test_good_names_and_the_label_limit():
    assert check_host("db1.eu-west.example_2") == "db1.eu-west.example_2"
    assert check_label("a" * 63) == "a" * 63
    with pytest.raises(TargetError, match="1-63"):
        check_label("a" * 64)


def test_expand_parse_and_base_task():
    assert expand(["shell", "t.x"], "web3", ["db", "eu"]) == [
        "shell", "shell@host:web3", "shell@label:db", "shell@label:eu",
        "t.x", "t.x@host:web3", "t.x@label:db", "t.x@label:eu"]
    assert expand(["shell"]) == ["shell"]
    assert parse("shell@host:web3") == ("shell", "host", "web3")
    assert parse("shell@label:db") == ("shell", "label", "db")
    assert parse("shell") is None and parse("shell@host:bad name") is None and parse("@host:web3") is None
    assert base_task("reports.daily@label:db") == "reports.daily" and base_task("shell") == "shell"


def test_identity_from_functions_ignores_hostile_and_ambiguous_names():
    assert identity_of(["shell", "shell@host:web3", "shell@label:db", "t@label:eu", "t@host:web3"]) == \
        ("web3", ["db", "eu"])
    assert identity_of(["shell@host:a", "shell@host:b"]) == (None, [])  # two hosts: believe none
    assert identity_of(["shell@host:a b", "x@label:\x1b[2J"]) == (None, [])


def test_a_host_job_is_also_its_workers_label_jobs_for_the_policy():
    assert aliases("shell@host:db1", ["db", "eu"]) == ("shell@label:db", "shell@label:eu")
    assert aliases("shell@label:db", ["db"]) == () and aliases("shell", ["db"]) == ()


def test_may_pattern_on_a_label_allows_host_jobs_only_on_workers_with_that_label(tmp_path):
    key, pub = new_key(tmp_path / "ops.key")
    trust = policy.Trust.from_config([{"name": "ops", "public_key": pub, "may": ["shell@label:db"]}])
    now = time.time()

    def decide(function: str, labels: list[str]) -> policy.Decision:
        raw = signing.sign_job(function, "u@h", b'{"cmd": ["true"]}', key)
        return policy.decide(function, "u@h", raw, trust, now, also=aliases(function, labels))

    assert decide("shell@host:db1", ["db"]).allowed
    assert decide("shell@label:db", []).allowed
    refused = decide("shell@host:web1", ["web"])
    assert not refused.allowed and refused.reason == "signer ops may not run shell@host:web1"
    assert not decide("shell", ["db"]).allowed  # untargeted shell goes to any host: not granted


def test_config_checks_worker_host_and_labels():
    cfg = parse_config({"worker": {"host": "db1.example", "labels": ["db", "eu-west"]}})
    assert (cfg.worker.host, cfg.worker.labels) == ("db1.example", ["db", "eu-west"])
    with pytest.raises(ConfigError, match=r"worker.labels\[1\]: label 'eu west'"):
        parse_config({"worker": {"labels": ["db", "eu west"]}})
    with pytest.raises(ConfigError, match="worker.host: host 'a\\\\nb'"):
        parse_config({"worker": {"host": "a\nb"}})


# -- discovery and resolution ----------------------------------------------------------------

WORKERS_REPLY = [
    "30 10.0.0.2 w:10.0.0.2:11:0 : shell shell@host:db1 shell@label:db t.x t.x@host:db1 t.x@label:db",
    "31 10.0.0.3 w:10.0.0.3:12:0 : shell shell@host:db2 shell@label:db shell@label:eu",
    "32 10.0.0.4 w:10.0.0.4:13:0 : shell shell@host:web1",
    "33 10.0.0.4 w:10.0.0.4:13:1 : shell shell@host:web1",  # a second thread: still one host
    "34 10.0.0.9 rogue : shell@host:bad\nname shell@label:db",  # no host it can name: ignored
    "35 10.0.0.5 - :",
]


def test_hosts_serving_a_task_come_from_the_workers_reply():
    conns = parse_workers(WORKERS_REPLY)
    assert fanout.serving(conns, "shell") == {"db1": {"db"}, "db2": {"db", "eu"}, "web1": set()}
    assert fanout.serving(conns, "t.x") == {"db1": {"db"}}
    assert fanout.serving(conns, "nothing") == {}
    procs = group_processes([ServerResult("s:4730", True, conns)])
    by_pid = {p.pid: (p.host, p.labels) for p in procs}
    assert by_pid == {11: ("db1", ["db"]), 12: ("db2", ["db", "eu"]), 13: ("web1", [])}


def test_resolve_names_labels_and_all():
    hosts = fanout.serving(parse_workers(WORKERS_REPLY), "shell")
    assert fanout.resolve(Target(labels=("db",)), "shell", hosts) == ["db1", "db2"]
    assert fanout.resolve(Target(all=True), "shell", hosts) == ["db1", "db2", "web1"]
    assert fanout.resolve(Target(hosts=("web1",), labels=("db",)), "shell", hosts) == ["web1", "db1", "db2"]
    with pytest.raises(NoSuchHostError, match="no such host: db9"):
        fanout.resolve(Target(hosts=("db1", "db9")), "shell", hosts)
    with pytest.raises(NoSuchHostError, match="no worker labelled 'eu' serves 't.x'"):
        fanout.resolve(Target(labels=("eu",)), "t.x", fanout.serving(parse_workers(WORKERS_REPLY), "t.x"))


def test_target_names_are_checked_where_they_come_from():
    with pytest.raises(UsageError, match="host 'web 1'"):
        Target.of(host=["web 1"])
    assert Target.of(host="a", label=["db", "db"]) == Target(("a",), ("db",), False)
    assert not Target.of()


# -- batches -----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, hosts, size", [("1", 3, 1), ("2", 3, 2), ("10", 3, 3), ("50%", 3, 2),
                                               ("25%", 8, 2), ("1%", 3, 1), ("100%", 7, 7), (None, 5, 5)])
def test_batch_size(spec, hosts, size):
    assert fanout.batch_size(fanout.parse_batch(spec), hosts) == size


@pytest.mark.parametrize("bad", ["0", "-1", "x", "1.5", "0%", "101%", "%", "²"])
def test_bad_batch_is_a_usage_error(bad):
    with pytest.raises(UsageError, match="--batch must be"):
        fanout.parse_batch(bad)


def test_waves_keep_the_order():
    assert fanout.waves(["a", "b", "c", "d", "e"], 2) == [["a", "b"], ["c", "d"], ["e"]]


# -- results and the table ---------------------------------------------------------------------

def test_a_host_result_names_no_answer_apart_from_failed():
    ok = fanout.host_result("db1", JobResult("shell@host:db1", "u@db1", state="complete", seconds=1.5,
                                             result={"returncode": 0, "output": "\n db1.example\nmore"}), 10)
    assert (ok.state, ok.rc, ok.line) == ("complete", 0, "db1.example")
    late = fanout.host_result("db2", JobResult("shell@host:db2", "u@db2", state="timeout"), 10)
    assert (late.state, late.line) == ("no answer", "no answer within 10s")
    bad = fanout.host_result("web1", JobResult("shell@host:web1", "u@web1", state="failed",
                                               error={"error": "exit status 3", "returncode": 3}), 10)
    assert (bad.state, bad.rc, bad.line, bad.ok) == ("failed", 3, "exit status 3", False)
    assert bad.to_json()["error"] == {"error": "exit status 3", "returncode": 3}


def test_table_rows_are_escaped_and_cut():
    rows = [HostResult("db1", "complete", "shell@host:db1", "u@db1", rc=0, seconds=0.25, line="db1.example"),
            HostResult("web1", "failed", "shell@host:web1", "u@web1", rc=12, seconds=3.0,
                       line="\x1b[2Jevil" + "x" * 200),
            HostResult("db2", "not started", "shell@host:db2", "u@db2", line="--max-fail 1 reached")]
    lines = format_table(rows, width=40).splitlines()
    assert lines[0].split() == ["HOST", "STATE", "RC", "DURATION", "OUTPUT"]
    assert lines[1].split() == ["db1", "complete", "0", "0.25s", "db1.example"]
    assert "\x1b" not in lines[2] and lines[2].endswith("...") and len(lines[2].split(None, 4)[4]) == 40
    assert lines[3].split()[:5] == ["db2", "not", "started", "-", "-"]
    assert lines[0].index("RC") == lines[2].index("12")  # numbers right-aligned under their header
    assert summary(rows, 3.0) == "3 host(s): 1 complete, 1 failed, 1 not started in 3.00s"


def test_worker_label_flag_adds_checked_labels():
    from geartask.worker.cli import with_labels
    cfg = with_labels(parse_config({"worker": {"labels": ["db"]}}), ["eu-west", "db"])
    assert cfg.worker.labels == ["db", "eu-west"]
    with pytest.raises(UsageError, match="--label 'a b' must be"):
        with_labels(cfg, ["a b"])


def test_a_worker_without_worker_host_announces_its_machine_name_never_localhost():
    from geartask.worker.process import worker_targets
    host, labels = worker_targets(parse_config({"worker": {"labels": ["db", "db"]}}))
    assert labels == ("db",)
    assert host == "" or (check_host(host) == host and not host.startswith("localhost"))
    assert worker_targets(parse_config({"worker": {"host": "db1.example"}})) == ("db1.example", ())


def test_unique_per_host_fits_gearmands_64_bytes():
    assert fanout.host_unique("abc", "db1.example") == "abc@db1.example"
    long_a, long_b = "a" * 60 + ".x", "a" * 60 + ".y"
    ka, kb = fanout.host_unique("0123456789abcdef0123", long_a), fanout.host_unique("0123456789abcdef0123", long_b)
    assert len(ka) == len(kb) == 64 and ka != kb and ka.startswith("0123456789abcdef0123@aaa")
    from geartask.errors import JobDefinitionError
    with pytest.raises(JobDefinitionError, match="leaves no room"):
        fanout.host_unique("u" * 60, long_a)
