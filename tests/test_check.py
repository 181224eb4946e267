"""``geartask check`` refuses what the worker and the scheduler would refuse, with the same
message, and warns (exit 0) about a plugins.paths folder that is not there; so does the worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, wait_until, write_config

# (what is wrong, config text added, the message, the role that refuses it)
REFUSED = [
    ("bad cron", 'schedules:\n  - {name: n1, cron: "61 * * * *", task: eg.reverse}\n',
     "bad cron expression '61 * * * *'", "schedule"),
    ("cron that never matches", 'schedules:\n  - {name: n1, cron: "0 0 31 2 *", task: eg.reverse}\n',
     "bad cron expression", "schedule"),
    ("unknown task", "schedules:\n  - {name: n1, every: 60, task: eg.nosuchtask}\n",
     "unknown task 'eg.nosuchtask'", "schedule"),
    ("two schedules, one name", "schedules:\n  - {name: n1, every: 60, task: eg.reverse}\n"
     "  - {name: n1, every: 30, task: shell}\n", "two schedules are named 'n1'", "schedule"),
    ("isolate names no task", "worker:\n  isolate: [eg.nosuchtask]\n",
     "worker.isolate[0]: 'eg.nosuchtask' is not a task of the loaded plugins", "worker"),
    ("worker.tasks names no task", "worker:\n  tasks:\n    eg.nosuchtask: {threads: 1}\n",
     "worker.tasks.eg.nosuchtask: 'eg.nosuchtask' is not a task this worker serves", "worker"),
    ("dedicated threads leave none", "worker:\n  threads: 2\n  tasks:\n    eg.reverse: {threads: 2}\n",
     "worker.tasks: the dedicated threads (2) leave none", "worker"),
    ("threads", "worker:\n  threads: 1001\n", "worker.threads: must be at most 1000", "worker"),
    ("keepalive", "worker:\n  keepalive: 40000\n", "worker.keepalive: must be between 1", "worker"),
]


def _run(config, *command, cwd=None, timeout=60):
    env = {k: v for k, v in os.environ.items() if k != "GEARTASK_CONFIG"}
    args = [sys.executable, "-m", "geartask"] + (["--config", str(config)] if config else []) + list(command)
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO, env=env)


@pytest.mark.parametrize("what,extra,message,role", REFUSED, ids=[r[0] for r in REFUSED])
def test_check_refuses_what_the_worker_or_the_scheduler_refuses(tmp_path, what, extra, message, role):
    config = write_config(tmp_path / "config.yaml", ["127.0.0.1:1"], extra)  # nothing is contacted
    check = _run(config, "check")
    assert check.returncode == 2, check.stdout + check.stderr
    (line,) = check.stderr.strip().splitlines()  # one line, no traceback
    assert message in line and str(config) in line, line
    refused = _run(config, *(["worker", "--name", "w"] if role == "worker" else ["send", "schedule", "list"]))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refused.stderr.strip().splitlines()[-1].removeprefix("error: ") in line


def test_check_names_a_bad_worker_name_with_its_key(tmp_path):
    config = write_config(tmp_path / "config.yaml", ["127.0.0.1:1"], "worker:\n  name: 'a b'\n")
    r = _run(config, "check")
    assert r.returncode == 2 and f"{config}: worker.name: worker name 'a b'" in r.stderr, r.stderr


def test_check_accepts_a_good_config_with_schedules(tmp_path):
    config = write_config(tmp_path / "config.yaml", ["127.0.0.1:1"],
                          'schedules:\n  - {name: n1, cron: "*/5 * * * *", task: eg.reverse}\n')
    r = _run(config, "check")
    assert r.returncode == 0, r.stderr
    assert "plugin eg" in r.stdout and "schedules: n1" in r.stdout
    assert r.stderr == ""


def test_check_warns_about_a_plugin_folder_that_is_not_there(tmp_path):
    missing = tmp_path / "plugins-typo"
    config = write_config(tmp_path / "config.yaml", ["127.0.0.1:1"], plugin_paths=[REPO / "plugins", missing])
    r = _run(config, "check")
    assert r.returncode == 0, r.stderr
    assert r.stderr == (f"warning: {config}: plugins.paths[1]: {missing} does not exist; "
                        f"no plugins are loaded from it\n")


def test_without_a_config_the_warning_says_none_was_found(tmp_path):
    r = _run(None, "check", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"plugins.paths[0]: {tmp_path}/plugins does not exist" in r.stderr
    assert "no config file was found" in r.stderr and f"{tmp_path}/config.yaml" in r.stderr


def test_the_worker_warns_at_start_about_a_plugin_folder_that_is_not_there(tmp_path, gearmand):
    missing = tmp_path / "nowhere"
    config = write_config(tmp_path / "config.yaml", [gearmand.address], plugin_paths=[missing])
    env = {k: v for k, v in os.environ.items() if k != "GEARTASK_CONFIG"}
    log = tmp_path / "logs" / "worker-nofolder.log"
    worker = subprocess.Popen([sys.executable, "-m", "geartask", "--config", str(config), "worker", "--name",
                               "nofolder", "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env, cwd=tmp_path)
    try:
        wait_until(lambda: log.is_file() and "worker started" in log.read_text() or worker.poll() is not None,
                   30, message="the worker started")
    finally:
        worker.terminate()
        console, _ = worker.communicate(timeout=30)
    events = [json.loads(line) for line in log.read_text().splitlines()]
    (warning,) = [e for e in events if "plugins.paths" in e["event"]]
    assert warning["level"] == "warning"
    assert warning["event"] == f"{config}: plugins.paths[0]: {missing} does not exist; no plugins are loaded from it"
    assert "does not exist" in console  # and on the console, at the default verbosity
