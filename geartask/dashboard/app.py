"""The dashboard's web application (Flask): pages, their JSON, the actions and /metrics.

Pages are rendered on the server; a few lines of vendored JavaScript fetch the page's live
part again every refresh. Every page is also JSON (``Accept: application/json`` or
``?format=json``). Every action is a POST that carries the CSRF token and is confirmed on a
page of its own (``confirm=yes``; shutting down "now" needs a second ``confirm_now=yes``),
and is logged with the client's address. With a token, every request must carry it.
"""

from __future__ import annotations

import base64
import hmac
import json
import secrets
import time
from argparse import ArgumentTypeError
from dataclasses import dataclass, field
from typing import Any, Callable

from flask import Flask, Response, jsonify, render_template, request
from markupsafe import Markup
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..fleet import (Admin, ServerResult, check_clear_function, check_handle, check_host, check_worker_name,
                     plain)
from ..fleet.server import server_job_status
from ..address import format_address, format_host, split_address
from ..cli import duration
from .. import targets
from ..display import printable
from ..errors import GeartaskError, UsageError
from ..logs import get_logger
from ..metrics import dashboard_families, job_families, registry_for, server_families, worker_families
from .charts import Series, time_chart
from .fleet import HISTORY_SECONDS, FleetMonitor, Look
from .outcomes import FAILED_LIMIT, OutcomesView

log = get_logger("geartask.dashboard")

TOKEN_COOKIE = "geartask_dashboard_token"
RESULT_SHOWN = 64 * 1024  # characters of a job's result shown on the Job page; the rest is cut
JOBS_SHOWN = 500  # jobs per server on the Jobs page
SORT_KEYS = ("function", "queued", "running", "workers")
FUNCTIONS_SHOWN = 500  # rows on the Functions page (refetched every refresh): anyone can register names
PROGRESS_ASKED = 10  # running entries of one key whose progress is asked of gearmand per page
INTERNAL_PREFIX = "geartask."  # geartask's own queues (outcomes, queries, worker control): never cleared here
THROUGHPUT_MINUTES = 60  # the throughput chart's span, the current minute included
THROUGHPUT_CACHE = 5.0  # seconds one read of the outcome store serves every page that shows it
def parse_duration(text: str, what: str) -> float:
    """'30m', '1h', '7d' -> seconds (geartask.cli.duration); UsageError naming ``what`` otherwise."""
    try:
        return duration(text.strip())
    except ArgumentTypeError as e:
        raise UsageError(f"{what}: {e}") from None


@dataclass
class Settings:
    refresh: float
    token: str = ""  # empty: no token (loopback only)
    allowed_hosts: set[str] = field(default_factory=set)  # Host header names accepted without a token
    collector: str = "off"  # what runs the collector: "in this process", "elsewhere", "off"
    collector_stopped: Callable[[], str | None] | None = None  # why this process's collector stopped, if it did


# -- small view helpers -------------------------------------------------------------------

def safe_back(value: Any) -> str:
    """A ``back`` link from a form: a path on this dashboard, else "/". Browsers read ``/\\host``
    and ``//host`` as another site, so only "/" followed by neither is kept (no open redirect)."""
    if not isinstance(value, str) or not value.startswith("/") or value.startswith(("//", "/\\")):
        return "/"
    if "\\" in value or not value.isprintable() or len(value) > 2000:
        return "/"
    return value


def cookie_value(token: str) -> str:
    """What the token cookie holds: derived from the token, so a cookie read off a disk or a
    proxy log is not the token itself (it can't be used as a Bearer token elsewhere)."""
    return hmac.new(token.encode(), b"geartask-dashboard-cookie", "sha256").hexdigest()

def when(ts: float | None) -> str:
    """A time from a record (a peer's: any float, 1e300 or -1 too) as UTC text; never raises."""
    if ts is None:
        return "-"
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        return "?"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) + " UTC"
    except (OverflowError, OSError, ValueError):  # a time no calendar holds
        return f"{ts:.6g} (not a date)"


def ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or ts != ts:
        return "?"
    s = max(time.time() - ts, 0)
    if s == float("inf"):
        return "?"
    return f"{s:.0f}s ago" if s < 120 else (f"{s / 60:.0f}m ago" if s < 7200 else f"{s / 3600:.1f}h ago")


