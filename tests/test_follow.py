"""``send shell --follow`` end to end: real gearmand, real worker processes, the real sender
(as a user runs it) and the real dashboard. The chunker's rules on their own, with a fake
clock: tests/test_follow_stream.py."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from geartask.config import load_config
from geartask.sender.sender import JobSender
from geartask.shell.stream import MAX_CHUNK, TAIL, parse_chunk, worker_host
from dashboards import DashboardProc
from helpers import PYTHON, REPO, wait_until, write_config
from workers import WorkerProc

SENDER = REPO / "send_job_client" / "send_job_client.py"
WORKER = """worker:
  poll_timeout: 1
  shell:
    allow: [sh]
    heartbeat: 0.5
"""
LINES = "for i in 1 2 3; do echo $i; sleep 1; done"
# 200 MB in 40 writes of 5 MB, 0.1 s apart: a flood that lasts a few seconds, so the
# sender's memory is watched while it goes on, ending with a line that must be kept.
FLOOD_BYTES = 200_000_000
FLOOD = ("i=0; while [ $i -lt 40 ]; do yes 0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLM | head -c 5000000; "
         "i=$((i+1)); sleep 0.1; done; echo the end")


@pytest.fixture
def setup(gearmand, tmp_path):
    config = write_config(tmp_path / "config.yaml", [gearmand.address], WORKER)
    procs: list = []

    class Setup:
        path = config

        @staticmethod
        def worker(name: str = "fw", threads: int = 2) -> WorkerProc:
            w = WorkerProc(config, name, threads)
            procs.append(w)
            return w.wait_attached([gearmand.address])

        @staticmethod
        def dashboard() -> DashboardProc:
            d = DashboardProc(config, refresh=0.5)
            procs.append(d)
            return d.wait_ready()

    yield Setup
    for p in reversed(procs):
        p.stop()


def send(config: Path, *args: str, stdout=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, str(SENDER), "--config", str(config), "shell", *args], stdout=stdout,
                            stderr=subprocess.PIPE, text=True, cwd=config.parent)


def test_follow_prints_each_line_as_the_command_writes_it(setup):
    setup.worker()
    host = worker_host()
    proc = send(setup.path, "--follow", "--timeout", "60", "--", "sh", "-c", LINES + "; echo oops >&2")
    seen: list[tuple[float, str]] = []
    try:
        for line in proc.stdout:  # each line as the sender prints it
            seen.append((time.monotonic(), line.rstrip("\n")))
        assert proc.wait(30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = [line for _, line in seen]
    assert text[:4] == [f"{host} | 1", f"{host} | 2", f"{host} | 3", f"{host} |! oops"], text
    end = next(t for t, line in seen if line.startswith("complete"))
    at = {line: t for t, line in seen}
    # Each line was printed while the command still ran: "1" at least 2 s of sleeps before
    # the result, "2" at least 1 s before it (not exact timings: the machine is shared).
    assert at[f"{host} | 1"] + 1.5 < end and at[f"{host} | 2"] + 0.5 < end
    assert at[f"{host} | 1"] < at[f"{host} | 2"] < at[f"{host} | 3"] <= end


def test_follow_through_slicing_proxies(gearmand, tmp_path):
    """Loopback hands over whole packets: here the worker and the sender each reach gearmand
    through a proxy that cuts the byte stream into 1-48 byte slices, both ways. Every streamed
    line still arrives, in order, before the result, and a 300 KiB burst (chunks near the 64 KiB
    cap, each sliced thousands of times) is streamed or counted as dropped, to the byte."""
    from netproxy import SliceProxy
    with SliceProxy(gearmand.address, seed=7) as to_worker, SliceProxy(gearmand.address, seed=8) as to_sender:
        wconf = write_config(tmp_path / "worker.yaml", [to_worker.address], WORKER)
        sconf = write_config(tmp_path / "sender.yaml", [to_sender.address], WORKER)
        w = WorkerProc(wconf, "sliced", 1)
        try:
            w.wait_attached([to_worker.address])
            host = worker_host()
            # 307,200 x in 301 lines of at most 1,023 (fold), each ended by a newline
            burst = "head -c 307200 /dev/zero | tr '\\0' x | fold -w 1023; echo; echo after"
            proc = send(sconf, "--follow", "--timeout", "90", "--", "sh", "-c", LINES + "; " + burst)
            out, err = proc.communicate(timeout=120)
        finally:
            w.stop()
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[:3] == [f"{host} | 1", f"{host} | 2", f"{host} | 3"], lines[:5]
    assert f"{host} | after" in lines and lines.index(f"{host} | after") < next(
        i for i, line in enumerate(lines) if line.startswith("complete"))
    shown = sum(len(line) - len(f"{host} | ") + 1 for line in lines if line.startswith(f"{host} | x"))
    dropped = [int(line.split("|# ")[1].split()[0]) for line in lines if "bytes of output were not streamed" in line]
    assert shown > 0 and shown + (dropped[0] if dropped else 0) == 307200 + 301, (shown, dropped)
    assert to_worker.slices > 1000 and to_sender.slices > 1000


def test_follow_with_background_or_json_is_a_usage_error(setup):
    for extra in (["--background"], ["--json"], ["--no-wait"]):
        proc = send(setup.path, "--follow", *extra, "--", "sh", "-c", "true")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 2 and "--follow" in err and "Traceback" not in err, (extra, err)


def test_a_flood_is_rate_limited_counted_and_the_result_keeps_the_last_64_KiB(setup):
    """The Python API: every chunk within the cap, about 10 a second, every byte either
    streamed or counted as dropped, and the result's output the last 64 KiB."""
    setup.worker()
    chunks: list[bytes] = []
    with JobSender(load_config(setup.path), record_background=False) as sender:
        t0 = time.monotonic()
        r = sender.submit("shell", {"cmd": ["sh", "-c", FLOOD], "follow": True}, timeout=120,
                          on_data=lambda res, raw: chunks.append(raw))
        seconds = time.monotonic() - t0
    assert r.state == "complete", r.error
    assert r.data == []  # handed to on_data, not kept
    result = r.result
    assert result["returncode"] == 0 and result["cut"] is True
    assert result["output"].endswith("the end\n") and len(result["output"].encode()) <= TAIL
    parsed = [parse_chunk(c) for c in chunks]
    assert all(c is not None for c in parsed) and max(len(c) for c in chunks) <= MAX_CHUNK
    assert len(chunks) <= seconds * 10 + 3, (len(chunks), seconds)
    streamed = sum(len(text.encode()) for c in parsed for _, text in c.parts)
    total = FLOOD_BYTES + len("the end\n")
    assert parsed[-1].dropped == result["dropped"] > FLOOD_BYTES // 2
    assert streamed + result["dropped"] == total
    assert parsed[-1].parts[-1][1].endswith("the end\n")  # the newest output is the one kept


