"""What a hostile client may try against the built-in `shell` task, and what it gets.

gearmand has no authentication: anyone who reaches it can send any job to every worker.
Each test below is one thing such a client (or a careless operator) may try, with a real
gearmand, a real worker process and a raw Gearman client; its docstring says what it gets.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import yaml

import gearclient as gc
from helpers import REPO, missing_in_this_environment, processes, run_script, wait_until, write_config
from workers import WorkerProc


@pytest.fixture
def shell_worker(tmp_path):
    """shell_worker(server, allow, env_allow=None, ...) -> a started WorkerProc serving `shell`."""
    started: list[WorkerProc] = []

    def start(server, allow, env_allow=None, max_output=None, env=None, threads=1, name="hostile"):
        shell = {"allow": allow, "heartbeat": 0.2}
        if env_allow is not None:
            shell["env_allow"] = env_allow
        if max_output is not None:
            shell["max_output"] = max_output
        worker = {"poll_timeout": 1, "retry_backoff": 0.05, "retries": 2, "shell": shell}
        # outcomes.report off: failures are followed through the local dead-letter file
        cfg = write_config(tmp_path / f"{name}.yaml", [server.address],
                           yaml.safe_dump({"worker": worker, "outcomes": {"report": False}}))
        w = WorkerProc(cfg, name, threads, env=env)
        started.append(w)
        return w.wait_attached([server.address])

    yield start
    for w in started:
        w.stop()


def planted(path: Path, marker: Path) -> Path:
    """A program (or script) a client would like the worker to run: it leaves ``marker`` behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho planted > {marker}\n")
    path.chmod(0o755)
    return path


def refused(outcome: gc.Outcome, *words: str) -> bool:
    """Failed at once (one attempt, not retried), with a reason that names ``words``."""
    return (outcome.state == "failed" and outcome.reason["attempts"] == 1
            and all(w in outcome.reason["error"] for w in words))


def test_the_jobs_path_cannot_choose_the_program(gearmand, shell_worker, tmp_path):
    """A client sends {"cmd": ["echo", "hi"], "env": {"PATH": "/its/dir"}} (or PATH "." or ""
    with a cwd of its choosing) so that its own `echo` runs where only echo is allowed.
    It gets: the job refused at once, because PATH is not a variable a job may set; its
    program never runs."""
    marker = tmp_path / "ran"
    evil = planted(tmp_path / "evil" / "echo", marker).parent
    shell_worker(gearmand, allow=["echo"])
    for env, cwd in [({"PATH": str(evil)}, None), ({"PATH": "."}, str(evil)), ({"PATH": ""}, str(evil)),
                     ({"PATH": f"{evil}:/usr/bin:/bin"}, None)]:
        data = {"cmd": ["echo", "hi"], "env": env, **({"cwd": cwd} if cwd else {})}
        o = gc.run_one(gearmand.address, "shell", data)
        assert refused(o, "'PATH'", "worker.shell.env_allow"), (data, o.reason)
    assert not marker.exists()


def test_a_relative_entry_on_the_workers_own_path_does_not_let_cwd_choose(gearmand, shell_worker, tmp_path):
    """The operator's PATH has an empty entry (the current folder); a client sends
    {"cmd": ["echo", "hi"], "cwd": "/its/dir"} where /its/dir/echo is its own program.
    It gets: the real echo, found once at start on the absolute entries of the worker's PATH."""
    marker = tmp_path / "ran"
    evil = planted(tmp_path / "evil" / "echo", marker).parent
    shell_worker(gearmand, allow=["echo"], env={**os.environ, "PATH": ":" + os.environ["PATH"]})
    o = gc.run_one(gearmand.address, "shell", {"cmd": ["echo", "hi"], "cwd": str(evil)})
    assert o.state == "complete" and o.result["output"] == "hi\n"
    assert not marker.exists()


