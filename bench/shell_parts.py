"""The shell path part by part: the CPU time one thread spends per call on each part of running
a `shell` job (start and reap, output file, environment, allowlist, reaper, log line, outcome
record, answer, signatures), before (subprocess.Popen) and after (geartask.shell.spawn).

    python bench/shell_parts.py [--calls 1000]

One thread, its own CPU clock (time.thread_time), medians of 3 x --calls calls; "child" is the
command's own CPU. docs/benchmarks.md, "Shell jobs, part by part", has a run's figures.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "bench"

TRUE = "/usr/bin/true" if os.path.exists("/usr/bin/true") else "/bin/true"


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def measure(name: str, fn, calls: int) -> None:
    for _ in range(20):
        fn()
    runs = []
    for _ in range(3):
        t0, c0 = time.thread_time(), children_cpu()
        for _ in range(calls):
            fn()
        runs.append(((time.thread_time() - t0) / calls * 1e6, (children_cpu() - c0) / calls * 1e6))
    mine = statistics.median(r[0] for r in runs)
    child = statistics.median(r[1] for r in runs)
    print(f"{name:66s} {mine:7.1f} µs" + (f"   child {child:6.1f} µs" if child else ""), flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=1000)
    n = ap.parse_args(argv).calls
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from geartask.config import load_config
    from geartask.jobs import encode_payload
    from geartask.logs import JOB_LOGGER, configure_logging, get_logger, job_context
    from geartask.outcomes.record import make_record
    from geartask.shell import spawn
    from geartask.shell import veryeasyprocess as vep
    from geartask.shell.task import ShellTask
    from geartask.trust import signing, sodium
    from geartask.worker.job import success_packets

    with tempfile.TemporaryDirectory(prefix="geartask-parts-") as tmp:
        cfg_path = Path(tmp) / "config.yaml"
        cfg_path.write_text(f'servers: ["127.0.0.1:4730"]\nlog:\n  dir: {tmp}/logs\nworker:\n  shell:\n'
                            '    allow: ["true"]\n    env_allow: [LANG]\n')
        cfg = load_config(cfg_path)
        env = vep._child_env(None)

        def popen():
            with tempfile.TemporaryFile() as f:
                subprocess.Popen(["true"], executable=TRUE, env=env, stdin=subprocess.DEVNULL, stdout=f,
                                 stderr=subprocess.STDOUT, start_new_session=True, close_fds=True).wait()

        def posix_spawn():
            with tempfile.TemporaryFile(buffering=0) as f:
                os.waitpid(spawn.spawn(os.fsencode(TRUE), [b"true"], env, f.fileno()), 0)

        def output_file():
            with tempfile.TemporaryFile(buffering=0) as f:
                os.fstat(f.fileno())

        task = ShellTask(cfg.worker, "w:1")
        configure_logging(cfg.log, "worker", "parts", to_file=True, stream=open(os.devnull, "w"))
        job_log = get_logger(JOB_LOGGER)

        def log_line():
            with job_context(task="shell", handle="H:x:1", unique="u"):
                job_log.info("job", attempt=1, outcome="complete", seconds=0.001, server="127.0.0.1:4730")

        def record():
            make_record(server="127.0.0.1:4730", handle="H:x:1", task="shell", state="complete", unique="u",
                        finished_at=time.time(), started_at=time.time(), attempts=1, retries=0, background=True,
                        worker="w:1", result=b'{"returncode":0,"output":"","cut":false}', max_result=65536)

        key = Ed25519PrivateKey.generate()
        public, data = key.public_key(), b"x" * 120
        signature = key.sign(data)
        signed = signing.sign_job("shell", "u", b'{"cmd":["true"]}', key)

        def signature_line():
            line, payload = signing.split(signed)
            signing.job_bytes("shell", "u", payload, line.stamp.t)

        def whole():
            vep.shell_2_tempfile(["true"], executable=TRUE, cancel=threading.Event(), on_tick=lambda e: None,
                                 tick_interval=30)

        if spawn.available():
            measure("start + reap `true` with its output file: posix_spawn (after)", posix_spawn, n // 2)
        measure("start + reap `true` with its output file: Popen (before)", popen, n // 2)
        measure("output file: create, size, close", output_file, n)
        measure("environment: ours + the reaper's token", lambda: vep._child_env(None), n)
        measure("environment: KEY=VALUE list, as Popen builds it per command",
                lambda: [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()], n)
        measure("environment: the cached C array (after)", lambda: spawn._envs.get(env), n)
        measure("allowlist + job check", lambda: task.check({"cmd": ["true"]}), n)
        measure("allowlist + job check with env_allow", lambda: task.check({"cmd": ["true"], "env": {"LANG": "C"}}), n)
        measure("reaper bookkeeping", vep._reaper.token, n)
        measure("per-job log line, on the job's thread", log_line, n)
        measure("outcome record (background jobs)", record, n)
        measure("answer: result JSON + WORK_COMPLETE packets",
                lambda: success_packets("H:x:1", encode_payload({"returncode": 0, "output": ""}, "shell"), 1), n)
        measure("signature line: split + canonical bytes", signature_line, n)
        measure("Ed25519 sign, cryptography", lambda: key.sign(data), n)
        measure("Ed25519 verify, cryptography", lambda: public.verify(signature, data), n)
        if sodium.sign(key, data) is not None:
            measure("Ed25519 sign, libsodium", lambda: sodium.sign(key, data), n)
            measure("Ed25519 verify, libsodium", lambda: sodium.verify(public, signature, data), n)
        measure("shell_2_tempfile(['true']) as a whole (after)", whole, n // 2)
        spawn._unusable, spawn._libc = True, None  # what a machine without a usable posix_spawn does
        measure("shell_2_tempfile(['true']) as a whole, through Popen (before)", whole, n // 2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