def _rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def test_a_200_MB_flood_leaves_the_sender_and_gearmand_flat(setup, gearmand, tmp_path):
    setup.worker()
    gearmand_pid = int(Path(gearmand.pid_file).read_text().split()[0])
    out_path = tmp_path / "follow.out"
    with open(out_path, "w") as out:
        proc = send(setup.path, "--follow", "--timeout", "120", "--", "sh", "-c", FLOOD, stdout=out)
    sender: list[int] = []
    server: list[int] = []
    streaming = None  # index of the sender's first sample after it printed streamed output
    deadline = time.monotonic() + 120
    try:
        while proc.poll() is None and time.monotonic() < deadline:  # bounded: the sender's own timeout
            printed = out_path.stat().st_size > 0
            for pid, samples in ((proc.pid, sender), (gearmand_pid, server)):
                kb = _rss_kb(pid)
                if kb is not None:
                    samples.append(kb)
            if printed and streaming is None and sender:
                streaming = len(sender) - 1
            time.sleep(0.05)
        assert proc.wait(10) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out_path.read_text()
    lines = text.splitlines()
    host = worker_host()
    assert any(line.startswith(f"{host} |# ") and "bytes of output dropped so far" in line for line in lines)
    final = [line for line in lines if "bytes of output were not streamed" in line]
    assert len(final) == 1 and int(final[0].split("|# ")[1].split()[0]) > FLOOD_BYTES // 2
    assert f"{host} | the end" in lines
    assert len(text) < 40 * 1024 * 1024  # printed: a small share of the 200 MB
    # Flat: once the sender was streaming (started up, imports done), its memory grew by a few
    # MB at most, not by the flood.
    assert streaming is not None and len(sender) - streaming > 20, (streaming, sender)
    running = sender[streaming:]
    assert max(running) - running[0] < 16 * 1024, (running[0], max(running))
    assert max(server) - server[0] < 32 * 1024, (server[0], max(server))


