"""The manager's ``outcomes`` and ``failed`` commands: thin over geartask.outcomes.

``outcomes serve`` runs the collector; everything else asks it through an OutcomeClient, so
it works from any machine that reaches a job server. Exit status: 0 done, 1 not done (no
collector answered, an unknown unique, a job not sent), 2 usage or config error.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TextIO

from ..cli import count, duration
from ..display import printable
from ..errors import EXIT_FAILED, EXIT_OK, UsageError
from ..logs import configure_logging, flush_logs, get_logger
from ..outcomes import client as outcome_client
from ..outcomes.failed import failed_targets, import_dead_letters, requester
from ..sender.requeue import plan, requeue
from ..outcomes.query import MAX_LIST
from ..outcomes.record import decode_bytes
from .call import Call
from .tables import render

if TYPE_CHECKING:
    from ..config import Config

SHOWN_CHARS = 2000  # characters of a result, data or reason printed by `failed show` (--json has all)


def add_outcome_commands(add: Callable[..., Any], common: Any) -> None:
    """The ``outcomes`` and ``failed`` subcommands, on the manager's parser."""
    from ..cli import ArgumentParser

    def actions(parser: Any) -> Any:
        return parser.add_subparsers(dest="action", metavar="ACTION", required=True, parser_class=ArgumentParser)

    def action(sub: Any, name: str, help: str, run: Callable[[Call], int]) -> Any:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(func=run)
        return p

    sub = actions(add("outcomes", "the outcomes collector: run it, or see how it is", _unreachable))
    action(sub, "serve", "run the collector: store every job outcome the servers receive, answer queries "
                         "(SIGTERM/SIGINT stop it)", lambda call: cmd_serve(call.config))
    action(sub, "status", "which collector answers, where it is attached, what it stored",
           lambda call: cmd_status(_client(call), call.args.json, call.out, call.config))

    sub = actions(add("failed", "jobs that failed for good, as the outcomes collector keeps them", _unreachable))
    p = action(sub, "list", "failed jobs, newest first (not those requeued already)", _with_client(cmd_list))
    p.add_argument("--task", help="only this task")
    p.add_argument("--since", type=duration, metavar="AGE", help="only those that failed within AGE (30m, 1h, 7d)")
    p.add_argument("--limit", type=_list_limit, default=100, metavar="N", help=f"at most N (default 100, max {MAX_LIST})")
    p.add_argument("--requeued", action="store_true", help="include those requeued already")
    p = action(sub, "show", "the latest outcome of a unique key (or a record id), and its history",
               _with_client(cmd_show))
    p.add_argument("unique", metavar="UNIQUE")
    p = action(sub, "requeue", "send failed jobs again: same task, data, priority and unique key, as background jobs",
               _with_client(cmd_requeue))
    p.add_argument("uniques", nargs="*", metavar="UNIQUE")
    p.add_argument("--task", help="every failed job of this task")
    p.add_argument("--all", action="store_true", help="every failed job (at most 10,000 records at a time)")
    p.add_argument("--yes", "-y", action="store_true", help="send without asking (needed off a terminal)")
    p = action(sub, "purge", "delete failed outcomes (all, or those older than AGE)", _with_client(cmd_purge))
    p.add_argument("--older-than", type=duration, metavar="AGE", help="only those that failed more than AGE ago (7d)")
    p.add_argument("--yes", "-y", action="store_true", help="don't ask, even on a terminal")
    p = action(sub, "import", "store the records of a worker host's dead-letter file (logs/dead-letter.jsonl)",
               _with_client(cmd_import))
    p.add_argument("file", metavar="FILE")


def _list_limit(text: str) -> int:
    n = count(text)
    if not 1 <= n <= MAX_LIST:
        raise argparse.ArgumentTypeError(f"must be 1-{MAX_LIST}, got {text!r}")
    return n


def _unreachable(call: Call) -> int:  # pragma: no cover - the ACTION subparser is required
    raise AssertionError(f"{call.args.command}: no action")


def _client(call: Call) -> outcome_client.OutcomeClient:
    return outcome_client.OutcomeClient(call.config, call.args.timeout or outcome_client.DEFAULT_TIMEOUT)


def _with_client(cmd: Callable[..., int]) -> Callable[[Call], int]:
    """A ``failed`` action run with an outcomes client."""
    def run(call: Call) -> int:
        return cmd(call.args, call.config, _client(call), call.args.json, call.out, call.err, call.inp)
    return run