def test_ld_preload_cannot_inject_code_into_an_allowed_program(gearmand, shell_worker, tmp_path):
    """A client sends {"cmd": ["true"], "env": {"LD_PRELOAD": "/its/lib.so"}} so that the
    library's constructor runs inside /bin/true. It gets: the job refused; nothing is loaded."""
    if shutil.which("gcc") is None:
        missing_in_this_environment("gcc is needed to build the preloaded library")
    marker = tmp_path / "ran"
    src = tmp_path / "evil.c"
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void evil(void) {\n'
                   f'  FILE *f = fopen("{marker}", "w"); if (f) {{ fputs("injected", f); fclose(f); }}\n}}\n')
    lib = tmp_path / "evil.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True, timeout=60)
    # The library does what the client hopes when the loader is given it ...
    subprocess.run(["true"], env={**os.environ, "LD_PRELOAD": str(lib)}, check=True, timeout=10)
    assert marker.read_text() == "injected"
    marker.unlink()
    # ... and a job cannot give it.
    shell_worker(gearmand, allow=["true"])
    for key in ("LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT"):
        o = gc.run_one(gearmand.address, "shell", {"cmd": ["true"], "env": {key: str(lib)}})
        assert refused(o, f"'{key}'", "worker.shell.env_allow"), o.reason
    assert not marker.exists()


def test_shell_startup_variables_cannot_inject_commands_into_an_allowed_script(gearmand, shell_worker, tmp_path):
    """An allowed program is a bash script; a client sends BASH_ENV (or ENV, or SHELLOPTS with
    PS4, or an exported function) naming its own commands. It gets: the job refused; the
    script runs nothing of the client's."""
    marker = tmp_path / "ran"
    evil = planted(tmp_path / "evil.sh", marker)
    script = tmp_path / "greet.sh"
    script.write_text("#!/bin/bash\necho greetings\n")
    script.chmod(0o755)
    # BASH_ENV does what the client hopes when bash is given it ...
    subprocess.run([str(script)], env={**os.environ, "BASH_ENV": str(evil)}, check=True, timeout=10)
    assert marker.exists()
    marker.unlink()
    # ... and a job cannot give it.
    shell_worker(gearmand, allow=[str(script)])
    for env in ({"BASH_ENV": str(evil)}, {"ENV": str(evil)}, {"SHELLOPTS": "xtrace", "PS4": f"$({evil})"},
                {"BASH_FUNC_echo%%": f"() {{ {evil}; }}"}):
        o = gc.run_one(gearmand.address, "shell", {"cmd": [str(script)], "env": env})
        assert refused(o, "worker.shell.env_allow"), (env, o.reason)
    assert not marker.exists()
    o = gc.run_one(gearmand.address, "shell", {"cmd": [str(script)]})
    assert o.result["output"] == "greetings\n"


def test_a_job_sets_only_the_variables_the_worker_allows(gearmand, shell_worker):
    """A client sends an `env` with a variable the operator did not list in
    worker.shell.env_allow. It gets: the job refused at once, naming the variable. A listed
    variable reaches the command, on top of the worker's own environment."""
    shell_worker(gearmand, allow=["printenv"], env_allow=["GT_GREETING"],
                 env={**os.environ, "GT_FROM_WORKER": "worker's own"})
    o = gc.run_one(gearmand.address, "shell", {"cmd": ["printenv", "GT_GREETING", "GT_FROM_WORKER"],
                                               "env": {"GT_GREETING": "hello"}})
    assert o.state == "complete" and o.result["output"] == "hello\nworker's own\n"
    o = gc.run_one(gearmand.address, "shell", {"cmd": ["printenv"], "env": {"GT_GREETING": "hi", "GT_OTHER": "x"}})
    assert refused(o, "'GT_OTHER'", "worker.shell.env_allow"), o.reason


@pytest.mark.parametrize("name", ["LD_PRELOAD", "LD_LIBRARY_PATH", "BASH_ENV", "ENV", "PYTHONPATH", "PERL5OPT",
                                  "RUBYOPT", "NODE_OPTIONS", "GCONV_PATH", "IFS", "PATH", "GLIBC_TUNABLES"])
