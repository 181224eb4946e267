"""`geartask send`: send jobs to the job servers from the command line.

    geartask send [--config PATH] [--servers H:P,...] plugin NAME [--background]
                       [--priority low|normal|high] [--no-wait] [--timeout S] [--json]
    geartask send shell [--background] [--timeout S] [--retries N] [--follow] -- CMD ARGS...
    geartask send job TASK DATA
    geartask send list
    geartask send status [HANDLE...]

A thin layer over geartask.sender.JobSender; each job's line is printed as it
finishes. Exit 0 when every job completed (or was accepted, for background jobs), 1 when
any failed or timed out or no server could be reached (status: any handle unknown or
unreachable), 2 for usage, config and plugin errors. See docs/sender.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from typing import Any, Callable, Iterable, Sequence

from ..cli import (ArgumentParser, add_common_args, config_from_args, count, non_negative_seconds, positive_seconds,
                   run, setup_logging)
from ..arguments import duration, number, prog
from ..display import json_line, printable
from ..config import PRIORITIES, Config
from ..errors import EXIT_FAILED, EXIT_OK, GeartaskError, JobDefinitionError, PluginError, UsageError
from ..jobs import JobDefinition
from ..plugins import discover, load_plugins
from . import recover_cli, schedule_cli
from . import fleet_cli, outcomes, status_filter
from .progress import ProgressBar
from .background import StatusResult
from .follow import FollowPrinter
from .results import JobResult
from .sender import JobSender


def _common(sub: argparse.ArgumentParser) -> None:
    add_common_args(sub, after_command=True)  # the shared options, after the subcommand too


SHELL_REPORT_GRACE = 5.0  # seconds: a killed command's failure report reaching the sender
EACH_UP_TO = 20  # jobs whose lines a batch prints before it prints only failures and the summary


def _submit_flags(sub: argparse.ArgumentParser, timeout_help: str) -> None:
    sub.add_argument("--background", action="store_true", default=None,
                     help="send as background jobs: done once a server accepts them (see 'status')")
    sub.add_argument("--priority", choices=PRIORITIES, help="job priority (default: sender.priority)")
    sub.add_argument("--no-wait", action="store_true",
                     help="return once every job is accepted, without results (sent as background jobs, "
                          "because gearmand drops a foreground job whose client has gone)")
    sub.add_argument("--timeout", type=positive_seconds, metavar="S", help=timeout_help)
    sub.add_argument("--json", action="store_true", help="print one JSON object per job and nothing else")
    sub.add_argument("--each", action="store_true",
                     help=f"print every job's line; by default a batch of more than {EACH_UP_TO} prints the first "
                          f"{EACH_UP_TO}, then only failures, and the summary")
    fleet_cli.add_flags(sub)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=prog("send", "send_job_client.py"),
                            description="Send jobs to the geartask job servers.")
    add_common_args(parser)
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    subs.required = True

    def add(name: str, help: str, run: Callable[[Config, argparse.Namespace], int]) -> ArgumentParser:
        """One command: its parser (with the shared options after it too) and what runs it."""
        sp = subs.add_parser(name, help=help)
        _common(sp)
        sp.set_defaults(func=run)
        return sp

    sp = add("plugin", "send every job a plugin defines", cmd_plugin)
    sp.add_argument("name", metavar="NAME", help="plugin name (see 'list')")
    _submit_flags(sp, "seconds to wait for all results; the rest end as 'timeout'")

    sp = add("shell", "one ad hoc command for the workers' shell task", cmd_shell)
    _submit_flags(sp, "seconds to wait for the result; the rest ends as 'timeout' (without --kill-after, "
                      "the command is also killed on the worker then)")
    sp.add_argument("--kill-after", type=positive_seconds, metavar="S",
                    help="seconds the command may run on the worker before it is killed (default: --timeout)")
    sp.add_argument("--retries", type=count, metavar="N",
                    help="times the worker retries a failed command (up to its worker.max_retries)")
    sp.add_argument("--follow", action="store_true",
                    help="print the command's output as it runs, each line as 'HOST | line' ('HOST |! line' "
                         "for stderr); see docs/sender.md")
    sp.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")

    sp = add("job", "one job for any task", cmd_job)
    sp.add_argument("task", metavar="TASK")
    sp.add_argument("data", metavar="DATA", help="JSON, else taken as a string")
    sp.add_argument("--unique", help="unique key (default: generated)")
    _submit_flags(sp, "seconds to wait for the result")

    sp = add("list", "the plugins found and the jobs each would send", cmd_list)
    sp.add_argument("--json", action="store_true", help="JSON output")

    sp = add("status", "ask the servers about background jobs", cmd_status)
    sp.add_argument("handles", nargs="*", metavar="HANDLE",
                    help="job handles (default: every background job recorded in log.dir)")
    sp.add_argument("--json", action="store_true", help="one JSON object per job")
    sp.add_argument("--state", action="append", choices=status_filter.STATES,
                    help="only jobs in this state (repeat for several)")
    sp.add_argument("--task", help="only jobs of this task")
    sp.add_argument("--since", type=duration, metavar="DURATION",
                    help="only jobs sent in the last DURATION (30m, 2h, 7d)")
    sp.add_argument("--limit", type=number(int, positive=True, what="a whole number"), metavar="N",
                    help="only the newest N jobs that match")
    sp = add("result", "a job's outcome (result or failure) from the outcomes collector", cmd_result)
    sp.add_argument("key", metavar="UNIQUE|HANDLE", help="the job's unique key, or its handle (HANDLE@HOST:PORT)")
    sp.add_argument("--wait", type=non_negative_seconds, metavar="S", help="wait up to S seconds for it to finish")
    sp.add_argument("--json", action="store_true", help="the outcome as one JSON object")
    schedule_cli.add_parser(add)
    recover_cli.add_parser(add)
    return parser


def _parse_data(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _short(value: Any, width: int = 100) -> str:
    """One line of at most ``width`` characters, with what a peer could use to fool a terminal escaped."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=repr)
    text = printable(text)
    return text if len(text) <= width else text[:width - 3] + "..."


