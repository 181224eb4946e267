"""What `geartask send status` costs against N background records (issue 22, item 9).

Starts a private gearmand and an outcomes collector on loopback, stores N finished outcomes
(through the collector's `import` op) and writes N background-record lines for them (handles
gearmand no longer knows: finished jobs), then runs `geartask send status` and reports its wall
time and the gearmand process's CPU time (utime+stime from /proc/PID/stat) before and after.

    .venv/bin/python bench/send_status_scale.py [N] [-- extra send status args]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from geartask.config import load_config  # noqa: E402
from geartask.outcomes.client import OutcomeClient  # noqa: E402
from geartask.server import LocalServer, free_port  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] != "--" else 20_000
    extra = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        port = free_port()
        srv = LocalServer(host="127.0.0.1", port=port, run_dir=base / "gearmand", queue_type="none")
        srv.start()
        config_path = base / "config.yaml"
        config_path.write_text(f"servers:\n  - 127.0.0.1:{port}\nlog:\n  dir: logs\n"
                               f"outcomes:\n  path: outcomes.sqlite\n")
        config = load_config(config_path)
        collector = subprocess.Popen([sys.executable, "-m", "geartask", "manage", "outcomes", "serve",
                                      "--config", str(config_path)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        try:
            client = OutcomeClient(config, timeout=10)
            deadline = time.monotonic() + 30
            while True:
                try:
                    client.ping()
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
            now = time.time()
            server = f"127.0.0.1:{port}"
            lines = []
            for start in range(0, n, 5000):
                recs = []
                for i in range(start, min(n, start + 5000)):
                    state = "failed" if i % 10 == 0 else "complete"
                    recs.append({"id": f"id-{i}", "server": server, "handle": f"H:bench:{i}", "unique": f"u-{i}",
                                 "task": "eg.reverse" if i % 2 else "eg.slow", "state": state,
                                 "finished_at": now - (n - i) * 0.01, "attempts": 1, "background": True,
                                 **({"result": f"r{i}"} if state == "complete" else {"reason": "boom"})})
                    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now - (n - i) * 0.01))
                    lines.append(json.dumps({"time": stamp, "task": recs[-1]["task"], "unique": f"u-{i}",
                                             "handle": f"H:bench:{i}", "server": server, "priority": "normal",
                                             "host": "bench", "pid": 1}))
                added = client.import_records(recs)
                assert added["refused_count"] == 0, added
            (base / "logs").mkdir(exist_ok=True)
            (base / "logs" / "sender-background.jsonl").write_text("\n".join(lines) + "\n")
            pid = srv.pid()
            before = cpu_seconds(pid)
            t0 = time.monotonic()
            r = subprocess.run([sys.executable, "-m", "geartask", "send", "status", "--config", str(config_path),
                                *extra], capture_output=True, text=True)
            wall = time.monotonic() - t0
            after = cpu_seconds(pid)
            out = r.stdout.splitlines()
            print(json.dumps({"records": n, "args": extra, "exit": r.returncode, "lines": len(out),
                              "last_line": out[-1] if out else None, "wall_s": round(wall, 2),
                              "gearmand_cpu_s": round(after - before, 2),
                              "stderr": r.stderr[-300:]}))
        finally:
            collector.terminate()
            collector.wait(10)
            srv.stop()


if __name__ == "__main__":
    main()
