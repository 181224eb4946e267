"""``send recover``: send the background jobs of a dead job server again (issue 21, Must 4).

A server with the builtin queue (no persistence) that dies takes its queued background jobs
with it. The sender's background record (log.dir/sender-background.jsonl) still names each
one, with its data (background.recorded_fields): ``recover`` sends those recorded for that
server again, with the same unique keys, to the servers routing picks without it, except the
ones that have an outcome stored (they ran). Each sender host keeps its own record, so this
runs on every sender host. docs/sender.md, "Recovering background jobs of a dead server".

It never guesses: a job whose outcome can't be checked (no collector answers) is left
*undecided* and not sent, unless the caller says to (``resend_undecided``), since a job that
ran and is sent again runs twice.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..address import canonical_host, format_address, split_address
from ..config import PRIORITIES, parse_server
from ..errors import EXIT_FAILED, EXIT_OK, EXIT_USAGE, ConfigError, GeartaskError, UsageError
from ..jobs import JobDefinition
from ..server import port_open
from .background import RECORD_NAME, BackgroundRecord, recorded_data, server_problem
from .sender import JobSender
from .status_filter import TIME_FORMAT
from .status_outcomes import OutcomeBatch

if TYPE_CHECKING:
    from ..config import Config

EXIT_NOTHING = 3  # nothing recorded for that server on this host: not a failure, but nothing done
CHECK_CHUNK = 1000  # outcomes asked for at a time (over one connection, status_outcomes)
ALIVE_TIMEOUT = 2.0  # seconds the "dead" server gets to answer an echo before it counts as gone
STATES = ("resent", "done", "undecided", "not_resent", "would_resend")


class NothingRecorded(UsageError):
    """The background record of this host names no job of that server."""

    exit_status = EXIT_NOTHING


class StillAnswering(UsageError):
    """The server recover was told is dead answers: its queued jobs would run twice."""


@dataclass
class RecoveredJob:
    """One recorded job and what recover did with it: ``state`` resent (``handle``/``server``
    are where it went), done (an outcome is stored: skipped), undecided (its outcome could not
    be checked: not sent), not_resent (``reason`` says why), would_resend (a dry run)."""

    task: Any
    unique: Any
    old_handle: Any
    state: str = "not_resent"
    handle: str | None = None
    server: str | None = None
    reason: str | None = None
    record: dict | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        return {"task": self.task, "unique": self.unique, "old_handle": self.old_handle, "state": self.state,
                "handle": self.handle, "server": self.server, "reason": self.reason}


@dataclass
class Recovery:
    """What ``recover`` did for one dead server on this host."""

    server: str
    targets: list[str]
    record_path: str
    jobs: list[RecoveredJob] = field(default_factory=list)
    too_new: int = 0  # recorded less than older_than ago (or with no readable time): left alone
    bad_lines: list[str] = field(default_factory=list)  # record lines of that server that can't be read
    undecided_reason: str | None = None
    dry_run: bool = False

    def count(self, state: str) -> int:
        return sum(1 for j in self.jobs if j.state == state)

    @property
    def resent_to(self) -> Counter:
        return Counter(j.server for j in self.jobs if j.state == "resent")

    @property
    def exit_status(self) -> int:
        """0 when every job was resent or skipped as done; 1 when any was left undecided or not
        resent, or a record line of that server could not be read."""
        return EXIT_FAILED if self.count("undecided") or self.count("not_resent") or self.bad_lines else EXIT_OK

    def to_json(self) -> dict:
        return {"server": self.server, "targets": self.targets, "record": self.record_path, "dry_run": self.dry_run,
                **{s: self.count(s) for s in STATES}, "resent_to": dict(self.resent_to),
                "too_new": self.too_new, "bad_lines": self.bad_lines, "undecided_reason": self.undecided_reason,
                "problems": [j.to_json() for j in self.jobs if j.state in ("undecided", "not_resent")]}


def dead_address(server: Any) -> str:
    """``HOST:PORT`` (or ``tls://HOST:PORT``) as the record writes servers; UsageError naming the problem."""
    text = server.strip() if isinstance(server, str) else server
    bare = text.partition("://")[2] if isinstance(text, str) and "://" in text else text
    why = server_problem(bare)
    if why is None:
        try:
            host, port = parse_server(text, "--server")
        except ConfigError as e:
            why = str(e).removeprefix("<config>: --server: ")
    if why is not None:
        raise UsageError(f"--server: {why}")
    return format_address(canonical_host(host), port)


def _answers(address: str, timeout: float) -> bool:
    """Whether a job server answers an echo at ``address`` (then it is not dead)."""
    return port_open(*split_address(address), timeout=timeout)


def _recorded_at(rec: dict) -> float | None:
    try:
        return datetime.strptime(str(rec.get("time")), TIME_FORMAT).timestamp()
    except ValueError:
        return None


def plan(config: Config, server: str, older_than: float | None = None, now: float | None = None,
         check_alive: bool = True) -> Recovery:
    """Which recorded jobs of ``server`` recover would consider (state not_resent until decided).

    UsageError: ``server`` is not HOST:PORT, is neither configured nor recorded, is the only
    configured server, or answers (``check_alive``). NothingRecorded: no job of it in the record.
    """
    dead = dead_address(server)
    targets = [s for s in config.servers if format_address(*parse_server(s)[:2]) != dead]
    record = BackgroundRecord(Path(config.log.dir) / RECORD_NAME, config.log.max_bytes, config.log.backups)
    recovery = Recovery(dead, targets, str(record.path))
    latest: dict[str, RecoveredJob] = {}  # by unique: a key sent twice is one job (the newer line)
    seen_servers: set[str] = set()  # named in the error when this one has nothing recorded
    now = time.time() if now is None else now
    for ask in record.entries():
        if ask.problem is not None:
            if ask.server == dead:
                recovery.bad_lines.append(ask.problem)
            continue
        seen_servers.add(str(ask.server))
        if ask.server != dead:
            continue
        rec = ask.record or {}
        if older_than is not None:
            at = _recorded_at(rec)
            if at is None or at > now - older_than:
                recovery.too_new += 1
                continue
        job = RecoveredJob(rec.get("task"), rec.get("unique"), ask.handle, record=rec)
        if not isinstance(job.unique, str) or not job.unique:
            job.reason = "the record has no unique key for it: it can't be sent again as the same job"
            recovery.jobs.append(job)
            continue
        latest.pop(job.unique, None)
        latest[job.unique] = job
    recovery.jobs += list(latest.values())
    configured = dead in {"{}:{}".format(*parse_server(s)[:2]) for s in config.servers}
    if not recovery.jobs and not recovery.too_new and not recovery.bad_lines:
        if not configured:
            raise UsageError(f"--server {dead}: not a configured server and nothing in {record.path} was sent "
                             f"to it (servers in the record: {', '.join(sorted(seen_servers)) or 'none'})")
        raise NothingRecorded(f"no background jobs recorded for {dead} in {record.path} (servers in the record: "
                              f"{', '.join(sorted(seen_servers)) or 'none'}; each sender host keeps its own record: "
                              f"run recover on the hosts that sent them)")
    if not targets:
        raise UsageError(f"--server {dead}: it is the only server in 'servers'; add the server(s) to send its "
                         f"jobs to")
    if check_alive and _answers(dead, min(ALIVE_TIMEOUT, config.sender.connect_timeout)):
        raise StillAnswering(f"--server {dead} answers: the jobs still queued there will run there, and "
                             f"sent again they would run twice; recover is for a server that is gone "
                             f"(--even-if-answering if its queue was lost)")
    return recovery


def check_outcomes(config: Config, recovery: Recovery, timeout: float = 5.0) -> None:
    """Mark each job with a stored outcome ``done``; if the outcomes can't be read, the jobs not
    asked yet become ``undecided`` (with the reason)."""
    batch = OutcomeBatch(config.with_servers(recovery.targets), timeout=timeout)
    asking = [j for j in recovery.jobs if j.reason is None]
    try:
        for start in range(0, len(asking), CHECK_CHUNK):
            part = asking[start:start + CHECK_CHUNK]
            try:
                found = batch.latest([(j.unique, None, None) for j in part])
            except GeartaskError as e:
                recovery.undecided_reason = str(e)
                for j in asking[start:]:
                    j.state, j.reason = "undecided", f"its outcome can't be checked: {e}"
                return
            for j, outcome in zip(part, found, strict=True):
                if outcome is not None:
                    j.state, j.reason = "done", f"outcome stored: {outcome.get('state')}"
    finally:
        batch.close()


def _definition(job: RecoveredJob) -> dict | str:
    """The job definition to send ``job`` again, or why there is none (the record is a file
    anyone on the host may have edited: checked like a plugin's definition)."""
    rec = job.record or {}
    try:
        data = recorded_data(rec)
    except ValueError as e:
        return str(e)
    d: dict[str, Any] = {"task": rec.get("task"), "data": data, "unique": job.unique, "background": True}
    if rec.get("priority") in PRIORITIES:
        d["priority"] = rec["priority"]
    for key in ("retries", "at"):
        if rec.get(key) is not None:
            d[key] = rec[key]
    try:
        JobDefinition.from_any(d, "record line")
    except GeartaskError as e:
        return f"bad record: {e}"
    return d


def resend(config: Config, recovery: Recovery, include_undecided: bool = False) -> None:
    """Send the jobs with no stored outcome (and the undecided ones, if told) again, with their
    unique keys, to the servers routing picks among ``recovery.targets``; they are recorded
    like any background job, under their new server."""
    wanted = [j for j in recovery.jobs
              if (j.state == "not_resent" and j.reason is None) or (include_undecided and j.state == "undecided")]
    sendable: list[tuple[RecoveredJob, dict]] = []
    for j in wanted:
        d = _definition(j)
        if isinstance(d, str):
            j.state, j.reason = "not_resent", d
        else:
            sendable.append((j, d))
    if not sendable:
        return
    # a job first sent raw (its data the whole payload, e.g. with its original signature) goes raw again
    raw = [(j, d) for j, d in sendable if (j.record or {}).get("raw") is True]
    plain = [(j, d) for j, d in sendable if (j.record or {}).get("raw") is not True]
    try:
        with JobSender(config.with_servers(recovery.targets)) as sender:
            results = sender.submit_many([d for _, d in plain], wait=False) if plain else []
            if raw:
                results += sender.submit_raw([{k: v for k, v in d.items() if k in ("task", "data", "unique", "priority")}
                                              for _, d in raw])
    except GeartaskError as e:
        for j, _ in sendable:
            if j.state != "resent":
                j.state, j.reason = "not_resent", f"not accepted: {e}"
        return
    for (j, _), r in zip(plain + raw, results, strict=True):
        if r.state == "queued":
            j.state, j.handle, j.server, j.reason = "resent", r.handle, r.server, None
        else:
            j.state, j.reason = "not_resent", f"not accepted: {r.error or r.state}"


def recover(config: Config, server: str, older_than: float | None = None, resend_undecided: bool = False,
            dry_run: bool = False, even_if_answering: bool = False, now: float | None = None,
            timeout: float = 5.0) -> Recovery:
    """Send the background jobs this host's record holds for the dead ``server`` again.

    Only jobs recorded at least ``older_than`` seconds ago (all when None), and only those with
    no outcome stored; with ``dry_run`` nothing is sent (the jobs that would be are
    would_resend). Raises UsageError / NothingRecorded (plan); everything
    else is in the returned Recovery (``exit_status``).
    """
    recovery = plan(config, server, older_than, now, check_alive=not even_if_answering)
    recovery.dry_run = dry_run
    check_outcomes(config, recovery, timeout)
    if dry_run:
        for j in recovery.jobs:
            if j.state == "not_resent" and j.reason is None:
                j.state = "would_resend"
            elif resend_undecided and j.state == "undecided":
                j.state = "would_resend"
        return recovery
    resend(config, recovery, include_undecided=resend_undecided)
    return recovery


EXIT_STATUSES = {EXIT_OK: "every job resent or skipped as done", EXIT_FAILED: "some undecided or not resent",
                 EXIT_USAGE: "usage", EXIT_NOTHING: "nothing recorded for that server"}