def _job_line(r: JobResult) -> str:
    where = printable(f"{r.handle or '-'}@{r.server or '-'}")
    attempts = "-" if r.attempts is None else r.attempts
    head = (f"{r.state:8} {printable(r.task)} [{printable(r.unique)}] {where} attempts={attempts} "
            f"submissions={r.submissions} {r.seconds:.2f}s")
    if r.state in ("failed", "timeout"):
        return f"{head} error: {_short(r.error)}"
    if r.state == "queued":
        return head
    return f"{head} -> {_short(r.result)}"


def _send(config: Config, args: argparse.Namespace, jobs: Iterable[Any], timeout: float | None,
          plugin: tuple[str, str | None] | None = None) -> int:
    """Stream the jobs; print each one's line as it finishes, then a summary."""
    overrides = {}
    if args.priority:
        overrides["priority"] = args.priority
    if args.background:
        overrides["background"] = True
    if overrides:
        jobs = (_override(j, overrides) for j in jobs)
    out = sys.stdout
    printer = FollowPrinter(out) if getattr(args, "follow", False) else None  # live output (--follow)
    bar = ProgressBar(sys.stderr)
    clear_bar = out.isatty() and bar.enabled  # the bar shares the terminal with our lines
    counts: dict[str, int] = {}
    hidden = 0  # lines of complete or queued jobs not printed (no --each)
    start = last_flush = time.monotonic()
    try:
        with JobSender(config) as sender, bar:
            for r in sender.stream(jobs, wait=not args.no_wait, timeout=timeout,
                                   on_progress=bar if printer is None else None,  # no bar under live lines
                                   on_data=printer.on_data if printer is not None else None):
                if printer is not None:
                    printer.end(r)  # its unfinished lines and dropped count, before its result line
                counts[r.state] = counts.get(r.state, 0) + 1
                if not (args.json or args.each) and sum(counts.values()) > EACH_UP_TO and \
                        r.state in ("complete", "queued"):
                    hidden += 1  # a big batch: its failures and the summary, not 20,000 lines
                    continue
                if clear_bar:
                    bar.clear()
                out.write((json_line(r.to_json(), default=repr) if args.json
                           else _job_line(r)) + "\n")
                if time.monotonic() - last_flush > 0.2:
                    out.flush()
                    last_flush = time.monotonic()
    except JobDefinitionError as e:
        _summary(counts, start, args.json, hidden)
        if plugin is None:
            raise
        raise PluginError(str(e), *plugin) from None  # name the plugin that made the job
    except GeartaskError:
        _summary(counts, start, args.json, hidden)
        raise
    _summary(counts, start, args.json, hidden)
    ok = sum(counts.get(state, 0) for state in ("complete", "queued"))
    return EXIT_OK if ok == sum(counts.values()) else EXIT_FAILED