def throughput_chart(data: dict) -> Markup:
    """The Overview's throughput chart: completed and failed outcomes per minute, last hour."""
    minutes = data["minutes"]
    end = data["to"]

    def points(state: str) -> list[tuple[float, float]]:  # each minute at its middle (the current one: now)
        return [(min(m["minute"] + 30, end), m[state]) for m in minutes]
    return time_chart([Series("completed", points("complete"), "complete"), Series("failed", points("failed"), "failed")],
                      data["from"], end, y_label="jobs per minute", x_label="time (UTC)",
                      title="completed and failed jobs per minute, last hour")


def depth_chart(name: str, points: list, now: float, current: int | None = None) -> Markup:
    """A function's queue depth over the last hour, on axes (queued jobs against minutes ago).
    The history keeps each 10 s step's deepest count; ``current`` (this look's count) ends the
    line, so it ends where "queued now" says."""
    line = [(t, v) for t, v in points] + ([(now, current)] if current is not None else [])
    return time_chart([Series("queued", line, "queued")], now - HISTORY_SECONDS, now,
                      y_label="queued", x_label="minutes ago", width=300, height=130, relative=True,
                      css="tchart small", title=f"jobs of {printable(name)} waiting for a worker, last hour")


def _server_rows(look: Look) -> list[dict]:
    return [{k: s[k] for k in ("server", "up", "error", "version", "rtt_ms")} for s in look.servers]


def _results(results: list[ServerResult]) -> list[dict]:
    return [r.to_dict() for r in results]


def is_internal(function: str) -> bool:
    """One of geartask's own queues: clearing geartask.outcomes loses every outcome waiting there."""
    return function.startswith(INTERNAL_PREFIX)


def clearable(function: str) -> str:
    """The function a Clear may empty; UsageError for a bad name or an internal queue."""
    fn = check_clear_function(function)
    if is_internal(fn):
        raise UsageError(f"{printable(fn)[:200]} is one of geartask's internal queues: the dashboard does not "
                         "clear it (nothing was changed); use 'geartask manage clear' if you really must")
    return fn


def shown_outcome(rec: dict) -> dict:
    """One outcome record as the Job page shows it, and its JSON holds: the result pretty when it
    is JSON, the input data, result, reason and traceback each cut to RESULT_SHOWN characters
    (flagged ``*_shown_cut``). Everything in it is a peer's: the template escapes it."""
    rec = dict(rec)
    reason = rec.get("reason")
    if isinstance(reason, dict) and isinstance(reason.get("traceback"), str):
        # the traceback once, in its own section, not again inside the reason's JSON
        rec.setdefault("traceback", reason["traceback"])
        rec["reason"] = {k: v for k, v in reason.items() if k != "traceback"}
    result = rec.get("result")
    if isinstance(result, str):
        rec["result_shown_cut"] = len(result) > RESULT_SHOWN
        text = result[:RESULT_SHOWN]
        try:
            text = json.dumps(json.loads(text), indent=2, ensure_ascii=False) if not rec["result_shown_cut"] \
                and rec.get("result_encoding", "text") == "text" else text
        except (ValueError, RecursionError):
            pass
        rec["result_text"] = text
    if rec.get("reason") is not None and not isinstance(rec["reason"], str):
        # readable JSON for the page (the template escapes it): tojson would show < as \u003c
        rec["reason_text"] = json.dumps(rec["reason"], indent=2, ensure_ascii=False, sort_keys=True)[:RESULT_SHOWN]
    if rec.get("traceback") is not None and not isinstance(rec["traceback"], str):
        rec["traceback"] = json.dumps(rec["traceback"], ensure_ascii=False)  # not text: shown as its JSON
    # One rule for the HTML and the JSON: the JSON holds no more than the page (docs/dashboard.md, "Job").
    for name in ("data", "result", "reason", "traceback"):
        if isinstance(rec.get(name), str) and len(rec[name]) > RESULT_SHOWN:
            rec[name], rec[f"{name}_shown_cut"] = rec[name][:RESULT_SHOWN], True
    return rec


class Dashboard:
    """The application and what it reads: the fleet monitor, the admin API, the outcomes."""

    def __init__(self, admin: Admin, monitor: FleetMonitor, settings: Settings, outcomes: OutcomesView):
        self.admin, self.monitor, self.settings, self.outcomes = admin, monitor, settings, outcomes
        self._schedule_cache: tuple[list, str | None] | None = None
        self._throughput: tuple[float, dict] | None = None
        self.csrf = secrets.token_urlsafe(32)  # per process: a page from here is needed to act
        self.registry = registry_for(self._families)
        self.app = Flask(__name__)
        self.app.jinja_env.filters.update(p=printable, when=when, ago=ago)
        self.app.jinja_env.globals.update(throughput_chart=throughput_chart, depth_chart=depth_chart,
                                          csrf=lambda: self.csrf,
                                          refresh=lambda: settings.refresh)
        self._routes()

    # -- request checks ---------------------------------------------------------------------
    def _token_ok(self) -> bool:
        token = self.settings.token.encode()
        given: list[str] = []
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given.append(auth[7:].strip())
        elif auth.startswith("Basic "):
            try:
                given.append(base64.b64decode(auth[6:], validate=True).decode().partition(":")[2])
            except (ValueError, UnicodeDecodeError):
                pass
        given.append(request.args.get("token", ""))
        cookie = request.cookies.get(TOKEN_COOKIE, "")
        if cookie and hmac.compare_digest(cookie.encode(), cookie_value(self.settings.token).encode()):
            return True
        return any(g and hmac.compare_digest(g.encode(), token) for g in given)

    @staticmethod
    def _origin_ok() -> bool:
        """An action's Origin (sent by browsers on every POST) must be this dashboard's own:
        a page elsewhere can't act even if it got hold of a CSRF token. No Origin (curl, a
        script) passes: those carry the CSRF token or the dashboard token explicitly."""
        origin = request.headers.get("Origin")
        if origin is None:
            return True
        from urllib.parse import urlsplit
        try:
            netloc = urlsplit(origin).netloc.lower()
        except ValueError:
            return False
        hosts = {(request.host or "").lower(), (request.headers.get("X-Forwarded-Host") or "").lower()} - {""}
        return netloc in hosts

    def _check_request(self) -> Response | None:
        if self.settings.token:
            if not self._token_ok():
                return Response("401: this dashboard needs its token (dashboard.token): log in with any user "
                                "name and the token as password, or send 'Authorization: Bearer TOKEN'\n",
                                401, {"WWW-Authenticate": 'Basic realm="geartask dashboard"',
                                      "Content-Type": "text/plain; charset=utf-8"})
        else:
            # Without a token the dashboard is on loopback: a page elsewhere that rebinds its own
            # DNS name to 127.0.0.1 must not get to read or act here (DNS rebinding).
            try:  # 'name:port', '[v6]:port' or a name alone
                host = split_address(request.host or "")[0].lower()
            except ValueError:
                host = ""
            if host not in self.settings.allowed_hosts:
                return Response(f"400: unexpected Host {printable(host)[:80]!r}\n", 400,
                                {"Content-Type": "text/plain; charset=utf-8"})
        return None

    def _after(self, resp: Response) -> Response:
        resp.headers.setdefault("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; "
                                                           "frame-ancestors 'none'; form-action 'self'")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        # same-origin, not no-referrer: with no-referrer Chromium sends "Origin: null" on the
        # dashboard's own form posts, and the Origin check (a "null" origin may be a sandboxed
        # page elsewhere) would refuse every action; other sites still get no referrer
        resp.headers.setdefault("Referrer-Policy", "same-origin")
        resp.headers.setdefault("Cache-Control", "no-store")
        if self.settings.token and request.args.get("token") and self._token_ok():
            secure = request.is_secure  # served over TLS, or by a proxy on 127.0.0.1 that says X-Forwarded-Proto: https
            resp.set_cookie(TOKEN_COOKIE, cookie_value(self.settings.token), httponly=True, samesite="Strict",
                            secure=secure)
        return resp

    # -- rendering ----------------------------------------------------------------------------
    @staticmethod
    def wants_json() -> bool:
        if request.args.get("format") == "json":
            return True
        best = request.accept_mimetypes.best_match(["text/html", "application/json"])
        return best == "application/json" and request.accept_mimetypes["application/json"] > \
            request.accept_mimetypes["text/html"]

    def page(self, template: str, data: dict, **extra: Any) -> Any:
        if self.wants_json():
            return jsonify({**data, "csrf": self.csrf})
        return render_template(template, fragment=request.args.get("fragment") == "1", data=data,
                               path=request.path, **extra)

    def _families(self) -> list:
        look = self.monitor.latest()
        return (server_families(look.servers) + job_families(self.monitor.counters.snapshot())
                + worker_families(look.replies) + dashboard_families(self.monitor.counters))

    # -- page data ------------------------------------------------------------------------------
    def overview_data(self) -> dict:
        look = self.monitor.latest()
        functions = look.functions()
        charts = self.monitor.charts()
        return {
            "taken_at": look.taken_at, "servers": _server_rows(look),
            "totals": {"queued": sum(f["queued"] for f in functions),
                       "running": sum(f["running"] for f in functions),
                       "workers": len(look.processes), "silent": sum(p.silent for p in look.processes),
                       "hosts": len({p.host for p in look.processes}),
                       "connections": sum(f["workers"] for f in functions)},
            "hosts": [{"host": h, "processes": sorted(f"{p.name}:{p.pid}" for p in look.processes if p.host == h),
                       "names": sorted({p.hostname for p in look.processes if p.host == h and p.hostname})}
                      for h in sorted({p.host for p in look.processes})],
            # the fleet(s) the workers say they belong to; "filter": the config's fleet, the only one shown
            "fleets": {"filter": self.admin.fleet, "seen": sorted({p.fleet for p in look.processes if p.fleet})},
            "rates": self.monitor.rates(),
            # busy functions first (queued now or within the hour), then the idle ones, by name;
            # a targeted name (TASK@host:H, TASK@label:L: every worker registers them) only when
            # it had jobs this hour, or the page would list each task once per host and label
            "charts": {name: [[round(t, 1), v] for t, v in pts] for name, pts in
                       sorted(charts.items(), key=lambda kv: (not any(v for _, v in kv[1]), kv[0]))
                       if targets.parse(name) is None or any(v for _, v in pts)},
            # what the charts' "now" says: this look's count, the same as the Queued tile adds up
            "queued_now": {f["function"]: f["queued"] for f in functions},
            "throughput": self.throughput_data(),
            "collector": self.collector_state(),
        }

    def throughput_data(self) -> dict:
        """Outcomes per minute over the last hour, from the outcome store (so a restarted
        dashboard shows the hour it did not watch): every minute, zeros included."""
        now = time.time()
        cached = self._throughput
        if cached is not None and 0 <= now - cached[0] < THROUGHPUT_CACHE:
            return cached[1]
        start = int(now // 60) * 60 - (THROUGHPUT_MINUTES - 1) * 60
        minutes = {start + 60 * i: {"complete": 0, "failed": 0} for i in range(THROUGHPUT_MINUTES)}
        error = None
        try:
            for row in self.outcomes.per_minute(start):
                counts = minutes.get(int(row["minute"]))
                if counts is not None and row["state"] in counts:
                    counts[row["state"]] += row["count"]
        except GeartaskError as e:  # the collector elsewhere did not answer: an empty chart, and why
            error = str(e)
        rows = [{"minute": m, **c} for m, c in sorted(minutes.items())]
        data = {"from": start, "to": now, "unit": "jobs per minute", "source": "outcome store",
                "minutes": rows, "error": error,
                "totals": {k: sum(r[k] for r in rows) for k in ("complete", "failed")}}
        self._throughput = (now, data)
        return data

    def collector_state(self) -> str:
        """What runs the collector; "stopped: WHY" once this process's collector stopped by itself."""
        why = self.settings.collector_stopped() if self.settings.collector_stopped else None
        return f"stopped: {why}" if why else self.settings.collector

    def functions_data(self) -> dict:
        look = self.monitor.latest()
        sort = request.args.get("sort", "function")
        sort = sort if sort in SORT_KEYS else "function"
        desc = request.args.get("desc") == "1"
        rows = sorted(({**f, "internal": is_internal(f["function"])} for f in look.functions()),
                      key=lambda f: (f[sort], f["function"]), reverse=desc)
        return {"taken_at": look.taken_at, "servers": _server_rows(look), "functions": rows[:FUNCTIONS_SHOWN],
                "more": max(len(rows) - FUNCTIONS_SHOWN, 0), "sort": sort, "desc": desc,
                "hidden_control_functions": look.hidden_control_functions()}

    def workers_data(self) -> dict:
        look = self.monitor.latest()
        hosts: dict[str, list] = {}
        for p in look.processes:
            hosts.setdefault(p.host, []).append(p.to_dict())
        return {"taken_at": look.taken_at, "servers": _server_rows(look),
                "hosts": [{"host": h, "processes": ps, "names": sorted({p["hostname"] for p in ps if p.get("hostname")})}
                          for h, ps in sorted(hosts.items())],
                "others": look.others}

    def jobs_data(self) -> dict:
        look = self.monitor.latest()
        unique = request.args.get("unique", "").strip()
        running = {}  # (job server, handle) -> what the worker says of it
        for p in look.processes:
            for j in p.running:
                running[(str(j.get("server")), str(j.get("handle")))] = {**j, "worker": f"{p.name}:{format_host(p.host)}:{p.pid}"}
        servers = []
        for r in self.admin.jobs():
            entry: dict[str, Any] = {"server": r.server, "ok": r.ok, "error": r.error, "jobs": [],
                                     "unique_keys": [], "total": 0}
            if r.ok:
                jobs = []
                for j in r.value["jobs"]:
                    info = running.get((r.server, j["handle"]), {})
                    jobs.append({"handle": j["handle"], "state": j["state"], "retries": j["retries"],
                                 "function": info.get("task"), "unique": info.get("unique"),
                                 "worker": info.get("worker"), "seconds": info.get("seconds")})
                if unique:
                    jobs = [j for j in jobs if j["unique"] == unique]
                    entry["unique_keys"] = [u for u in r.value["unique_keys"] if u == unique]
                else:
                    entry["unique_keys"] = r.value["unique_keys"][:JOBS_SHOWN]
                entry["total"] = len(jobs)
                entry["jobs"] = jobs[:JOBS_SHOWN]
            servers.append(entry)
        return {"unique": unique, "servers": servers, "running": list(running.values())
                if not unique else [j for j in running.values() if j.get("unique") == unique]}

    def failed_data(self) -> dict:
        task = request.args.get("task", "").strip() or None
        since_text = request.args.get("since", "").strip()
        since = time.time() - parse_duration(since_text, "since") if since_text else None
        rows, tasks, error = [], [], None
        try:
            rows = self.outcomes.failed(task=task, since=since)
            tasks = sorted({r["task"] for r in (rows if task is None and since is None else self.outcomes.failed())})
        except GeartaskError as e:  # the collector elsewhere did not answer
            error = str(e)
        return {"task": task, "since": since_text, "failed": rows, "limit": FAILED_LIMIT, "tasks": tasks,
                "error": error}

    def schedules_data(self) -> dict:
        """The schedules of this dashboard's config and plugins, their next runs and last run."""
        from ..scheduler.listing import rows
        schedules, error = self._schedules()
        table: list[dict] = []
        if schedules:
            def last_of(unique: str) -> dict | None:
                return self.outcomes.client.latest(unique=unique)
            try:
                table = rows(schedules, last_of)
            except GeartaskError as e:  # the collector elsewhere did not answer: show the plan anyway
                error = str(e)
                table = rows(schedules, None)
        return {"schedules": table, "error": error}

    def _schedules(self) -> tuple[list, str | None]:
        """Loaded once: the plugins are imported for their geartask_schedules hook and tasks."""
        if self._schedule_cache is None:
            from ..plugins import load_plugins
            from ..scheduler.load import load_schedules
            try:
                self._schedule_cache = (load_schedules(self.outcomes.config, load_plugins(self.outcomes.config)), None)
            except GeartaskError as e:
                self._schedule_cache = ([], str(e))
        return self._schedule_cache

    def job_data(self) -> dict:
        key = request.args.get("key", "").strip()
        records, error = [], None
        try:
            records = self.outcomes.job(key) if key else []
        except GeartaskError as e:
            error = str(e)
        look = self.monitor.latest()
        running = [{**j, "worker": f"{p.name}:{format_host(p.host)}:{p.pid}"} for p in look.processes for j in p.running
                   if key and key in (j.get("handle"), j.get("unique"))]
        for j in running[:PROGRESS_ASKED]:
            j["progress"] = self.progress(j.get("server"), j.get("handle"))
        shown = [shown_outcome(rec) for rec in records]
        state = ("running" if running else (shown[-1]["state"] if shown else "unknown"))
        # Requeue is offered on the newest outcome when it failed (the Failed page's action, one job)
        requeue = shown[-1]["id"] if shown and shown[-1].get("state") == "failed" and not running else None
        return {"key": key, "state": state, "outcomes": shown, "running": running, "error": error,
                "requeue_id": requeue}

    def progress(self, server: Any, handle: Any) -> dict:
        """A running job's last WORK_STATUS, asked of its server with GET_STATUS. The server and
        handle come from a worker's ping (a peer's word): only a configured server is asked."""
        where = {format_address(h, p): (h, p) for h, p in self.admin.servers}.get(str(server))
        if where is None or not isinstance(handle, str):
            return {"known": None, "why": "the job's server is not one of this dashboard's"}
        try:
            status = server_job_status(*where, check_handle(handle), timeout=self.admin.timeout)
        except GeartaskError as e:
            return {"known": None, "why": str(e)}
        if not status["known"]:
            return {**status, "why": "the server no longer holds the job"}
        if not status["denominator"]:
            return {**status, "why": "the job has sent no progress (WORK_STATUS)"}
        return {**status, "percent": round(100.0 * status["numerator"] / status["denominator"], 1)}

    # -- actions ------------------------------------------------------------------------------------
    def _fields(self) -> dict:
        if request.is_json:
            body = request.get_json(silent=True)
            return body if isinstance(body, dict) else {}
        return {k: (v if len(v) > 1 else v[0]) for k, v in request.form.lists()}

    def _act(self, name: str, describe: Callable[[dict], str], perform: Callable[[dict], tuple[bool, str, Any]],
             second: Callable[[dict], str | None] = lambda f: None) -> Any:
        """CSRF check, confirmation page(s), then ``perform``; every step answers JSON when asked."""
        fields = self._fields()
        sent = str(fields.get("csrf") or request.headers.get("X-CSRF-Token") or "")
        client = request.remote_addr
        if not self._origin_ok():
            log.warning(f"dashboard {name} refused", reason="Origin is another site", client=client,
                        origin=printable(request.headers.get("Origin", ""))[:200])
            return self._answer(403, False, "this action came from another site (Origin): nothing was changed", name)
        if not hmac.compare_digest(sent.encode(), self.csrf.encode()):
            log.warning(f"dashboard {name} refused", reason="missing or wrong CSRF token", client=client)
            return self._answer(403, False, "missing or wrong CSRF token: nothing was changed", name)
        try:
            question = describe(fields)
        except GeartaskError as e:
            return self._answer(400, False, str(e), name)
        if fields.get("confirm") != "yes":
            return self._confirm(name, question, fields, {"confirm": "yes"})
        again = second(fields)
        if again and fields.get("confirm_now") != "yes":
            return self._confirm(name, again, fields, {"confirm": "yes", "confirm_now": "yes"}, danger=True)
        try:
            ok, message, details = perform(fields)
        except GeartaskError as e:
            ok, message, details = False, str(e), None
        log.info(f"dashboard {name}", outcome="ok" if ok else "failed", message=message, client=client)
        self.monitor.poke()
        return self._answer(200 if ok else 409, ok, message, name, details)

    def _answer(self, status: int, ok: bool, message: str, name: str, details: Any = None) -> Any:
        if self.wants_json():
            return jsonify({"ok": ok, "action": name, "message": message, "details": plain(details)}), status
        back = safe_back(request.form.get("back"))
        return render_template("result.html", ok=ok, action=name, message=message, details=plain(details),
                               back=back, fragment=False, path=back), status

    def _confirm(self, name: str, question: str, fields: dict, add: dict, danger: bool = False) -> Any:
        if self.wants_json():
            return jsonify({"ok": False, "action": name, "confirm": question,
                            "message": f"not done: send again with {' and '.join(f'{k}={v}' for k, v in add.items())}"}), 409
        hidden = [(k, safe_back(v) if k == "back" else v) for k, vs in fields.items()
                  if k not in ("confirm", "confirm_now", "csrf")
                  for v in (vs if isinstance(vs, list) else [vs])] + list(add.items())
        back = safe_back(request.form.get("back"))
        return render_template("confirm.html", action=name, question=question, hidden=hidden, danger=danger,
                               target=request.path, back=back, fragment=False, path=back)

    # clear
    def _clear_describe(self, f: dict) -> str:
        fn = clearable(str(f.get("function", "")))
        queued = sum(x["queued"] for x in self.monitor.latest().functions() if x["function"] == fn)
        return (f"Remove the {queued} queued job{'s' if queued != 1 else ''} of {printable(fn)} on every server? "
                "Running jobs are not touched.")

    def _clear(self, f: dict) -> tuple[bool, str, Any]:
        fn = clearable(str(f["function"]))
        results = self.admin.clear([fn])
        for r in results:
            log.info("dashboard clear", function=fn, server=r.server, ok=r.ok, error=r.error,
                     cleared=r.value["cleared"].get(fn) if r.ok else None, client=request.remote_addr)
        n = sum(r.value["cleared"].get(fn, 0) for r in results if r.ok)
        bad = [f"{r.server}: {r.error}" for r in results if not r.ok]
        return not bad, f"{n} queued job{'s' if n != 1 else ''} of {printable(fn)} cleared" + (
            f"; not reached: {'; '.join(bad)}" if bad else ""), _results(results)

    # shutdown
    def _shutdown_target(self, f: dict) -> tuple[str | None, int | None, str | None, bool]:
        name = check_worker_name(str(f["name"])) if f.get("name") else None
        pid = None
        if f.get("pid"):
            if not str(f["pid"]).isdigit():
                raise UsageError(f"pid: expected a number, got {str(f['pid'])[:20]!r}")
            pid = int(f["pid"])
        host = check_host(str(f["host"])) if f.get("host") else None
        if pid is None and host is None:
            raise UsageError("shutdown needs a process (name and pid) or a host")
        return name, pid, host, f.get("now") in ("1", "yes", "true", True)

    def _shutdown_describe(self, f: dict) -> str:
        name, pid, host, now = self._shutdown_target(f)
        what = f"worker process {name} (pid {pid})" if pid is not None else f"every worker process on {host}"
        return (f"Shut down {printable(what)}? " + ("It stops NOW: running jobs are interrupted and go back "
                "to the queue." if now else "Running jobs get the grace period (worker.grace) to finish."))

    def _shutdown_now(self, f: dict) -> str | None:
        return ("Second confirmation: stopping now interrupts the jobs running there. Really stop now?"
                if self._shutdown_target(f)[3] else None)

    def _shutdown(self, f: dict) -> tuple[bool, str, Any]:
        name, pid, host, now = self._shutdown_target(f)
        report = self.admin.shutdown(name=name, host=host, pid=pid, now=now, wait=0)
        for p in report.processes:
            log.info("dashboard shutdown", server=p.sent_to,
                     worker=f"{p.name}:{','.join(map(format_host, [p.ip] if p.ip else p.ips))}:{p.pid}",
                     now=now, outcome=p.outcome, errors=p.errors or None, client=request.remote_addr)
        if not report.processes:
            return False, "no such worker process is connected", report.to_dict()
        sent = [p for p in report.processes if p.outcome == "sent"]
        return len(sent) == len(report.processes), (
            f"shutdown{' now' if now else ''} sent to {len(sent)} of {len(report.processes)} worker "
            f"process{'es' if len(report.processes) != 1 else ''}"), report.to_dict()

    # cancel / stop
    def _cancel(self, f: dict) -> tuple[bool, str, Any]:
        handle = check_handle(str(f.get("handle", "")))
        results = self.admin.cancel(handle)
        for r in results:
            log.info("dashboard cancel", handle=handle, server=r.server, outcome=r.value if r.ok else "unreachable",
                     error=r.error, client=request.remote_addr)
        done = any(r.ok and r.value == "cancelled" for r in results)
        shown = ", ".join(f"{r.server}: {r.value if r.ok else r.error}" for r in results)
        return done, f"job {printable(handle)}: {printable(shown)}", _results(results)

    def _stop(self, f: dict) -> tuple[bool, str, Any]:
        target = str(f.get("target", ""))
        report = self.admin.stop_job(target)
        for j in report.jobs:
            log.info("dashboard stop", handle=j.handle, unique=j.unique, worker=f"{j.name}:{j.pid}",
                     server=j.sent_to, outcome=j.outcome, error=j.error, client=request.remote_addr)
        if not report.jobs:
            return False, f"no worker runs {printable(target)}", report.to_dict()
        return report.ok, "; ".join(f"{j.handle}: {j.outcome}" for j in report.jobs), report.to_dict()

    def _target(self, f: dict, what: str) -> str:
        value = str(f.get(what, ""))
        if not value or len(value) > 1024:
            raise UsageError(f"{what}: missing or too long")
        return value

    # requeue / purge
    def _ids(self, f: dict) -> list[str]:
        ids = f.get("only") or f.get("id") or []  # "only": one row's own button in the bulk form
        ids = [ids] if isinstance(ids, str) else [str(i) for i in ids]
        if f.get("all") == "yes":
            task = str(f.get("task") or "") or None
            since = time.time() - parse_duration(str(f["since"]), "since") if f.get("since") else None
            ids = [r["id"] for r in self.outcomes.failed(task=task, since=since)]
        return ids[:FAILED_LIMIT]

    def _requeue_describe(self, f: dict) -> str:
        """The question, with what each job would send and who first sent it (a record says what
        a peer reported: the operator sees it before it runs)."""
        from ..sender.requeue import Planned
        ids = self._ids(f)
        n = len(ids)
        shown = []
        for id in ids[:10]:
            try:
                rec = self.outcomes.client.get(id)
            except GeartaskError:
                rec = None
            if rec is not None:
                shown.append(Planned(rec, [id]).describe())
        more = f" (and {n - len(shown)} more)" if n > len(shown) and shown else ""
        return (f"Send {n} failed job{'s' if n != 1 else ''} again (original task, data and priority)?"
                + (" " + " | ".join(shown) + more if shown else ""))

    def _requeue(self, f: dict) -> tuple[bool, str, Any]:
        ids = self._ids(f)
        if not ids:
            return False, "nothing to requeue", []
        results = self.outcomes.requeue(ids, by=f"dashboard@{request.remote_addr}")
        for r in results:
            log.info("dashboard requeue", unique=r.get("unique"), ids=r.get("ids") or r.get("id"), ok=r["ok"],
                     handle=r.get("handle"), server=r.get("server"), error=r.get("error"), client=request.remote_addr)
        done = sum(1 for r in results if r["ok"])
        why = "; ".join(str(r["error"]) for r in results if not r["ok"])
        return done == len(results), (f"{done} of {len(results)} failed job{'s' if len(results) != 1 else ''} "
                                      "requeued" + (f" ({why})" if why else "")), results

    def _purge_describe(self, f: dict) -> str:
        if f.get("older_than"):
            return f"Delete every failed job record older than {printable(str(f['older_than']))}?"
        n = len(self._ids(f))
        return f"Delete {n} failed job record{'s' if n != 1 else ''}? They can't be requeued afterwards."

    def _purge(self, f: dict) -> tuple[bool, str, Any]:
        if f.get("older_than"):
            n = self.outcomes.purge(older_than=time.time() - parse_duration(str(f["older_than"]), "older than"))
        else:
            ids = self._ids(f)
            n = self.outcomes.purge(ids=ids) if ids else 0
        log.info("dashboard purge", purged=n, client=request.remote_addr)
        return True, f"{n} failed job record{'s' if n != 1 else ''} purged", {"purged": n}

    # -- routes ----------------------------------------------------------------------------------
    def _routes(self) -> None:
        app = self.app
        app.before_request(self._check_request)
        app.after_request(self._after)

        @app.errorhandler(UsageError)
        def usage(e: UsageError):
            if self.wants_json():
                return jsonify({"ok": False, "message": str(e)}), 400
            return render_template("result.html", ok=False, action="request", message=str(e), details=None,
                                   back=request.path, fragment=False, path=request.path), 400

        @app.get("/")
        def overview():
            return self.page("overview.html", self.overview_data(), now=time.time())

        @app.get("/throughput")
        def throughput():  # the chart's data: always JSON
            return jsonify(self.throughput_data())

        @app.get("/functions")
        def functions():
            return self.page("functions.html", self.functions_data())

        @app.get("/workers")
        def workers():
            return self.page("workers.html", self.workers_data(), now=time.time())

        @app.get("/jobs")
        def jobs():
            return self.page("jobs.html", self.jobs_data())

        @app.get("/failed")
        def failed():
            return self.page("failed.html", self.failed_data())

        @app.get("/schedules")
        def schedules():
            return self.page("schedules.html", self.schedules_data())

        @app.get("/job")
        def job():
            return self.page("job.html", self.job_data())

        @app.get("/job/output")
        def job_output():  # the Job page's live output (dashboard/live.py), polled as JSON
            from .live import output_data
            return jsonify(output_data(self.admin, self.monitor.latest(), request.args.get("key", "")))

        @app.get("/metrics")
        def metrics():
            return Response(generate_latest(self.registry), mimetype=CONTENT_TYPE_LATEST)

        @app.post("/actions/clear")
        def clear():
            return self._act("clear", self._clear_describe, self._clear)

        @app.post("/actions/shutdown")
        def shutdown():
            return self._act("shutdown", self._shutdown_describe, self._shutdown, self._shutdown_now)

        @app.post("/actions/cancel")
        def cancel():
            return self._act("cancel", lambda f: f"Cancel the queued job {printable(check_handle(str(f.get('handle', ''))))}?",
                             self._cancel)

        @app.post("/actions/stop")
        def stop():
            return self._act("stop", lambda f: f"Stop the running job {printable(self._target(f, 'target'))}? "
                             "It fails with the reason 'stopped by operator'.", self._stop)

        @app.post("/actions/requeue")
        def requeue():
            return self._act("requeue", self._requeue_describe, self._requeue)

        @app.post("/actions/purge")
        def purge():
            return self._act("purge", self._purge_describe, self._purge)