def test_the_dashboard_serves_a_running_jobs_live_output(setup, tmp_path):
    from geartask.fleet import Admin
    setup.worker()
    d = setup.dashboard()
    config = load_config(setup.path)
    unique = f"follow-{time.monotonic_ns()}"
    plain = unique + "-plain"
    answers: dict = {}

    def run(key: str, follow: bool) -> None:
        with JobSender(config, record_background=False) as sender:
            answers[key] = sender.submit("shell", {"cmd": ["sh", "-c", "echo first line; echo '<b>bold</b>' >&2; "
                                                   "sleep 60"], "follow": follow}, unique=key, timeout=90,
                                         on_data=lambda r, raw: None)
    threads = [threading.Thread(target=run, args=(unique, True)), threading.Thread(target=run, args=(plain, False))]
    for t in threads:
        t.start()
    try:
        def live():
            jobs = d.get(f"/job/output?key={unique}").json()["jobs"]
            return jobs and jobs[0]["live"] and "<b>bold</b>" in jobs[0]["output"] and jobs[0]
        job = wait_until(live, 30, 0.2, message="the running job's output from the dashboard")
        assert job["output"] == "first line\n<b>bold</b>\n" and job["running"] is True
        assert job["host"] == worker_host() and job["error"] is None and job["bytes"] == len(job["output"])
        page = d.get(f"/job?key={unique}")
        assert page.status == 200 and 'id="live-output"' in page.text and "live_output.js" in page.text
        assert "application/json" in d.get(f"/job/output?key={unique}").headers["Content-Type"]
        other = wait_until(lambda: d.get(f"/job/output?key={plain}").json()["jobs"], 30, 0.2,
                           message="the unfollowed job listed")
        assert other[0]["live"] is False and other[0]["output"] == "" and other[0]["running"] is True
        assert d.get("/job/output?key=no-such-job").json() == {"key": "no-such-job", "jobs": []}
    finally:
        admin = Admin.from_config(config)
        for key in (unique, plain):
            wait_until(lambda: admin.stop_job(key).jobs, 30, message=f"{key} stopped")
        for t in threads:
            t.join(60)
    assert answers[unique].state == "failed" and "stopped by operator" in json.dumps(answers[unique].error)


def test_a_hostile_worker_cannot_fool_the_terminal_or_the_printer(fresh_gearmand, tmp_path):
    """Whatever answers the job sends the chunks: malformed and oversized ones are counted and
    ignored, escape sequences and newlines in hosts and text are shown escaped."""
    from geartask import gearman as gp
    from test_hostile_sender import hostile_worker
    config = write_config(tmp_path / "hostile.yaml", [fresh_gearmand.address])
    good = json.dumps({"host": "evil\nhost\x1b[31m", "parts": [["stdout", "ok\x1b[2J\nline2\r\n"],
                                                               ["stderr", "\x07bell\n"]], "dropped": 0}).encode()
    huge = json.dumps({"host": "h", "parts": [["stdout", "x" * 200_000]], "dropped": 0}).encode()
    hostile_worker(fresh_gearmand.address, "shell", lambda h: [
        (gp.WORK_DATA, b"not json"), (gp.WORK_DATA, b"[" * 200_000), (gp.WORK_DATA, huge),
        (gp.WORK_DATA, good), (gp.WORK_COMPLETE, b'{"returncode": 0}')])
    proc = send(config, "--follow", "--timeout", "30", "--", "sh", "-c", "true")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "\x1b" not in out and "\x07" not in out and "Traceback" not in err
    host = "evil\\nhost\\x1b[31m"
    assert out.splitlines()[:4] == [f"{host} | ok\\x1b[2J", f"{host} | line2", f"{host} |! \\x07bell",
                                    f"{host} |# 3 malformed output chunk(s) ignored"], out