def _summary(counts: dict[str, int], start: float, as_json: bool, hidden: int = 0) -> None:
    out = sys.stdout
    if hidden and not as_json:
        out.write(f"({hidden} more complete or queued job(s) not shown; --each prints every one)\n")
    if counts and not as_json:
        total = sum(counts.values())
        summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
        out.write(f"{total} job(s): {summary} in {time.monotonic() - start:.2f}s\n")
        if counts.get("queued"):
            out.write("background jobs recorded; check them with: geartask send status\n")
    out.flush()


def _override(job: Any, overrides: dict) -> Any:
    if not overrides:
        return job
    d = dict(job.__dict__) if isinstance(job, JobDefinition) else dict(job)
    d.update(overrides)
    return d


def cmd_plugin(config: Config, args: argparse.Namespace) -> int:
    plugins = load_plugins(config, only=[args.name])
    taken = (job for _, job in plugins.iter_jobs())  # taken as they are sent: memory stays flat
    first = next(taken, None)
    if first is None:
        raise PluginError("yielded no jobs: nothing to send", args.name, plugins.files.get(args.name))
    jobs = itertools.chain([first], taken)
    if fleet_cli.targeted(args):  # every job, on the hosts the command line names
        return fleet_cli.run(config, args, jobs, args.timeout, _fleet_overrides(args))
    aside: list = []  # jobs with their own host/label/all, fanned out after the others
    status = _send(config, args, fleet_cli.set_aside_targeted(jobs, aside), args.timeout,
                   (args.name, plugins.files.get(args.name)))
    if aside:
        status = max(status, fleet_cli.run(config, args, aside, args.timeout, _fleet_overrides(args)))
    return status


def _fleet_overrides(args: argparse.Namespace) -> dict:
    """--priority and --background, as _send applies them, for each host's job."""
    overrides: dict[str, Any] = {}
    if args.priority:
        overrides["priority"] = args.priority
    if args.background:
        overrides["background"] = True
    return overrides