def _emit(data: Any, out: TextIO) -> None:
    out.write(json.dumps(data, indent=2, default=str) + "\n")  # ASCII: a peer's text can't reach the terminal raw


def _when(ts: Any) -> str | None:
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        return None
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
    except (OverflowError, OSError, ValueError):  # a time no calendar holds (records come from peers)
        return repr(ts)


def _age(seconds: float) -> str:
    for unit, n in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= n and seconds % n == 0:
            return f"{seconds / n:g}{unit}"
    return f"{seconds:g}s"


def _log(config: Config, command: str) -> Any:
    configure_logging(config.log, "manager")
    return get_logger("geartask.manager", command=command)


# -- outcomes -------------------------------------------------------------------------------

def cmd_serve(config: Config) -> int:
    """The collector as a long-running process: SIGTERM/SIGINT/SIGHUP stop it after the batch
    in hand; a second signal exits at once (unanswered outcome jobs stay in gearmand)."""
    from ..outcomes.collector import Collector
    from ..outcomes.store import open_store

    configure_logging(config.log, "collector")
    store = open_store(config.outcomes.store, config.outcomes.path, config)
    collector = Collector(config, store)
    seen: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        seen.append(signum)
        if len(seen) > 1:
            flush_logs()
            os._exit(1)
        collector.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        return collector.serve_forever()
    finally:
        collector.close()
        store.close()


def cmd_status(client: outcome_client.OutcomeClient, as_json: bool, out: TextIO, config: Config | None = None) -> int:
    info = client.ping()
    collectors: list[dict] = []
    unasked: list[str] = []
    if config is not None:  # every collector registered on the servers, not only the one that answered
        from ..outcomes.registry import registered_collectors
        collectors, unasked = registered_collectors(config)
    if as_json:
        _emit({"ok": True, **info, "collectors": collectors, "unasked": unasked}, out)
        return EXIT_OK
    out.write(printable(f"collector {info.get('collector')}, started {_when(info.get('started_at'))}; "
                        f"{info.get('size')} outcomes kept ({info.get('keep_days')} days)") + "\n")
    servers = info.get("servers")
    if not isinstance(servers, dict):
        servers = {}
    rows = [[server, sides.get("outcomes"), sides.get("query")] for server, sides in sorted(servers.items())
            if isinstance(sides, dict)]
    out.write(render(["SERVER", "OUTCOMES", "QUERIES"], rows) + "\n")
    out.write(printable(f"since start: {info.get('stored')} stored, {info.get('known')} already known, "
                        f"{info.get('malformed_jobs')} malformed jobs, {info.get('refused_records')} records "
                        f"refused, {info.get('queries')} queries") + "\n")
    if config is not None:
        out.write(f"{len(collectors)} collector{'s' if len(collectors) != 1 else ''} registered "
                  f"(store {printable(config.outcomes.store)}):\n")
        out.write(render(["COLLECTOR", "FROM", "SERVERS"],
                         [[c["collector"], c["ip"], ", ".join(c["servers"])] for c in collectors]) + "\n")
        for error in unasked:
            out.write(printable(f"(not asked: {error})") + "\n")
    return EXIT_OK


# -- failed ---------------------------------------------------------------------------------

def _error(rec: dict) -> str:
    text = rec.get("error") or ""
    return text if len(text) <= 60 else text[:57] + "..."


def cmd_list(args: Any, config: Config, client: outcome_client.OutcomeClient, as_json: bool, out: TextIO,
             err: TextIO, inp: TextIO) -> int:
    answer = client.failed(task=args.task, max_age=args.since, limit=args.limit,
                           include_requeued=True if args.requeued else None)
    records = answer["records"][:args.limit]  # a rogue answerer may send more than asked for
    answer["more"] = bool(answer.get("more")) or len(answer["records"]) > len(records)
    if as_json:
        _emit({"ok": True, "failed": records, "more": answer["more"]}, out)
        return EXIT_OK
    if not records:
        out.write("no failed jobs" + (" requeued or not" if args.requeued else "") + "\n")
        return EXIT_OK
    headers = ["FAILED AT", "TASK", "UNIQUE", "ATTEMPTS", "WORKER", "ERROR"] + (["REQUEUED"] if args.requeued else [])
    rows = []
    for r in records:
        row = [_when(r["finished_at"]), r["task"], r.get("unique"), r.get("attempts"), r.get("worker"), _error(r)]
        if args.requeued:
            row.append(len(r.get("requeues", [])) or None)
        rows.append(row)
    out.write(render(headers, rows, right=["ATTEMPTS"]) + "\n")
    if answer["more"]:
        out.write(f"(more failed jobs than the {len(records)} shown: narrow with --task/--since or raise --limit)\n")
    return EXIT_OK


