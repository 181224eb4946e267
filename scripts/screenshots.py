#!/usr/bin/env python3
"""Screenshots of the dashboard for docs/: the Overview and a failed job's Job page.

Starts everything for real on loopback: a private gearmand on a free port, one worker
process, the dashboard (with its collector), a small batch of jobs (some complete, one
plugin task that raises, a few left queued), then drives Debian's headless chromium through
its packaged chromedriver and saves two PNGs:

    .venv/bin/python scripts/screenshots.py PREFIX        # docs/img/PREFIX-overview.png,
                                                          # docs/img/PREFIX-failed-job.png
Everything it starts is stopped by pid at the end; its files live in a temporary folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from geartask.config import load_config  # noqa: E402
from geartask.server import LocalServer, free_port  # noqa: E402

PLUGIN = '''
from geartask import hookimpl

def parse_row(text):
    fields = text.split(",")
    return {"id": int(fields[0]), "amount": float(fields[1])}

def ingest(job):
    """Parses one CSV row; a bad row raises from inside parse_row (a traceback worth showing)."""
    return parse_row(job.data["row"])

def slowish(job):
    import time
    for i in range(1, 31):
        time.sleep(1)
        job.status(i, 30)
    return {"ok": True}

@hookimpl
def geartask_tasks():
    return {"billing.ingest_invoice_rows": ingest, "billing.slowish": slowish}
'''


def wait(what: str, check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise SystemExit(f"screenshots: timed out waiting for {what}")


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def main(argv: list[str]) -> int:
    prefix = argv[0] if argv else "after"
    out_dir = REPO / "docs" / "img"
    out_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="geartask-shots-") as tmp:
        base = Path(tmp)
        server = LocalServer(host="127.0.0.1", port=free_port(), run_dir=base / "gearmand",
                             queue_path=base / "gearmand" / "queue.sqlite")
        server.start()
        try:
            (base / "plugins").mkdir()
            (base / "plugins" / "billing.py").write_text(PLUGIN)
            config = base / "config.yaml"
            config.write_text(f"servers: [{server.address}]\nlog: {{dir: logs}}\n"
                              f"plugins: {{paths: [{base / 'plugins'}]}}\n"
                              "worker:\n  shell: {allow: [echo, sh]}\n  retries: 0\n"
                              f"outcomes: {{path: {base / 'outcomes.sqlite'}}}\n")
            cfg = load_config(config)
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            geartask = [sys.executable, "-m", "geartask", "--config", str(config)]
            (REPO / "var").mkdir(exist_ok=True)
            log = open(REPO / "var" / "screenshots-procs.out", "w")  # the processes' output, kept to read
            procs.append(subprocess.Popen([*geartask, "manage", "dashboard", "--listen", f"127.0.0.1:{port}",
                                           "--refresh", "2"], cwd=base, stdout=log, stderr=log))
            procs.append(subprocess.Popen([*geartask, "worker", "--name", "billing-1", "--threads", "2"],
                                          cwd=base, stdout=log, stderr=log))
            wait("the dashboard", lambda: answers(url + "/metrics"))
            time.sleep(3)  # the worker attaches and the collector registers
            from geartask.sender.sender import JobSender
            jobs = [{"task": "shell", "data": {"cmd": ["echo", f"row {i}"]}, "background": True}
                    for i in range(40)]
            jobs += [{"task": "billing.ingest_invoice_rows", "data": {"row": f"{i},{i * 1.5}"},
                      "background": True} for i in range(20)]
            jobs.append({"task": "billing.ingest_invoice_rows", "data": {"row": "1042,<b>12.50 EUR</b>"},
                         "unique": "invoice-row-1042", "background": True})
            jobs.append({"task": "billing.slowish", "data": {}, "unique": "slow-report", "background": True})
            with JobSender(cfg, record_background=False) as sender:
                sender.submit_many(jobs, wait=False)
                wait("the failed outcome", lambda: answers(url + "/job?key=invoice-row-1042&format=json")
                     and b'"failed"' in urllib.request.urlopen(url + "/job?key=invoice-row-1042&format=json",
                                                               timeout=5).read())
                # a few jobs nobody serves, so the Overview shows a queue
                sender.submit_many([{"task": "reports.nightly_export_to_warehouse", "data": {"n": i},
                                     "background": True} for i in range(5)], wait=False)
            time.sleep(5)  # two refreshes: the queue and the running job show

            from selenium import webdriver
            from selenium.webdriver.chrome.service import Service
            options = webdriver.ChromeOptions()
            options.binary_location = "/usr/bin/chromium"
            for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--no-first-run", "--disable-background-networking", "--disable-component-update",
                         "--disable-sync", "--window-size=1280,1000", f"--user-data-dir={base / 'chromium'}"):
                options.add_argument(flag)
            driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
            try:
                for page, name in (("/", "overview"), ("/job?key=invoice-row-1042", "failed-job")):
                    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
                    driver.get(url + page)
                    time.sleep(1)
                    height = driver.execute_script("return document.documentElement.scrollHeight")
                    # the whole page in one shot (headless chromium's window ignores set_window_size)
                    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
                        "width": 1280, "height": min(max(height, 700), 3000), "deviceScaleFactor": 1,
                        "mobile": False})
                    time.sleep(0.5)
                    target = out_dir / f"{prefix}-{name}.png"
                    driver.save_screenshot(str(target))
                    print(f"wrote {target.relative_to(REPO)}")
            finally:
                driver.quit()
        finally:
            for p in reversed(procs):
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGTERM)
                    try:
                        p.wait(20)
                    except subprocess.TimeoutExpired:
                        os.kill(p.pid, signal.SIGKILL)
                        p.wait(5)
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