def cmd_shell(config: Config, args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("shell: no command given; usage: geartask send shell [options] -- CMD ARGS...")
    data: dict[str, Any] = {"cmd": cmd}
    if args.follow:
        if args.background or args.no_wait or args.json:
            raise UsageError("shell: --follow prints the output while the sender waits for it; it can't be "
                             "combined with --background, --no-wait or --json")
        data["follow"] = True
    kill_after = args.kill_after or args.timeout  # a command whose result nobody waits for must not run on
    if kill_after:
        data["timeout"] = kill_after
    job: dict[str, Any] = {"task": "shell", "data": data}
    if args.retries is not None:
        job["retries"] = args.retries  # in the envelope (geartask.envelope), not the command's data
    wait = args.timeout
    if wait and not args.kill_after:
        # killed at --timeout on the worker: wait a moment longer, so its report (killed after
        # S, with the output so far) is the answer rather than a bare 'timeout'
        wait += SHELL_REPORT_GRACE
    if fleet_cli.targeted(args):
        return fleet_cli.run(config, args, [job], wait, _fleet_overrides(args))
    fleet_cli.check_rolling(args, fleet_cli.target_of_args(args))
    return _send(config, args, [job], wait)


def cmd_job(config: Config, args: argparse.Namespace) -> int:
    job = {"task": args.task, "data": _parse_data(args.data)}
    if args.unique:
        job["unique"] = args.unique
    if fleet_cli.targeted(args):
        return fleet_cli.run(config, args, [job], args.timeout, _fleet_overrides(args))
    fleet_cli.check_rolling(args, fleet_cli.target_of_args(args))
    return _send(config, args, [job], args.timeout)


def cmd_list(config: Config, args: argparse.Namespace) -> int:
    """Each plugin and the jobs it would send, printed as the plugin yields them."""
    found = discover(config)
    enabled = list(config.plugins.enabled)
    out = sys.stdout
    status = EXIT_OK
    if not found and not args.json:
        out.write("no plugins found in " + ", ".join(str(p) for p in config.plugins.paths) + "\n")
    for name, src in sorted(found.items()):
        item = {"plugin": name, "file": src.file, "enabled": not enabled or name in enabled}
        head = f"{name} ({src.file}){'' if item['enabled'] else ' [not enabled]'}"
        if args.json:  # one object per plugin, its "jobs" list written as they come
            out.write(json.dumps(item, ensure_ascii=False)[:-1] + ', "jobs": [')
        n, error = 0, None
        try:
            for _, j in load_plugins(config, only=[name]).iter_jobs():
                data = j.data if not isinstance(j.data, bytes) else f"<{len(j.data)} bytes>"
                # where a job definition sends itself (fleet commands: host, label, all)
                targets = {k: j.extra[k] for k in ("host", "label", "all") if j.extra.get(k)}
                if args.json:
                    entry = {"task": j.task, "unique": j.unique, "priority": j.priority,
                             "background": j.background, **targets, "data": data}
                    out.write((", " if n else "") + json.dumps(entry, ensure_ascii=False, default=repr))
                else:
                    if not n:
                        out.write(f"{head}:\n")
                    extra = "".join(f" {k}={v}" for k, v in (("unique", j.unique), ("priority", j.priority),
                                                             ("background", j.background), *targets.items())
                                    if v is not None)
                    out.write(f"  {j.task}{extra} data={_short(data, 70)}\n")
                n += 1
        except GeartaskError as e:  # one broken plugin doesn't hide the others
            error = str(e)
            status = max(status, e.exit_status)
        if args.json:
            out.write("]" + (f', "error": {json.dumps(error, ensure_ascii=False)}' if error else "") + "}\n")
        elif not n:
            out.write(f"{head}: " + (f"error: {error}" if error else "0 job(s)") + "\n")
        else:
            if error:
                out.write(f"  error: {error}\n")
            out.write(f"  {n} job(s)\n")
    out.flush()
    return status


def _status_line(s: StatusResult) -> str:
    who = f"{printable(s.task)} [{printable(s.unique)}] " if s.task else ""
    line = f"{s.state:11} {who}{printable(s.handle)}@{printable(s.server or '-')}"
    if s.state == "running" and s.denominator:
        line += f" {s.numerator}/{s.denominator}"
    if s.outcome is not None:
        line += f" attempts={s.outcome.get('attempts')}"
        if s.state == "complete":
            line += f" -> {_short(outcomes.Outcome(s.unique or s.handle, s.state, s.outcome).result)}"
        else:
            line += f" error: {_short(s.outcome.get('reason'))}"
    if s.error:
        line += f" error: {printable(s.error)}"
    return line


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    counts: dict[str, int] = {}
    flt = status_filter.StatusFilter(frozenset(args.state or ()), args.task, args.since, args.limit)
    with JobSender(config) as sender:
        for s in status_filter.statuses(sender, config, args.handles or None, flt):
            print(json_line(s.to_json()) if args.json else _status_line(s))
            counts[s.state] = counts.get(s.state, 0) + 1
    total = sum(counts.values())
    if not total:
        if not args.json:
            filtered = flt.by_record or flt.states
            print(f"no background jobs {'match' if filtered else 'recorded'} in {sender.record_path}")
        return EXIT_OK
    if not args.json:
        print(f"{total} job(s): " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    return EXIT_FAILED if counts.get("unknown") or counts.get("unreachable") or counts.get("failed") else EXIT_OK


def cmd_result(config: Config, args: argparse.Namespace) -> int:
    o = outcomes.result(config, args.key, wait=args.wait or 0.0)
    if args.json:
        print(json_line(o.to_json(), default=repr))
    elif o.record is None:
        print(f"unknown  {printable(o.key)}: {printable(o.error)}")
    else:
        rec = o.record
        head = (f"{o.state:8} {printable(rec.get('task'))} [{printable(rec.get('unique') or '-')}] "
                f"{printable(rec.get('handle'))}@{printable(rec.get('server'))} attempts={rec.get('attempts')} "
                f"worker={printable(rec.get('worker') or '-')}")
        if o.state == "complete":
            result = o.result
            text = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=repr)
            print(head + "\n" + "\n".join(printable(line) for line in str(text).splitlines())
                  + ("\n(result cut: the outcome keeps outcomes.max_result bytes)" if rec.get("result_cut") else ""))
        else:
            print(f"{head} error: {_short(rec.get('reason'), 500)}")
            for line in str(rec.get("traceback") or "").splitlines():  # a failed plugin task's
                print("  " + printable(line))
        for r in rec.get("requeues") or []:
            print(f"requeued by {printable(str(r.get('by')))} as {printable(str(r.get('handle')))}")
    return EXIT_OK if o.state == "complete" else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    # Every job's story goes to the log file; the console (stderr, under the progress bar)
    # gets only warnings and errors unless -v: stdout already has the report.
    setup_logging(config, args, "sender")
    return args.func(config, args)


def cli() -> None:
    sys.exit(run(main))


if __name__ == "__main__":
    cli()