def _bytes_text(rec: dict, key: str) -> str | None:
    if rec.get(key) is None:
        return None
    size, cut = rec.get(f"{key}_size"), rec.get(f"{key}_cut")
    note = f" [{size} bytes, cut to {len(decode_bytes(rec, key) or b'')}]" if cut else ""
    if rec.get(f"{key}_encoding") == "base64":
        return f"(binary, {size} bytes; --json shows it as base64){note}"
    text = rec[key]
    if len(text) > SHOWN_CHARS:
        note += f" [{len(text) - SHOWN_CHARS} more characters; --json shows all]"
        text = text[:SHOWN_CHARS]
    return printable(text) + note


def show_text(rec: dict, history: list[dict], more: bool) -> str:
    lines = []
    fields = [("unique", rec.get("unique")), ("id", rec["id"]), ("task", rec["task"]), ("state", rec["state"]),
              ("attempts", rec.get("attempts")), ("finished", _when(rec["finished_at"])),
              ("started", _when(rec.get("started_at"))), ("submitted", _when(rec.get("submitted_at"))),
              ("duration", f"{rec['duration']:.3f}s" if rec.get("duration") is not None else None),
              ("handle", f"{rec['handle']} on {rec['server']}"), ("background", rec.get("background")),
              ("priority", rec.get("priority")), ("worker", rec.get("worker")), ("host", rec.get("host")),
              ("sender", rec.get("sender_host")), ("signer", rec.get("signer")), ("requeue of", rec.get("requeue_of"))]
    if rec.get("reason") is not None:
        reason = rec["reason"] if isinstance(rec["reason"], str) else json.dumps(rec["reason"], ensure_ascii=False)
        cut = " [cut]" if rec.get("reason_cut") else ""
        fields.append(("reason", reason[:SHOWN_CHARS] + (" [...]" if len(reason) > SHOWN_CHARS else "") + cut))
    fields += [("result", _bytes_text(rec, "result")), ("data", _bytes_text(rec, "data"))]
    for q in rec.get("requeues", []):
        fields.append(("requeued", f"by {q.get('by')} at {_when(q.get('at'))} as {q.get('handle')} on {q.get('server')}"))
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        if value is not None:
            lines.append(f"{key.ljust(width)}  {render_value(value)}")
    if rec.get("traceback"):  # a failed plugin task's, its lines kept (each escaped)
        lines.append("traceback" + (" (its start cut: the outcome keeps the last 16 KiB)"
                                    if rec.get("traceback_cut") else "") + ":")
        lines += ["  " + printable(line) for line in str(rec["traceback"]).splitlines()]
    if len(history) > 1 or more:
        lines.append("")
        lines.append("history of this unique key, oldest first" + (" (older ones not shown)" if more else "") + ":")
        lines.append(render(["FINISHED", "STATE", "ATTEMPTS", "HANDLE", "SERVER", "ERROR", "REQUEUED"],
                            [[_when(h["finished_at"]), h["state"], h.get("attempts"), h["handle"], h["server"],
                              _error(h), len(h.get("requeues", [])) or None] for h in history], right=["ATTEMPTS"]))
    return "\n".join(lines)


def render_value(value: Any) -> str:
    return "yes" if value is True else "no" if value is False else printable(value)


def cmd_show(args: Any, config: Config, client: outcome_client.OutcomeClient, as_json: bool, out: TextIO,
             err: TextIO, inp: TextIO) -> int:
    rec = client.latest(unique=args.unique)
    if rec is None and len(args.unique) <= 64:
        rec = client.get(args.unique)
    if rec is None:
        if as_json:
            _emit({"ok": False, "unique": args.unique, "state": "unknown"}, out)
        err.write(f"error: no outcome of {printable(args.unique)!s}: unknown to the collector "
                  f"(never reported, or pruned after {config.outcomes.keep_days:g} days)\n")
        return EXIT_FAILED
    history: dict[str, Any] = {"records": [], "more": False}
    if rec.get("unique") is not None:
        history = client.history(rec["unique"], 20)
    if as_json:
        _emit({"ok": True, "unique": rec.get("unique"), "latest": rec, "history": history["records"],
               "more": history["more"]}, out)
    else:
        out.write(show_text(rec, history["records"], history["more"]) + "\n")
    return EXIT_OK