def test_listing_a_startup_variable_in_env_allow_is_a_config_error(gearmand, tmp_path, name):
    """A careless operator lists a loader's, shell's or interpreter's start-up variable in
    worker.shell.env_allow. They get: the worker refuses to start (exit 2), naming the key."""
    cfg = write_config(tmp_path / "c.yaml", [gearmand.address],
                       f"worker:\n  shell:\n    allow: [echo]\n    env_allow: [GT_OK, {name}]\n")
    r = run_script("worker_client/runworkers.py", "--config", str(cfg), "--name", "careless", timeout=30)
    assert r.returncode == 2, r.stderr
    assert "worker.shell.env_allow[1]" in r.stderr and name in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("key, value, words", [
    ("env_allow", "['GT X']", "worker.shell.env_allow[0]"),
    ("allow", "['bin/echo']", "worker.shell.allow[0]"),
    ("allow", "['/usr/bin/../bin/echo']", "worker.shell.allow[0]"),
])
def test_malformed_shell_lists_are_config_errors(gearmand, tmp_path, key, value, words):
    """An allowlist entry that is neither a bare name nor a plain absolute path, or an
    env_allow entry that is not a variable name, would never match what the operator meant.
    They get: exit 2, naming the key."""
    cfg = write_config(tmp_path / "c.yaml", [gearmand.address], f"worker:\n  shell:\n    {key}: {value}\n")
    r = run_script("worker_client/runworkers.py", "--config", str(cfg), "--name", "careless", timeout=30)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


# Programs we checked have no option that reads or lists a file, runs another program or
# changes the host. (date -f FILE prints a file's lines in its errors; ls lists any folder;
# hostname NAME renames the host as root.)
VETTED = {"echo", "true", "false", "sleep", "uname"}


def test_the_shipped_allowlist_cannot_read_files_or_change_the_host():
    """The repository's config.yaml is what many people start from. A client gets from it
    no program that reads files, lists folders, runs other programs or changes the host."""
    allow = yaml.safe_load((REPO / "config.yaml").read_text())["worker"]["shell"]["allow"]
    assert set(allow) <= VETTED, f"not vetted: {set(allow) - VETTED}"
    assert yaml.safe_load((REPO / "config.yaml").read_text())["worker"]["shell"].get("env_allow", []) == []


def test_failure_reasons_are_capped(gearmand, shell_worker, tmp_path):
    """A client sends a megabyte where a program name, a folder or an argument list goes,
    or a command that prints a lot and fails, to flood the failure reason every client
    sees and the dead-letter file. It gets: reasons of a bounded size (the output in them
    cut at worker.shell.max_output)."""
    w = shell_worker(gearmand, allow=["sh"], max_output=1000)
    big = "x" * 1_000_000
    for data in ({"cmd": [big]}, {"cmd": ["sh"], "cwd": "/" + big}, {"cmd": ["sh"], "cwd": "/no/" + "x" * 200},
                 {"cmd": [1] * 100_000}, {"cmd": ["sh"], "env": {big: "1"}},
                 {"cmd": ["sh"], "timeout": [big]}, {big: 1},
                 {"cmd": ["sh", "-c", "head -c 100000 /dev/zero | tr '\\0' x; exit 3"], "retries": 0}):
        o = gc.run_one(gearmand.address, "shell", data, timeout=60)
        assert o.state == "failed"
        assert len(json.dumps(o.reason)) < 3000, json.dumps(o.reason)[:300]
        assert len(o.reason.get("output", "").encode()) <= 1000
    assert o.reason["cut"] is True and o.reason["returncode"] == 3
    dead = (w.config.parent / "logs" / "dead-letter.jsonl").read_text().splitlines()
    assert len(dead) == 8 and all(len(json.dumps(json.loads(line)["reason"])) < 2000 for line in dead)


