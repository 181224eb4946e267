"""How much a worker process takes: worker.max_jobs (exit after N jobs, none lost) and
worker.tasks (a task's own threads, so slow jobs can't take every thread from fast ones).
Real gearmand, real worker processes, a raw client; the counting proxy sees every packet."""

from __future__ import annotations

import collections
import threading
import time

import pytest

import gearclient as gc
from geartask import gearman as gp
from helpers import run_script, wait_until, write_config
from netproxy import SliceProxy
from test_worker import records, start_worker  # noqa: F401 (start_worker: a fixture)
from workers import worker_connections


class AssignCounter:
    """A SliceProxy tap: counts the JOB_ASSIGN packets gearmand sends through the proxy."""

    def __init__(self):
        self.assigned = 0
        self._buffers: dict[int, bytearray] = collections.defaultdict(bytearray)
        self._lock = threading.Lock()

    def __call__(self, pump, chunk: bytes) -> None:
        if not pump.down:
            return
        with self._lock:
            buf = self._buffers[id(pump)]
            buf += chunk
            while (parsed := gp.parse_response(buf)) is not None:
                cmd, _, size = parsed
                del buf[:size]
                if cmd in (gp.JOB_ASSIGN_UNIQ, gp.JOB_ASSIGN):
                    self.assigned += 1


def running(server, function: str) -> int:
    for line in gp.admin_command("127.0.0.1", server.port, "status"):
        parts = line.split("\t")
        if parts[0] == function:
            return int(parts[2])
    return 0


def test_max_jobs_exits_0_after_exactly_that_many_and_every_other_job_runs_elsewhere(gearmand_factory,
                                                                                    start_worker, tmp_path):
    """--max-jobs 100 with 4 threads, through the slicing proxy: gearmand assigns the process
    exactly 100 jobs (no thread grabs one it will not run), it runs them and exits 0; the
    other 200 wait and run on the next worker, each job once."""
    server = gearmand_factory(queue="none")
    counter = AssignCounter()
    marker = tmp_path / "ran.jsonl"
    conn = gc.connect(server.address)
    handles = gc.submit(conn, "t.record", [{"file": str(marker), "id": i, "sleep": 0.005} for i in range(300)])
    with SliceProxy(server.address, tap=counter) as proxy:
        capped = start_worker(proxy.address, name="capped", threads=4, args=("--max-jobs", "100"), wait=False)
        assert capped.wait(60) == 0, capped.text()[-2000:]
    ran = records(marker)
    assert len(ran) == 100 and {r["pid"] for r in ran} == {capped.pid}
    assert counter.assigned == 100
    stopped = [e for e in capped.log_lines() if e.get("event") == "worker stopped"]
    assert stopped and stopped[0]["jobs_done"] == 100 and "max_jobs" in stopped[0]["reason"]
    rest = start_worker(server, name="rest", threads=4)
    outcomes = gc.wait(conn, handles, 60)
    conn.close()
    assert all(o.state == "complete" for o in outcomes.values())
    ran = records(marker)
    assert sorted(r["id"] for r in ran) == list(range(300))
    assert sum(r["pid"] == rest.pid for r in ran) == 200


def test_max_jobs_from_the_config_and_a_slow_last_job_is_finished(gearmand_factory, start_worker, tmp_path):
    """worker.max_jobs: 3, one thread: the third job (slow) is finished before the exit."""
    server = gearmand_factory(queue="none")
    w = start_worker(server, name="three", threads=1, extra="  max_jobs: 3\n")
    outs = gc.run(server.address, "eg.slow", [{"seconds": 0.1}, {"seconds": 0.1}, {"seconds": 1}])
    assert [o.state for o in outs] == ["complete"] * 3
    assert w.wait(30) == 0
    assert not [line for line in worker_connections(server.address) if " three:" in line]