def cmd_requeue(args: Any, config: Config, client: outcome_client.OutcomeClient, as_json: bool, out: TextIO,
                err: TextIO, inp: TextIO) -> int:
    if args.all and (args.uniques or args.task):
        raise UsageError("failed requeue: --all goes alone (not with UNIQUE or --task)")
    if not (args.uniques or args.task or args.all):
        raise UsageError("failed requeue: name UNIQUE keys, or --task T, or --all")
    cut: list[str] = []
    groups, missing = failed_targets(client, uniques=args.uniques, task=args.task, every=args.all, cut=cut)
    for line in cut:
        err.write(f"warning: {line}\n")
    log = _log(config, "failed requeue")
    planned = plan(config, client, groups)
    if planned and not args.yes:
        # a record says what a peer reported: the operator sees what would run before it does
        if not inp.isatty():
            raise UsageError(f"failed requeue: {len(planned)} job(s) would be sent again; not on a terminal, "
                             "so nobody can confirm: look with `failed list`/`failed show`, then pass --yes")
        for p in planned:
            out.write(f"  {p.describe()}\n")
        sendable = sum(p.error is None for p in planned)
        out.write(f"Send {sendable} job{'s' if sendable != 1 else ''} again? [y/N] ")
        out.flush()
        if inp.readline().strip().lower() not in ("y", "yes"):
            err.write("nothing requeued\n")
            return EXIT_FAILED
    done = requeue(config, client, groups, requester(), planned=planned)
    for r in done:
        log.info("requeue", task=r.task, unique=r.unique, records=r.ids, handle=r.handle, server=r.server,
                 error=r.error)
    ok = not missing and all(r.error is None for r in done) and (bool(done) or args.all)
    if as_json:
        _emit({"ok": ok, "requeued": [r.to_dict() for r in done], "not_found": missing,
               **({"stopped_early": cut[0]} if cut else {})}, out)
    else:
        if done:
            out.write(render(["TASK", "UNIQUE", "RECORDS", "NEW HANDLE", "SERVER", "ERROR"],
                             [[r.task, r.unique, len(r.ids), r.handle, r.server, r.error] for r in done],
                             right=["RECORDS"]) + "\n")
        sent = sum(r.error is None for r in done)
        out.write(f"{sent} job{'s' if sent != 1 else ''} sent again\n")
    for unique in missing:
        err.write(f"error: {printable(unique)}: no failed job left to requeue (unknown, or requeued already)\n")
    if not done and not missing:
        err.write("no failed jobs" + (f" of task {printable(args.task)}" if args.task else "") + " to requeue\n")
    return EXIT_OK if ok else EXIT_FAILED


def cmd_purge(args: Any, config: Config, client: outcome_client.OutcomeClient, as_json: bool, out: TextIO,
              err: TextIO, inp: TextIO) -> int:
    what = f"failed outcomes older than {_age(args.older_than)}" if args.older_than else "every failed outcome"
    if not args.yes and inp.isatty():
        out.write(f"Delete {what} from the outcome store? [y/N] ")
        out.flush()
        if inp.readline().strip().lower() not in ("y", "yes"):
            err.write("nothing purged\n")
            return EXIT_FAILED
    n = client.purge(min_age=args.older_than or 0.0)
    _log(config, "failed purge").info("purge", older_than=args.older_than, purged=n)
    if as_json:
        _emit({"ok": True, "purged": n}, out)
    else:
        out.write(f"{n} failed outcome{'s' if n != 1 else ''} purged\n")
    return EXIT_OK


def cmd_import(args: Any, config: Config, client: outcome_client.OutcomeClient, as_json: bool, out: TextIO,
               err: TextIO, inp: TextIO) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise UsageError(f"{args.file}: not a file")
    report = import_dead_letters(client, path)
    _log(config, "failed import").info("import", file=str(path), **{k: v for k, v in report.to_dict().items()
                                                                    if k != "bad_lines"})
    if as_json:
        _emit({"ok": report.refused == 0, **report.to_dict()}, out)
    else:
        out.write(f"{report.added} outcome{'s' if report.added != 1 else ''} imported, {report.known} known already, "
                  f"{report.refused} line{'s' if report.refused != 1 else ''} refused\n")
    for number, error in report.bad_lines:
        err.write(f"error: {printable(args.file)}" + (f":{number}" if number else "") + f": {printable(error)}\n")
    return EXIT_OK if report.refused == 0 else EXIT_FAILED