def test_nan_and_infinite_numbers_are_refused(gearmand, shell_worker):
    """A client sends "timeout": NaN (or Infinity, or 1e999, or a NaN retries), which compares
    false with every limit, or an integer too large for a float. It gets: the job refused at
    once; no command starts."""
    shell_worker(gearmand, allow=["sleep"])
    conn = gc.connect(gearmand.address)
    try:
        huge = b"1" + b"0" * 400
        for key, value in ((b"timeout", b"NaN"), (b"timeout", b"Infinity"), (b"timeout", b"-Infinity"),
                           (b"timeout", b"1e999"), (b"timeout", huge), (b"retries", b"NaN"), (b"retries", huge)):
            raw = b'{"cmd": ["sleep", "7.31"], "%s": %s}' % (key, value)
            [h] = gc.submit(conn, "shell", [raw])
            o = gc.wait(conn, [h], 30)[h]
            # the worker's own check of "retries" (whole number >= 0) may answer first
            assert refused(o, "finite") or (key == b"retries" and refused(o, "'retries'")), (raw, o.reason)
    finally:
        conn.close()
    assert not [p for p, (argv, _) in processes().items() if argv == ["sleep", "7.31"]]


def test_odd_values_are_refused_with_where(gearmand, shell_worker):
    """A client sends NUL bytes, a relative folder, values of the wrong type, an argument
    list too long for the kernel (E2BIG) or text that is not valid Unicode. It gets: the job
    refused at once with a reason that says which field is wrong; the worker goes on."""
    w = shell_worker(gearmand, allow=["echo"])
    cases = [({"cmd": ["echo", "a\0b"]}, "'cmd'"),
             ({"cmd": ["echo"], "cwd": "/tmp\0/x"}, "'cwd'"),
             ({"cmd": ["echo"], "cwd": "relative/dir"}, "'cwd'"),
             ({"cmd": ["echo"], "env": {"A": 1}}, "'env'"),
             ({"cmd": ["echo"], "env": ["A"]}, "'env'"),
             ({"cmd": ["echo"], "retries": "3"}, "'retries'"),
             ({"cmd": ["echo"], "timeout": True}, "'timeout'"),
             ({"cmd": ["echo", "x" * 200_000]}, "argument list too long"),
             ({"cmd": ["echo"] + ["x"] * 300_000}, "argument list too long"),
             (b'{"cmd": ["echo", "\\ud800"]}', "'cmd' argument 1")]  # raw: our encoder refuses it
    for data, words in cases:
        o = gc.run_one(gearmand.address, "shell", data, timeout=60)
        assert refused(o, words), (str(data)[:100], o.reason)
    assert gc.run_one(gearmand.address, "shell", {"cmd": ["echo", "still here"]}).result["output"] == "still here\n"
    dead = [json.loads(line) for line in (w.config.parent / "logs" / "dead-letter.jsonl").read_text().splitlines()]
    assert len(dead) == len(cases) and dead[-1]["data"] == {"cmd": ["echo", "\ud800"]}


def test_commands_die_with_a_worker_killed_by_sigkill(fresh_gearmand, shell_worker):
    """A worker is killed with SIGKILL (or by the OOM killer) while its command runs;
    gearmand then gives the job to another worker. The command (and what it started) must
    not go on running beside the second run. It gets: every process of the command ended
    within seconds."""
    w = shell_worker(fresh_gearmand, allow=["sh"], threads=2)
    conn = gc.connect(fresh_gearmand.address)
    gc.submit(conn, "shell", [{"cmd": ["sh", "-c", "sleep 301.25 & sleep 301.25"], "timeout": 600}], background=True)

    def command_processes():
        procs = processes()
        groups = {g for argv, g in procs.values() if argv == ["sleep", "301.25"]}
        return {p: g for p, (_, g) in procs.items() if g in groups}

    wait_until(lambda: len(command_processes()) >= 3, 15, message="sh and both sleeps running")
    groups = set(command_processes().values())

    def reaper():
        return [p for p, (argv, _) in processes().items()
                if any(a.endswith("reaper.py") for a in argv) and argv[-1] == str(w.pid)]

    assert reaper(), "the worker's reaper runs beside it"
    w.signal(signal.SIGKILL)
    w.wait(10)
    wait_until(lambda: not {p for p, (_, g) in processes().items() if g in groups}, 10,
               message=f"every process of the command's group {groups} gone")
    wait_until(lambda: not reaper(), 10, message="the worker's reaper gone, its work done")
    conn.close()