def test_max_jobs_counts_only_jobs_whose_answer_got_out(gearmand, start_worker, tmp_path):
    """--max-jobs 2: a job whose answer never gets out (its task cuts its own connection) is
    requeued by gearmand and not counted; its third coming is refused (answered: 1), then
    one more job (2), then the exit."""
    w = start_worker(gearmand, name="cutcap", threads=1, args=("--max-jobs", "2"))
    marker = tmp_path / "runs.jsonl"
    o = gc.run_one(gearmand.address, "h.cut", {"file": str(marker)}, timeout=60)
    assert o.state == "failed" and "without running it again" in o.reason["error"]
    assert len(records(marker)) == 2
    assert w.proc.poll() is None
    assert gc.run_one(gearmand.address, "eg.reverse", "ab", timeout=20).result == {"reversed": "ba"}
    assert w.wait(30) == 0


def test_a_task_with_threads_of_its_own_cannot_take_every_thread(fresh_gearmand, start_worker):
    """worker.tasks {shell: {threads: 2}} of 10 threads: with 50 slow shell jobs queued, at
    most 2 run at a time, and a fast plugin task is answered at once, each time (without the
    key every thread would be running `sleep 2` and it would wait for one to end)."""
    server = fresh_gearmand
    start_worker(server, name="split", threads=10, extra="  tasks:\n    shell: {threads: 2}\n")
    conn = gc.connect(server.address)
    gc.submit(conn, "shell", [{"cmd": ["sleep", "2"], "timeout": 10}] * 50, background=True)
    wait_until(lambda: running(server, "shell") == 2, 10, message="two shell jobs running")
    seconds = []
    for i in range(8):
        t0 = time.monotonic()
        o = gc.run_one(server.address, "eg.reverse", f"fast{i}", timeout=10)
        seconds.append(time.monotonic() - t0)
        assert o.state == "complete" and o.result == {"reversed": f"{i}tsaf"}
        assert running(server, "shell") <= 2
        time.sleep(0.25)
    assert max(seconds) < 1.0, seconds  # a shell job takes 2 s
    conn.close()


def test_dedicated_threads_register_only_their_task(gearmand, start_worker):
    w = start_worker(gearmand, name="ded", threads=3, extra="  tasks:\n    eg.slow: {threads: 1}\n")
    rows = [line for line in worker_connections(gearmand.address) if f":{w.pid}:" in line]
    # (each task is also registered as TASK@host:HOST, for fleet commands: left out here)
    functions = {line.split()[2].rsplit(":", 1)[1]: [f for f in line.split()[4:] if "@host:" not in f] for line in rows}
    assert functions["1"] == ["eg.slow"]
    assert "eg.slow" not in functions["2"] and "shell" in functions["2"] and "eg.reverse" in functions["3"]


@pytest.mark.parametrize("args, extra, message", [
    (["--max-jobs", "-1"], "", "--max-jobs must be 0 (no limit) or more, got -1"),
    ([], "  max_jobs: -1\n", "worker.max_jobs: must not be negative"),
    ([], "  tasks:\n    nope: {threads: 1}\n", "worker.tasks.nope: 'nope' is not a task this worker serves"),
    ([], "  tasks:\n    shell: {threads: 4}\n", "worker.tasks: the dedicated threads (4) leave none of the 4"),
    ([], "  tasks:\n    shell: {threads: 9}\n", "worker.tasks: the dedicated threads (9) are more than the 4"),
    ([], "  tasks:\n    shell: {threads: 0}\n", "worker.tasks.shell.threads: must be greater than 0"),
    ([], "  tasks:\n    shell: 2\n", "worker.tasks.shell: expected a mapping"),
    ([], "  tasks:\n    shell: {thread: 2}\n", "worker.tasks.shell.thread: unknown key"),
])
def test_bad_limits_exit_2_naming_the_key_and_start_nothing(gearmand, tmp_path, args, extra, message):
    cfg = write_config(tmp_path / "c.yaml", [gearmand.address], "worker:\n  poll_timeout: 1\n" + extra)
    r = run_script("worker_client/runworkers.py", "--config", str(cfg), "--name", "badlimit", "--threads", "4",
                   *args, timeout=30)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not [line for line in worker_connections(gearmand.address) if " badlimit:" in line]
