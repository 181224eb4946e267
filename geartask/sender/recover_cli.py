"""``geartask send recover --server HOST:PORT``: the command over geartask.sender.recover."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from ..arguments import number
from ..display import json_line, printable
from .recover import Recovery, recover

if TYPE_CHECKING:
    from ..config import Config

SHOWN = 20  # problem lines printed before only their count is

DESCRIPTION = (
    "Send the background jobs that THIS HOST's background record (log.dir/sender-background.jsonl) "
    "holds for a dead job server again, with the same unique keys, to the server routing picks "
    "without it. Jobs with a stored outcome (asked of the outcomes collector) are skipped as done; "
    "if no collector answers, nothing is sent unless --resend-undecided. Each sender host keeps "
    "its own record: run it on every host that sent jobs to that server. Exit status: 0 every job "
    "resent or skipped as done, 1 some undecided or not resent, 2 usage (bad --server, unknown "
    "server, no other server, the server still answers), 3 nothing recorded for that server here.")


def add_parser(add: Any) -> None:
    """The ``recover`` command, on the send command's parser (``add(name, help, run)``)."""
    sp = add("recover", "send a dead server's recorded background jobs again (per sender host)", cmd_recover)
    sp.description = DESCRIPTION
    sp.add_argument("--server", required=True, metavar="HOST:PORT", help="the dead job server, as the record names it")
    sp.add_argument("--older-than", type=number(float), metavar="S",
                    help="only jobs recorded at least S seconds ago")
    sp.add_argument("--resend-undecided", action="store_true",
                    help="also send jobs whose outcome can't be checked (no collector answers): "
                         "those that had run will run twice")
    sp.add_argument("--even-if-answering", action="store_true",
                    help="go on although the server answers (it restarted and lost its queue)")
    sp.add_argument("--dry-run", action="store_true", help="say what would be sent; send nothing")
    sp.add_argument("--json", action="store_true", help="the report as one JSON object")


def report_lines(r: Recovery) -> list[str]:
    """The text report: the jobs not sent, then one summary line."""
    lines = [f"bad record line: {printable(b)}" for b in r.bad_lines[:SHOWN]]
    problems = [j for j in r.jobs if j.state in ("undecided", "not_resent")]
    for j in problems[:SHOWN]:
        lines.append(f"{j.state:10} {printable(str(j.task))} [{printable(str(j.unique))}] "
                     f"{printable(str(j.old_handle))}@{r.server}: {printable(str(j.reason))}")
    hidden = len(problems) + len(r.bad_lines) - len(lines)
    if hidden > 0:
        lines.append(f"({hidden} more not shown; --json lists every one)")
    sent = ", ".join(f"{n} to {printable(str(s))}" for s, n in sorted(r.resent_to.items()))
    verb = "would resend" if r.dry_run else "resent"
    count = r.count("would_resend") if r.dry_run else r.count("resent")
    summary = (f"{r.server}: {verb} {count}{f' ({sent})' if sent else ''}, skipped {r.count('done')} as done, "
               f"{r.count('undecided')} undecided, {r.count('not_resent')} not resent")
    if r.too_new:
        summary += f", {r.too_new} recorded too recently (left alone)"
    if r.bad_lines:
        summary += f", {len(r.bad_lines)} bad record line(s)"
    lines.append(summary + f" [{printable(r.record_path)}]")
    if r.undecided_reason:
        lines.append(f"not sent: {r.count('undecided')} job(s) whose outcome can't be checked "
                     f"({printable(r.undecided_reason)}); run recover again once a collector answers, or "
                     f"add --resend-undecided (a job that had run then runs twice)")
    return lines


def cmd_recover(config: Config, args: argparse.Namespace) -> int:
    r = recover(config, args.server, older_than=args.older_than, resend_undecided=args.resend_undecided,
                dry_run=args.dry_run, even_if_answering=args.even_if_answering)
    if args.json:
        print(json_line(r.to_json(), default=repr))
    else:
        sys.stdout.write("".join(line + "\n" for line in report_lines(r)))
    return r.exit_status
