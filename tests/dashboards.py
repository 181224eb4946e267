"""Start a real dashboard process (manage_client.py dashboard) for tests, and talk HTTP to it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import gearclient
from geartask.address import format_address
from geartask.server import free_port

from helpers import REPO, wait_until

MANAGE = REPO / "manage_client" / "manage_client.py"


def queue_background(server, function: str, n: int) -> None:
    """Queue ``n`` background jobs of ``function`` on ``server`` (no worker needed)."""
    conn = gearclient.connect(server.address)
    try:
        gearclient.submit(conn, function, [{"i": i} for i in range(n)], background=True)
    finally:
        conn.close()


def report_outcome(server, **fields) -> dict:
    """Send one outcome record to geartask.outcomes on ``server``, as a worker does (the collector
    the dashboard runs stores it). ``fields`` go to make_record; ``extra`` is set on the record
    afterwards (fields a newer worker sends, e.g. ``traceback``)."""
    from geartask.outcomes import OUTCOME_FUNCTION, encode_batches, make_record
    extra = fields.pop("extra", {})
    rec = make_record(**{"server": server.address, "state": "failed", "worker": "fw:127.0.0.1:1",
                         "background": True, **fields})
    rec.update(extra)
    conn = gearclient.connect(server.address)
    try:
        for payload in encode_batches([rec]):
            conn.send(gearclient.gp.submit_command("normal", True), task=OUTCOME_FUNCTION, unique=rec["id"],
                      data=payload)
            conn.expect(gearclient.gp.JOB_CREATED, 10)
    finally:
        conn.close()
    return rec


class Reply:
    def __init__(self, status: int, headers, body: bytes):  # headers: case-insensitive
        self.status, self.headers, self.body = status, headers, body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.body)


class DashboardProc:
    """``manage_client.py --config CONFIG dashboard --listen 127.0.0.1:PORT --refresh R ...``."""

    def __init__(self, config: Path, *extra: str, refresh: float = 1.0, port: int | None = None,
                 host: str = "127.0.0.1"):
        self.port = port or free_port(host)
        self.host = host
        self.config = config
        self.output = config.parent / f"dashboard-{self.port}.out"
        with open(self.output, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(MANAGE), "--config", str(config), "dashboard", "--listen",
                 format_address(host, self.port), "--refresh", str(refresh), *extra],
                stdout=out, stderr=subprocess.STDOUT, cwd=config.parent)
        self.pid = self.proc.pid
        self.token: str | None = None

    @property
    def url(self) -> str:
        return f"http://{format_address(self.host, self.port)}"

    def wait_ready(self, timeout: float = 20) -> "DashboardProc":
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"dashboard exited with {self.proc.returncode}: {self.text()[-2000:]}")
            try:
                return self.get("/metrics").status in (200, 401)
            except OSError:
                return False
        wait_until(ready, timeout, 0.1, message="the dashboard answers")
        return self

    def request(self, method: str, path: str, data: dict | None = None, headers: dict | None = None,
                timeout: float = 15) -> Reply:
        body = urllib.parse.urlencode(data, doseq=True).encode() if data is not None else None
        hdrs = dict(headers or {})
        if self.token and "Authorization" not in hdrs:
            hdrs["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return Reply(r.status, r.headers, r.read())
        except urllib.error.HTTPError as e:
            return Reply(e.code, e.headers, e.read())

    def get(self, path: str, **kw) -> Reply:
        return self.request("GET", path, **kw)

    def get_json(self, path: str, **kw):
        r = self.get(path + ("&" if "?" in path else "?") + "format=json", **kw)
        assert r.status == 200, (r.status, r.text[:500])
        return r.json()

    def post(self, path: str, data: dict, **kw) -> Reply:
        return self.request("POST", path, data=data, **kw)

    def csrf(self) -> str:
        return self.get_json("/")["csrf"]

    def act(self, action: str, **fields) -> Reply:
        """A confirmed action, as JSON (the CSRF token from a page, confirm=yes)."""
        return self.post(f"/actions/{action}", {"csrf": self.csrf(), "confirm": "yes", **fields},
                         headers={"Accept": "application/json"})

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def stop(self) -> int | None:
        """Teardown: SIGTERM the process we started (then SIGKILL), by its pid."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                return self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode
