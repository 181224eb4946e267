"""`geartask manage`: every job server at a glance, worker IPs, queues that really clear, shutdown.

A thin command line over geartask.fleet (the library the tests call directly). Each command is
one registration in build_parser: its parser, and ``run(call)`` through ``set_defaults(func=)``.
Exit status: 0 success, 1 a server could not be reached or something did not happen
(the reachable servers are still reported), 2 usage or config error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence, TextIO

from ..cli import (ArgumentParser, add_common_args, config_from_args, count, non_negative_seconds,
                   positive_seconds, run, setup_logging)
from ..arguments import prog
from ..address import format_address, format_host
from ..display import printable
from ..errors import EXIT_FAILED, EXIT_OK
from ..gearman import is_refusal
from ..logs import get_logger
from ..server import LocalServer
from ..targets import parse as parse_target
from .. import fleet
from .call import Call
from .outcomes_cli import add_outcome_commands
from .tables import render

if TYPE_CHECKING:
    from ..config import Config

DEFAULT_WATCH = 2.0


# -- command line -----------------------------------------------------------------------


def build_parser() -> ArgumentParser:
    # The shared options are accepted before and after the command; SUPPRESS keeps a
    # subcommand's unset option from overwriting one given before it.
    common = ArgumentParser(add_help=False)
    add_common_args(common)
    common.add_argument("--json", action="store_true", help="machine-readable output (JSON)")
    common.add_argument("--timeout", type=positive_seconds, metavar="S",
                        help=f"seconds each server gets to answer (default {fleet.DEFAULT_TIMEOUT:g})")
    for action in common._actions:
        action.default = argparse.SUPPRESS

    parser = ArgumentParser(prog=prog("manage", "manage_client.py"), parents=[common],
                            description="Inspect and manage the gearmand job servers and geartask workers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=ArgumentParser)

    def add(name: str, help: str, run: Callable[[Call], int], *, fleet: bool = False) -> ArgumentParser:
        """One command: its parser and what runs it (``fleet``: it asks the job servers)."""
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=run, fleet=fleet)
        return p

    watch_help = f"refresh in place every SECONDS (default {DEFAULT_WATCH:g}) until Ctrl-C"
    p = add("status", "queued, running and available workers per function and server", cmd_status_or_workers,
            fleet=True)
    p.add_argument("--watch", nargs="?", const=DEFAULT_WATCH, type=positive_seconds, metavar="SECONDS", help=watch_help)
    p.add_argument("--any-fleet", action="store_true",
                   help="every fleet's workers, not only those of the config's 'fleet'")
    p = add("workers", "every worker connection: name, IP, pid, thread, functions, silent; and per process",
            cmd_status_or_workers, fleet=True)
    p.add_argument("--watch", nargs="?", const=DEFAULT_WATCH, type=positive_seconds, metavar="SECONDS", help=watch_help)
    p.add_argument("--no-ping", dest="ping", action="store_false",
                   help="don't ping the worker processes (no SILENT column): no control jobs are sent")
    p.add_argument("--any-fleet", action="store_true",
                   help="every fleet's workers, not only those of the config's 'fleet'")
    p = add("clear", "remove queued (not running) jobs of FUNCTIONs, or of all functions", cmd_clear, fleet=True)
    p.add_argument("functions", nargs="*", metavar="FUNCTION")
    p.add_argument("--yes", "-y", action="store_true", help="don't ask, even on a terminal")
    p = add("shutdown", "stop worker processes through their control functions", cmd_shutdown, fleet=True)
    p.add_argument("--name", action="append", help="only workers of this name (repeat for several)")
    p.add_argument("--host", metavar="IP", action="append", help="only workers on this IP (repeat for several)")
    p.add_argument("--yes", "-y", action="store_true", help="don't ask, even on a terminal, when no filter is given")
    p.add_argument("--any-fleet", action="store_true",
                   help="every fleet's workers, not only those of the config's 'fleet'")
    p.add_argument("--now", action="store_true", help="skip the grace period for running jobs")
    p.add_argument("--wait", type=non_negative_seconds, default=30.0, metavar="S",
                   help="seconds to wait for them to disconnect (default 30; 0: don't wait)")
    add("jobs", "the jobs each server holds, and their unique keys", cmd_jobs, fleet=True)
    p = add("cancel", "cancel a queued background job by its handle", cmd_cancel, fleet=True)
    p.add_argument("handle", metavar="HANDLE")
    p = add("stop", "stop a running job (by handle or unique key) through the worker that runs it", cmd_stop,
            fleet=True)
    p.add_argument("target", metavar="HANDLE|UNIQUE")
    # fleet: `dashboard` refuses a config without servers before it starts, as every fleet command does
    p = add("dashboard", "serve the web dashboard and /metrics (and run the outcomes collector)", cmd_dashboard,
            fleet=True)
    p.add_argument("--listen", metavar="HOST:PORT", help="where to serve (default: dashboard.listen, 127.0.0.1:8470)")
    p.add_argument("--refresh", type=positive_seconds, metavar="S",
                   help="seconds between looks at the fleet (default: dashboard.refresh, 2)")
    p.add_argument("--no-collector", dest="collector", action="store_false",
                   help="don't run the outcomes collector here (it runs elsewhere)")
    p.add_argument("--token", metavar="T", help="every request must carry this token (default: dashboard.token)")
    p = add("maxqueue", "limit how many jobs of FUNCTION a server queues (0: no limit)", cmd_maxqueue, fleet=True)
    p.add_argument("function", metavar="FUNCTION")
    p.add_argument("size", type=count, metavar="N")
    add("version", "each server's gearmand version", cmd_version, fleet=True)
    add("ping", "round-trip time to each server", cmd_ping, fleet=True)
    p = add("server", "the local gearmand of the config's 'server' section", cmd_server)
    p.add_argument("action", choices=("start", "stop", "status"))
    add_outcome_commands(add, common)
    return parser


# -- output -----------------------------------------------------------------------------

def _emit_json(data: Any, out: TextIO) -> None:
    out.write(json.dumps(data, indent=2, default=str) + "\n")


def _report_errors(results: Sequence[fleet.ServerResult], err: TextIO) -> None:
    for r in results:
        if not r.ok:
            err.write(f"error: {printable(r.server)}: {printable(r.error)}\n")


def _status_of(results: Sequence[fleet.ServerResult]) -> int:
    return EXIT_OK if fleet.all_ok(results) else EXIT_FAILED


def status_data(results: Sequence[fleet.ServerResult]) -> dict:
    servers: list[dict] = []
    totals: dict[str, dict] = {}
    for r in results:
        entry = {"server": r.server, "reachable": r.ok, "error": r.error, "version": None, "rtt_ms": None,
                 "functions": []}
        if r.ok:
            entry.update(version=r.value["version"], rtt_ms=r.value["rtt_ms"],
                         functions=[fleet.plain(f) for f in r.value["functions"]])
            for f in r.value["functions"]:
                t = totals.setdefault(f.function, {"function": f.function, "queued": 0, "running": 0, "workers": 0})
                t["queued"] += f.queued
                t["running"] += f.running
                t["workers"] += f.workers
        servers.append(entry)
    return {"ok": fleet.all_ok(results), "servers": servers, "totals": [totals[k] for k in sorted(totals)]}


def status_text(data: dict) -> str:
    srv = render(["SERVER", "REACHABLE", "VERSION", "RTT ms", "ERROR"],
                 [[s["server"], s["reachable"], s["version"], s["rtt_ms"], s["error"]] for s in data["servers"]],
                 right=["RTT ms"])
    if not data["totals"]:
        return srv + "\n\n(no functions registered)"
    # One row per function: the sums, then queued/running/workers on each reachable server.
    servers = [s for s in data["servers"] if s["reachable"]]
    per_server = {s["server"]: {f["function"]: f for f in s["functions"]} for s in servers}
    several = len(data["servers"]) > 1
    headers = ["FUNCTION", "QUEUED", "RUNNING", "WORKERS"] + ([s["server"] for s in servers] if several else [])
    rows, idle_targeted = [], 0
    for t in data["totals"]:
        if parse_target(t["function"]) is not None and not t["queued"] and not t["running"]:
            idle_targeted += 1  # every worker registers TASK@host:H, TASK@label:L: shown once they have jobs
            continue
        row = [t["function"], t["queued"], t["running"], t["workers"]]
        if several:
            for s in servers:
                f = per_server[s["server"]].get(t["function"])
                row.append(f"{f['queued']}/{f['running']}/{f['workers']}" if f else "-")
        rows.append(row)
    text = srv + "\n\n" + render(headers, rows, right=headers[1:])
    if several:
        text += "\n(totals over reachable servers; per server: queued/running/workers)"
    if idle_targeted:
        text += f"\n({idle_targeted} targeted names (TASK@host:, TASK@label:) with no jobs not shown; --json lists them)"
    return text


def workers_data(results: Sequence[fleet.ServerResult]) -> dict:
    servers = []
    for r in results:
        servers.append({"server": r.server, "reachable": r.ok, "error": r.error,
                        "connections": fleet.plain(r.value) if r.ok else []})
    return {"ok": fleet.all_ok(results), "servers": servers,
            "processes": [fleet.plain(p) for p in fleet.group_processes(results)]}


def workers_text(data: dict) -> str:
    rows, others = [], 0
    for s in data["servers"]:
        if not s["reachable"]:
            rows.append([s["server"], "(unreachable)", None, None, None, None, None, s["error"], None])
            continue
        for c in s["connections"]:
            if c["client_id"] == "-" and not c["functions"]:
                others += 1  # a client or admin connection (this one included), not a worker
                continue
            if c["name"] is not None:  # targeted forms (TASK@host:, TASK@label:) are in HOST and LABELS below
                rows.append([s["server"], c["name"], c["worker_ip"], c["pid"], c["thread"], c["ip"], c["silent"],
                             [f for f in c["functions"] if parse_target(f) is None], c.get("fleet") or None])
            else:  # not a geartask client id: shown as it is
                rows.append([s["server"], c["client_id"], None, None, None, c["ip"], c["silent"], c["functions"], None])
    fleets = any(r[-1] for r in rows)  # a FLEET column once some worker names its fleet
    rows = [r[:2] + [r[-1]] + r[2:-1] if fleets else r[:-1] for r in rows]
    text = render(["SERVER", "NAME"] + (["FLEET"] if fleets else []) + ["IP", "PID", "THREAD", "PEER", "SILENT",
                                                                         "FUNCTIONS"], rows, right=["PID", "THREAD"])
    if not rows:
        text += "\n(no workers connected)"
    if others:
        text += f"\n({others} client/admin connection{'s' if others != 1 else ''} without functions not shown)"
    procs = data["processes"]
    if procs:
        text += "\n\n" + render(["PROCESS", "PID"] + (["FLEET"] if fleets else []) + ["IPS", "SERVERS",
                                                                                        "CONNECTIONS", "SILENT ON",
                                                                                        "HOST", "LABELS"],
                                 [[p["name"], p["pid"], *([p.get("fleet") or None] if fleets else []), p["ips"],
                                   len(p["servers"]), p["connections"], p["silent_on"], p.get("host") or None,
                                   p.get("labels") or None] for p in procs],
                                 right=["PID", "SERVERS", "CONNECTIONS"])
    return text


def watch(render_once: Callable[[], tuple[str, int]], interval: float, out: TextIO, redraw: bool) -> int:
    """Render every ``interval`` seconds until Ctrl-C; on a terminal, redraw in place."""
    status = EXIT_OK
    try:
        while True:
            text, status = render_once()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            if redraw:
                # Home the cursor, rewrite each line clearing its rest, clear below: no flicker.
                body = f"every {interval:g}s, {stamp}; Ctrl-C to stop\n\n{text}"
                out.write("\x1b[H" + "".join(line + "\x1b[K\n" for line in body.split("\n")) + "\x1b[J")
            else:
                out.write(text + "\n")
            out.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        if redraw:
            out.write("\n")
            out.flush()
        return status


# -- commands ---------------------------------------------------------------------------

def _logger(config: Config, args: argparse.Namespace, command: str) -> Any:
    setup_logging(config, args, "manager")
    return get_logger("geartask.manager", command=command)


def _confirm(question: str, inp: TextIO, out: TextIO) -> bool:
    out.write(question + " [y/N] ")
    out.flush()
    answer = inp.readline()
    return answer.strip().lower() in ("y", "yes")


def cmd_status_or_workers(call: Call) -> int:
    args, adm, out, err = call.args, call.fleet, call.out, call.err
    if args.command == "status":
        fetch, to_data, to_text = adm.status, status_data, status_text
    else:
        fetch, to_data, to_text = (lambda: adm.workers(ping=args.ping)), workers_data, workers_text

    def once() -> tuple[str, int]:
        results = fetch()
        data = to_data(results)
        if args.json:
            return json.dumps(data, default=str, indent=None if args.watch else 2), _status_of(results)
        if not args.watch:
            _report_errors(results, err)
        return to_text(data), _status_of(results)

    if args.watch:
        return watch(once, args.watch, out, redraw=out.isatty() and not args.json)
    text, status = once()
    out.write(text + "\n")
    return status


def cmd_clear(call: Call) -> int:
    args, adm, config, out, err, inp = call.args, call.fleet, call.config, call.out, call.err, call.inp
    functions = [fleet.check_clear_function(f) for f in args.functions] or None
    what = ", ".join(functions) if functions else "all functions"
    where = ", ".join(format_address(h, p) for h, p in adm.servers)
    if not args.yes and inp.isatty():
        queued: dict[str, int] = {}
        for r in adm.status():
            for f in (r.value["functions"] if r.ok else []):
                if f.queued and (functions is None or f.function in functions):
                    queued[f.function] = queued.get(f.function, 0) + f.queued
        found = ", ".join(f"{printable(fn)} {n}" for fn, n in sorted(queued.items())) or "none found"
        if not _confirm(f"Remove the queued jobs of {what} on {where} ({found})?", inp, out):
            err.write("nothing cleared\n")
            return EXIT_FAILED
    log = _logger(config, args, "clear")
    results = adm.clear(functions)
    rows, total, stranded, partial = [], 0, 0, 0
    for r in results:
        done = r.value if r.ok or isinstance(r.value, dict) else None  # a failed server: what went before
        log.info("clear", server=r.server, functions=functions or "all", ok=r.ok, error=r.error,
                 cleared=done["cleared"] if done else None, stranded=done["stranded"] if done else None)
        if done:
            for fn, n in done["cleared"].items():
                if n or (functions is not None and r.ok):  # clearing all: only what had something to clear
                    rows.append([fn, r.server, n])
                total += n
                partial += 0 if r.ok else n
            stranded += done["stranded"]
    if args.json:
        _emit_json({"ok": fleet.all_ok(results), "cleared": total, "stranded": stranded,
                    "servers": [r.to_dict() for r in results]}, out)
    else:
        _report_errors(results, err)
        if rows:
            out.write(render(["FUNCTION", "SERVER", "CLEARED"], rows, right=["CLEARED"]) + "\n")
        out.write(f"{total} queued job{'s' if total != 1 else ''} cleared\n")
        if partial:
            err.write(f"warning: {partial} of them were removed before a server failed (its last batch of up to "
                      f"{fleet.DRAIN_BATCH} may not have been applied); run clear again once it is back\n")
        if stranded:
            err.write(f"warning: {stranded} queued job{'s' if stranded != 1 else ''} belong to no function "
                      "(left by gearmand's 'drop function'); gearmand can't hand them out or delete them "
                      "until it restarts: run clear again after a restart\n")
    return _status_of(results)


def cmd_shutdown(call: Call) -> int:
    args, adm, config, out, err, inp = call.args, call.fleet, call.config, call.out, call.err, call.inp
    if not (args.name or args.host) and not args.yes and inp.isatty():  # every worker: ask first, as clear does
        procs = [p for p in adm.processes() if p.control]
        where = ", ".join(format_address(h, p) for h, p in adm.servers)
        if not _confirm(f"Stop every worker process on {where} ({len(procs)} found)?", inp, out):
            err.write("nothing stopped\n")
            return EXIT_FAILED
    log = _logger(config, args, "shutdown")
    report = adm.shutdown(name=args.name, host=args.host, now=args.now, wait=args.wait)
    for p in report.processes:
        log.info("shutdown", server=p.sent_to,
                 worker=f"{p.name}:{','.join(map(format_host, [p.ip] if p.ip else p.ips))}:{p.pid}", now=args.now,
                 outcome=p.outcome, errors=p.errors or None)
    for server, error in report.errors.items():
        log.warning("shutdown: TLS refused" if is_refusal(error or "") else "shutdown: server unreachable",
                    server=server, error=error)
    if args.json:
        _emit_json({"ok": report.ok, **report.to_dict()}, out)
    else:
        for server, error in report.errors.items():
            err.write(f"error: {printable(server)}: {printable(error)}\n")
        if report.processes:
            out.write(render(["NAME", "IPS", "PID", "SENT TO", "OUTCOME"],
                             [[p.name, p.ips, p.pid, p.sent_to, p.outcome + (f" ({'; '.join(p.errors)})"
                                                                             if p.errors else "")]
                              for p in report.processes], right=["PID"]) + "\n")
    if not report.processes:  # nothing to stop is not success: a typo in --name must not look like one
        filters = " ".join([f"--name {n}" for n in args.name or []] + [f"--host {h}" for h in args.host or []])
        err.write(f"error: no worker process{' matches ' + filters if filters else 'es connected'}\n")
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_jobs(call: Call) -> int:
    args, adm, out, err = call.args, call.fleet, call.out, call.err
    results = adm.jobs()
    if args.json:
        _emit_json({"ok": fleet.all_ok(results), "servers": [r.to_dict() for r in results]}, out)
        return _status_of(results)
    _report_errors(results, err)
    for r in results:
        if not r.ok:
            continue
        jobs, uniques = r.value["jobs"], r.value["unique_keys"]
        out.write(f"{printable(r.server)}: {len(jobs)} job{'s' if len(jobs) != 1 else ''}\n")
        if jobs:
            out.write(render(["HANDLE", "STATE", "RETRIES"], [[j["handle"], j["state"], j["retries"]] for j in jobs],
                             right=["RETRIES"]) + "\n")
        if uniques:
            out.write("unique keys: " + " ".join(printable(u) for u in uniques) + "\n")
        out.write("\n")
    return _status_of(results)


def _simple(results: Sequence[fleet.ServerResult], header: str, args: argparse.Namespace, out: TextIO, err: TextIO,
            ok: Callable[[fleet.ServerResult], bool] = lambda r: r.ok) -> int:
    if args.json:
        _emit_json({"ok": all(ok(r) for r in results), "servers": [r.to_dict() for r in results]}, out)
    else:
        _report_errors(results, err)
        out.write(render(["SERVER", header], [[r.server, r.value if r.ok else f"unreachable: {r.error}"]
                                              for r in results], right=["RTT ms"]) + "\n")
    return EXIT_OK if all(ok(r) for r in results) else EXIT_FAILED


def cmd_cancel(call: Call) -> int:
    args, adm, config, out, err = call.args, call.fleet, call.config, call.out, call.err
    log = _logger(config, args, "cancel")
    results = adm.cancel(args.handle)
    for r in results:
        log.info("cancel", handle=args.handle, server=r.server, outcome=r.value if r.ok else "unreachable",
                 error=r.error)
    status = _simple(results, "RESULT", args, out, err)
    if status == EXIT_OK and not any(r.value == "cancelled" for r in results):
        outcomes = ", ".join(f"{r.server}: {r.value}" for r in results)
        err.write(f"error: job {printable(args.handle)} not cancelled ({printable(outcomes)}); "
                  "only queued jobs can be cancelled\n")
        return EXIT_FAILED
    return status


def cmd_stop(call: Call) -> int:
    args, adm, config, out, err = call.args, call.fleet, call.config, call.out, call.err
    log = _logger(config, args, "stop")
    report = adm.stop_job(args.target)
    for j in report.jobs:
        log.info("stop", handle=j.handle, unique=j.unique, task=j.task, worker=f"{j.name}:{j.pid}", server=j.sent_to,
                 outcome=j.outcome, error=j.error)
    for server, error in report.errors.items():
        log.warning("stop: TLS refused" if is_refusal(error or "") else "stop: server unreachable",
                    server=server, error=error)
    if args.json:
        _emit_json(report.to_dict(), out)
    else:
        for server, error in report.errors.items():
            err.write(f"error: {printable(server)}: {printable(error)}\n")
        if report.jobs:
            out.write(render(["HANDLE", "TASK", "UNIQUE", "WORKER", "OUTCOME"],
                             [[j.handle, j.task, j.unique, f"{j.name}:{j.pid}", j.outcome + (f" ({j.error})" if j.error
                                                                                          else "")]
                              for j in report.jobs]) + "\n")
    if not report.jobs:
        err.write(f"error: no worker runs {printable(args.target)}\n")
    return EXIT_OK if report.ok else EXIT_FAILED


def cmd_dashboard(call: Call) -> int:
    args, config, err = call.args, call.config, call.err
    from ..dashboard.server import serve
    d = config.dashboard
    return serve(config, listen=args.listen or d.listen, refresh=args.refresh or d.refresh,
                 token=args.token if args.token is not None else d.token, collector=args.collector,
                 timeout=args.timeout or fleet.DEFAULT_TIMEOUT, err=err)


def cmd_maxqueue(call: Call) -> int:
    args, adm, config, out, err = call.args, call.fleet, call.config, call.out, call.err
    log = _logger(config, args, "maxqueue")
    results = adm.maxqueue(args.function, args.size)
    for r in results:
        log.info("maxqueue", function=args.function, size=args.size, server=r.server,
                 outcome="OK" if r.ok else "failed", error=r.error)
    return _simple(results, "RESULT", args, out, err)


def cmd_server(call: Call) -> int:
    args, config, out = call.args, call.config, call.out
    srv = LocalServer.from_config(config)
    if args.action == "status":
        st = srv.status()
        if args.json:
            _emit_json(st, out)
        else:
            out.write(render(["ADDRESS", "RUNNING", "PID", "QUEUE", "QUEUE FILE", "LOG"],
                             [[st["address"], st["running"], st["pid"], st["queue"], st["queue_path"], st["log"]]])
                      + "\n")
        return EXIT_OK if st["running"] else EXIT_FAILED
    log = _logger(config, args, f"server {args.action}")
    if args.action == "start":
        try:
            pid = srv.start()
        except Exception as e:
            log.error("server start", address=srv.address, outcome="failed", error=str(e))
            raise
        log.info("server start", address=srv.address, pid=pid, outcome="running")
        msg = {"address": srv.address, "pid": pid, "running": True}
        text = f"gearmand running on {srv.address} (pid {pid}); log {srv.log_file}"
    else:
        stopped = srv.stop()
        log.info("server stop", address=srv.address, outcome="stopped" if stopped else "was not running")
        msg = {"address": srv.address, "stopped": stopped}
        text = f"gearmand on {srv.address} " + ("stopped" if stopped else "was not running (started from here)")
    if args.json:
        _emit_json(msg, out)
    else:
        out.write(text + "\n")
    return EXIT_OK


def cmd_version(call: Call) -> int:
    return _simple(call.fleet.version(), "VERSION", call.args, call.out, call.err)


def cmd_ping(call: Call) -> int:
    return _simple(call.fleet.ping(), "RTT ms", call.args, call.out, call.err)


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None,
         stdin: TextIO | None = None) -> int:
    # --json and --timeout are SUPPRESSed on every parser (given before or after the command,
    # neither overwrites the other): their defaults live in the namespace parsing starts from.
    args = build_parser().parse_args(argv, namespace=argparse.Namespace(json=False, timeout=None))
    config = config_from_args(args)
    admin = (fleet.Admin.from_config(config, args.timeout or fleet.DEFAULT_TIMEOUT,
                                     any_fleet=getattr(args, "any_fleet", False)) if args.fleet else None)
    return args.func(Call(args, config, stdout or sys.stdout, stderr or sys.stderr, stdin or sys.stdin, admin))


def cli() -> None:
    sys.exit(run(main))


if __name__ == "__main__":
    cli()
