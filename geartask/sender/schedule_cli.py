"""``geartask send schedule [--once] [--json]`` and ``schedule list``: the scheduler's commands.

Part of the ``send`` command: a scheduler is a sender of periodic jobs (geartask.scheduler
decides what is due; this module sends it with a JobSender and asks the outcomes store).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from ..display import printable
from ..errors import EXIT_FAILED, EXIT_OK, GeartaskError
from ..plugins import load_plugins
from ..outcomes.client import OutcomeClient
from ..scheduler.listing import rows
from ..scheduler.load import load_schedules
from ..scheduler.schedule import Schedule, slot_text
from ..scheduler.scheduler import Decision, Scheduler
from .sender import JobSender

if TYPE_CHECKING:
    from ..config import Config

def add_parser(add: Any) -> None:
    """The ``schedule`` command, on the send command's parser (``add(name, help, run)``)."""
    sp = add("schedule", "run the periodic jobs of the config and plugins (a scheduler)", cmd_schedule)
    sp.description = ("Send each schedule's job at each slot; any number of schedulers may run "
                      "at once (each slot runs once). 'schedule list' shows the schedules.")
    sp.add_argument("action", nargs="?", choices=["list"], help="list the schedules, their next runs and last run")
    sp.add_argument("--once", action="store_true", help="send what is due now and exit (for system cron)")
    sp.add_argument("--json", action="store_true", help="one JSON object per line")


def _sender_send(sender: Any):
    def send(jobs: list[dict]) -> list[str | None]:
        try:
            results = sender.submit_many(jobs, wait=False)
        except GeartaskError as e:
            return [str(e)] * len(jobs)
        return [None if r.ok else str(r.error or r.state) for r in results]
    return send


def _outcomes(config: Config) -> Any:
    """The outcomes client the scheduler asks about missed slots."""
    return _Ran(OutcomeClient(config))


class _Ran:
    """Adapts the outcomes client to the scheduler's question: did this unique run?"""

    def __init__(self, client: Any):
        self.client = client

    def ran(self, unique: str) -> bool | None:
        try:
            return self.client.latest(unique=unique) is not None
        except GeartaskError:
            return None

    def record(self, unique: str) -> dict | None:
        return self.client.latest(unique=unique)  # GeartaskError when unreachable: the scheduler says so

    def last(self, unique: str) -> dict | None:
        try:
            return self.client.latest(unique=unique)
        except GeartaskError:
            return None


def cmd_schedule(config: Config, args: argparse.Namespace) -> int:
    plugins = load_plugins(config)
    schedules = load_schedules(config, plugins)
    if args.action == "list":
        return _list(config, schedules, args.json)
    if not schedules:
        print("no schedules: add a 'schedules' list to the config or a geartask_schedules hook to a plugin",
              file=sys.stderr)
        return EXIT_FAILED
    with JobSender(config) as sender:
        sc = getattr(config, "scheduler", None)
        scheduler = Scheduler(schedules, _sender_send(sender), _outcomes(config),
                              **({"max_clock_skew": sc.max_clock_skew, "verify_after": sc.verify_after} if sc else {}))

        def show(d: Decision) -> None:
            if args.json:
                print(json.dumps(d.to_json()), flush=True)
            elif d.action in ("sent", "ahead", "failed", "unreachable", "alert"):
                what = {"ahead": "handed over", "sent": "sent (missed)", "failed": "NOT sent",
                        "unreachable": "NOT sent (outcomes unreachable)", "alert": "ALERT"}[d.action]
                when = f" runs {time.strftime('%H:%M:%S', time.localtime(d.run_at))}" if d.run_at else ""
                print(f"{slot_text(d.slot)} {printable(d.schedule)}: {what}{when}"
                      + (f" error: {printable(d.error)}" if d.error else ""), flush=True)
        if args.once:
            decisions = scheduler.tick()
            for d in decisions:
                show(d)
            return EXIT_FAILED if any(d.action in ("failed", "unreachable") for d in decisions) else EXIT_OK
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: scheduler.stop())
        scheduler.run_forever(show)
    return EXIT_OK


def _list(config: Config, schedules: list[Schedule], as_json: bool) -> int:
    outcomes = _outcomes(config)
    table = rows(schedules, outcomes.last if outcomes is not None else None)
    if as_json:
        for r in table:
            print(json.dumps(r))
        return EXIT_OK
    if not table:
        print("no schedules")
    for r in table:
        last = r["last"]
        last_text = (f"{last['slot']} {last['state']} on {printable(str(last['worker']))}" if last
                     else "no run known to the outcomes store")
        print(f"{printable(r['name'])}: {printable(r['task'])} {printable(r['when'])} ({r['timezone']}, "
              f"misfire {r['misfire']})\n  next: {', '.join(r['next'])}\n  last: {last_text}")
    return EXIT_OK
