"""The fleet options of `geartask send job|shell|plugin`: --host, --label, --all, --batch, --max-fail.

A thin layer over geartask.sender.fanout: it finds the hosts, runs the job on each and prints
a table (HOST, STATE, RC, DURATION, OUTPUT) once every host is done, or with ``--json`` one
object per host as each finishes. Exit 0 only when every host completed (or, for background
jobs, was accepted); 1 otherwise, and for a named host or label that serves nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Any, Iterable, Iterator, TextIO

from ..display import json_line, printable
from ..errors import EXIT_FAILED, EXIT_OK
from ..jobs import JobDefinition
from . import fanout
from .fanout import HostResult, Target

if TYPE_CHECKING:
    from ..config import Config

OUTPUT_WIDTH = 80  # characters of a host's first output line in the table


def add_flags(sub: argparse.ArgumentParser) -> None:
    g = sub.add_argument_group("fleet", "run on chosen hosts, one job per host (docs/sender.md, Fleet commands)")
    g.add_argument("--host", action="append", metavar="HOST",
                   help="run on this host (its worker.host; repeat for several)")
    g.add_argument("--label", action="append", metavar="LABEL",
                   help="run on every host with this label (repeat for several)")
    g.add_argument("--all", action="store_true", help="run on every host that serves the task")
    g.add_argument("--batch", metavar="N|N%",
                   help="hosts at a time, each batch to its end before the next (default: every host at once)")
    g.add_argument("--max-fail", type=int, metavar="K",
                   help="start no new batch once K hosts failed; the rest are 'not started'")


def target_of_args(args: argparse.Namespace) -> Target:
    return Target.of(getattr(args, "host", None), getattr(args, "label", None), bool(getattr(args, "all", False)))


def targeted(args: argparse.Namespace) -> bool:
    return bool(target_of_args(args))


def check_rolling(args: argparse.Namespace, target: Target) -> None:
    """--batch and --max-fail only with a target; both checked before anything is sent."""
    from ..errors import UsageError
    if not target and (args.batch is not None or args.max_fail is not None):
        raise UsageError("--batch and --max-fail need --host, --label or --all")
    fanout.parse_batch(args.batch)
    if args.max_fail is not None and args.max_fail < 1:
        raise UsageError(f"--max-fail must be a whole number >= 1, got {args.max_fail}")


MAX_ASIDE = 1000  # a plugin's jobs with their own targets, held until the others are sent


def set_aside_targeted(jobs: Iterable[Any], aside: list) -> Iterator[Any]:
    """``jobs`` without those that name their own host/label/all, which go to ``aside``."""
    from ..errors import JobDefinitionError
    for job in jobs:
        extra = job.extra if isinstance(job, JobDefinition) else job if isinstance(job, dict) else {}
        if any(extra.get(k) for k in ("host", "label", "all")):
            if len(aside) >= MAX_ASIDE:
                raise JobDefinitionError(f"more than {MAX_ASIDE} jobs with their own host, label or all: "
                                         "send them with --host/--label/--all instead")
            aside.append(job)
            continue
        yield job


def _duration(seconds: float, state: str) -> str:
    return "-" if state == fanout.NOT_STARTED else f"{seconds:.2f}s"


def format_table(results: Iterable[HostResult], width: int = OUTPUT_WIDTH) -> str:
    """HOST, STATE, RC, DURATION, OUTPUT: one row per host, peer text escaped, output cut to ``width``."""
    headers = ["HOST", "STATE", "RC", "DURATION", "OUTPUT"]
    rows = []
    for r in results:
        line = printable(r.line)
        if len(line) > width:
            line = line[:width - 3] + "..."
        rows.append([printable(r.host), r.state, "-" if r.rc is None else str(r.rc), _duration(r.seconds, r.state),
                     line])
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.rjust(widths[i]) if headers[i] == "RC" else
                         (c if i == len(cells) - 1 else c.ljust(widths[i])) for i, c in enumerate(cells)).rstrip()

    return "\n".join([fmt(headers)] + [fmt(row) for row in rows])


def summary(results: list[HostResult], seconds: float) -> str:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.state] = counts.get(r.state, 0) + 1
    text = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    return f"{len(results)} host(s): {text} in {seconds:.2f}s"


def run(config: Config, args: argparse.Namespace, jobs: Iterable[Any], timeout: float | None,
        overrides: dict | None = None, out: TextIO | None = None, **stream_kwargs: Any) -> int:
    """Fan out each job (its own target, else the command line's) and report every host."""
    from .sender import JobSender
    out = out or sys.stdout
    cli_target = target_of_args(args)
    check_rolling(args, cli_target)
    printer = None
    if getattr(args, "follow", False):  # live output, each line 'HOST | line' (the --follow work)
        from .follow import FollowPrinter
        printer = FollowPrinter(out)
        stream_kwargs = {**stream_kwargs, "on_data": printer.on_data}
    status = EXIT_OK
    connections = None  # the servers' workers lists, asked once for every job of the run
    with JobSender(config) as sender:
        for job in jobs:
            job = JobDefinition.from_any(job)
            target = cli_target or fanout.target_of(job)
            start = time.monotonic()
            if connections is None:
                connections = fanout.fleet_hosts(config, config.sender.submit_timeout)
            plan = fanout.plan(config, job, target, connections=connections)
            results = []
            for r in fanout.fan_out(sender, plan.job, plan.hosts, batch=args.batch, max_fail=args.max_fail,
                                    timeout=timeout, wait=not args.no_wait, overrides=overrides, **stream_kwargs):
                results.append(r)
                if printer is not None and r.job is not None:
                    printer.end(r.job)  # the host's unfinished lines, before the table
                if args.json:
                    out.write(json_line(r.to_json(), default=repr) + "\n")
                    out.flush()
            if not args.json:
                order = {h: i for i, h in enumerate(plan.hosts)}
                results.sort(key=lambda r: order.get(r.host, len(order)))
                out.write(format_table(results) + "\n" + summary(results, time.monotonic() - start) + "\n")
                if any(r.state == fanout.QUEUED for r in results):
                    out.write("background jobs recorded, one per host; check them with: geartask send status\n")
                out.flush()
            if not all(r.ok for r in results):
                status = EXIT_FAILED
    return status
