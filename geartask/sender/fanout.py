"""Fleet commands: one job per chosen host, in rolling batches, with a result per host.

A job aimed at hosts (``--host``, ``--label``, ``--all``, or a plugin job's ``host``/
``label``/``all``) becomes one job per host, sent to ``TASK@host:HOST`` with the unique key
``UNIQUE@HOST``: gearmand routes it to that host's workers only (geartask.targets). The hosts
come from the servers' ``workers`` lists at send time (one admin query per server): a host
registers ``TASK@host:HOST`` and ``TASK@label:LABEL`` for every task it serves. A named host
or label that serves nothing is ``NoSuchHostError`` before anything is sent.

Hosts run ``batch`` at a time (a number or a percentage of the hosts), each batch to its end
before the next starts, as Ansible's ``serial`` does; once ``max_fail`` hosts failed no new
batch starts and the rest are ``not started``. docs/sender.md, "Fleet commands".
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

from ..errors import JobDefinitionError, NoServerError, NoSuchHostError, UsageError
from ..jobs import JobDefinition, new_unique
from ..targets import TargetError, check_host, check_label, host_function, label_function
from .batch import MAX_UNIQUE

if TYPE_CHECKING:
    from ..config import Config
    from .results import JobResult

__all__ = ["Target", "HostResult", "target_of", "fleet_hosts", "resolve", "parse_batch", "batch_size", "waves",
           "fan_out", "COMPLETE", "FAILED", "NO_ANSWER", "NOT_STARTED", "QUEUED"]

COMPLETE, FAILED, NO_ANSWER, NOT_STARTED, QUEUED = "complete", "failed", "no answer", "not started", "queued"
MAX_HOSTS = 10_000  # hosts one fan-out may address; a workers list is a peer's text


@dataclass(frozen=True)
class Target:
    """Where a job goes: named hosts, every host with one of the labels, or every host."""

    hosts: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    all: bool = False

    def __bool__(self) -> bool:
        return bool(self.hosts or self.labels or self.all)

    @classmethod
    def of(cls, host: str | Iterable[str] | None = None, label: str | Iterable[str] | None = None,
           all: bool = False, where: str = "") -> "Target":
        """Checked names (UsageError naming the bad one); a single name or several."""
        hosts = _names(host, check_host, where + "host")
        labels = _names(label, check_label, where + "label")
        if not isinstance(all, bool):
            raise UsageError(f"{where}all must be true or false, got {all!r}")
        return cls(hosts, labels, all)


def _names(value: Any, check: Callable[[str, str], str], what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise UsageError(f"{what} must be a name or a list of names, got {value!r}"[:200])
    try:
        return tuple(dict.fromkeys(check(v, what) for v in items))
    except TargetError as e:
        raise UsageError(str(e)) from None


def target_of(job: JobDefinition, source: str = "job definition") -> Target:
    """A plugin job's own ``host``/``label``/``all`` (carried in its ``extra``)."""
    extra = job.extra or {}
    try:
        return Target.of(extra.get("host"), extra.get("label"), extra.get("all", False) or False)
    except UsageError as e:
        raise JobDefinitionError(f"{source}: {e}", job.task) from None


@dataclass
class HostResult:
    """What became of the job on one host.

    ``state``: complete | failed | no answer (nothing within the timeout: the host is slow,
    cut off or gone) | not started (``max_fail`` reached first) | queued (a background job
    accepted). ``rc`` is a shell command's exit status, ``line`` the first line of its output
    or of the error, ``job`` the sender's JobResult (None when not started).
    """

    host: str
    state: str
    task: str
    unique: str
    rc: int | None = None
    seconds: float = 0.0
    line: str = ""
    job: JobResult | None = None

    @property
    def ok(self) -> bool:
        return self.state in (COMPLETE, QUEUED)

    def to_json(self) -> dict:
        out: dict[str, Any] = {"host": self.host, "state": self.state, "task": self.task, "unique": self.unique,
                               "rc": self.rc, "seconds": round(self.seconds, 3), "line": self.line}
        if self.job is not None:
            out["handle"], out["server"] = self.job.handle, self.job.server
            if self.state == COMPLETE:
                out["result"] = self.job.result
            elif self.state != QUEUED:
                out["error"] = self.job.error
        return out


def fleet_hosts(config: Config, timeout: float | None = None) -> list[Any]:
    """Every worker connection of the config's fleet on every server: one ``workers`` query
    per server, in parallel. NoServerError when no server answers."""
    from ..fleet import Admin
    admin = Admin.from_config(config, timeout or config.sender.submit_timeout)
    results = admin.workers(ping=False)
    if not any(r.ok for r in results):
        raise NoServerError([r.server for r in results], {r.server: str(r.error) for r in results})
    return [w for r in results if r.ok for w in r.value]


def serving(connections: Iterable[Any], task: str) -> dict[str, set[str]]:
    """host -> the labels under which it serves ``task``, for hosts that register ``TASK@host:HOST``."""
    out: dict[str, set[str]] = {}
    for w in connections:
        host = getattr(w, "host", None)
        if not host or host_function(task, host) not in w.functions:
            continue
        labels = out.setdefault(host, set())
        labels.update(x for x in w.labels if label_function(task, x) in w.functions)
        if len(out) > MAX_HOSTS:
            break
    return out


def resolve(target: Target, task: str, hosts: Mapping[str, set[str]]) -> list[str]:
    """The hosts ``target`` means for ``task`` among ``hosts`` (``serving``): named ones in the
    order given, then the rest sorted. NoSuchHostError for a named host or label that serves nothing."""
    chosen = []
    for h in target.hosts:
        if h not in hosts:
            raise NoSuchHostError(f"no such host: {h} (no worker there serves {task!r})", task)
        chosen.append(h)
    for label in target.labels:
        found = sorted(h for h, labels in hosts.items() if label in labels)
        if not found:
            raise NoSuchHostError(f"no such host: no worker labelled {label!r} serves {task!r}", task)
        chosen.extend(found)
    if target.all:
        if not hosts:
            raise NoSuchHostError(f"no such host: no worker announces a host for {task!r}", task)
        chosen.extend(sorted(hosts))
    return list(dict.fromkeys(chosen))


def parse_batch(text: str | int | None) -> tuple[int, bool] | None:
    """'3' -> (3, False); '25%' -> (25, True); None -> None (every host at once). UsageError otherwise."""
    if text is None:
        return None
    raw = str(text).strip()
    percent = raw.endswith("%")
    digits = raw[:-1] if percent else raw
    if not (digits.isascii() and digits.isdigit()) or int(digits) <= 0 or (percent and int(digits) > 100):
        raise UsageError(f"--batch must be a whole number >= 1 or a percentage 1%-100%, got {raw!r}")
    return int(digits), percent


def batch_size(spec: tuple[int, bool] | None, hosts: int) -> int:
    """Hosts per batch: N, or N% of ``hosts`` rounded up (at least 1); every host without a spec."""
    if spec is None or hosts == 0:
        return max(hosts, 1)
    n, percent = spec
    size = math.ceil(hosts * n / 100) if percent else n
    return max(1, min(size, hosts))


def waves(hosts: list[str], size: int) -> list[list[str]]:
    return [hosts[i:i + size] for i in range(0, len(hosts), size)]


def _first_line(value: Any) -> str:
    text = value if isinstance(value, str) else "" if value is None else str(value)
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _rc(value: Any) -> int | None:
    rc = value.get("returncode") if isinstance(value, dict) else None
    return rc if isinstance(rc, int) and not isinstance(rc, bool) else None


def host_result(host: str, r: JobResult, timeout: float | None) -> HostResult:
    """A JobResult as the host's line: a timeout is ``no answer``, distinct from ``failed``."""
    out = HostResult(host, r.state, r.task, r.unique, seconds=r.seconds, job=r)
    if r.state == COMPLETE:
        out.rc = _rc(r.result)
        res = r.result
        out.line = _first_line(res.get("output") if isinstance(res, dict) and "output" in res else res)
    elif r.state == "timeout":
        out.state = NO_ANSWER
        out.line = f"no answer within {timeout:g}s" if timeout else "no answer"
    elif r.state == QUEUED:
        out.line = f"queued as {r.handle}@{r.server}"
    else:
        out.state = FAILED
        out.rc = _rc(r.error)
        err = r.error
        out.line = _first_line(err.get("error") if isinstance(err, dict) and err.get("error") else err)
    return out


def host_unique(base: str, host: str) -> str:
    """``BASE@HOST``; when that is over gearmand's 64 bytes, the host part is cut and ends in
    ``~`` and a hash of the whole name, so keys stay distinct per host."""
    key = f"{base}@{host}"
    if len(key.encode("utf-8")) <= MAX_UNIQUE:
        return key
    tag = hashlib.blake2b(host.encode(), digest_size=6).hexdigest()
    room = MAX_UNIQUE - len(base.encode("utf-8")) - 2 - len(tag)
    if room < 1:
        raise JobDefinitionError(f"unique key {base[:80]!r} leaves no room for '@HOST' within gearmand's "
                                 f"{MAX_UNIQUE} bytes; use a shorter one")
    return f"{base}@{host[:room]}~{tag}"


def _host_job(job: JobDefinition, host: str, unique: str, overrides: Mapping[str, Any]) -> dict:
    d = {"task": host_function(job.task, host), "data": job.data, "unique": host_unique(unique, host),
         "priority": job.priority, "background": job.background, "retries": job.retries, "at": job.at}
    d.update(overrides)
    return {k: v for k, v in d.items() if v is not None or k == "data"}


def fan_out(sender: Any, job: JobDefinition | Mapping, hosts: list[str], *, batch: str | int | None = None,
            max_fail: int | None = None, timeout: float | None = None, wait: bool = True,
            overrides: Mapping[str, Any] | None = None, **stream_kwargs: Any) -> Iterator[HostResult]:
    """Run ``job`` on each of ``hosts`` through ``sender`` (a JobSender); yield a HostResult
    per host as each finishes, batch after batch, then one per host not started.

    ``timeout``: seconds per batch; a host with no result by then is ``no answer``.
    ``stream_kwargs`` go to ``JobSender.stream`` for every batch (e.g. a live-output callback).
    """
    job = JobDefinition.from_any(job)
    if max_fail is not None and max_fail < 1:
        raise UsageError(f"--max-fail must be a whole number >= 1, got {max_fail}")
    unique = job.unique or new_unique()[:20]  # 80 random bits: room for '@HOST' within 64 bytes
    size = batch_size(parse_batch(batch), len(hosts))
    failed = 0
    plan = waves(hosts, size)
    for n, wave in enumerate(plan):
        by_unique = {host_unique(unique, h): h for h in wave}
        seen: set[str] = set()
        error = ""
        try:
            for r in sender.stream([_host_job(job, h, unique, overrides or {}) for h in wave], wait=wait,
                                   timeout=timeout, **stream_kwargs):
                host = by_unique.get(r.unique)
                if host is None or host in seen:
                    continue
                seen.add(host)
                hr = host_result(host, r, timeout)
                failed += not hr.ok
                yield hr
        except NoServerError as e:
            error = str(e)
        for h in wave:  # a host never goes missing from the report
            if h not in seen:
                failed += 1
                yield HostResult(h, FAILED, host_function(job.task, h), host_unique(unique, h),
                                 line=_first_line(error) or "no result")
        if max_fail is not None and failed >= max_fail:
            for rest in plan[n + 1:]:
                for h in rest:
                    yield HostResult(h, NOT_STARTED, host_function(job.task, h), host_unique(unique, h),
                                     line=f"--max-fail {max_fail} reached ({failed} failed)")
            return


@dataclass
class FanOutPlan:
    """A targeted job resolved against the fleet: the job and the hosts it will run on."""

    job: JobDefinition
    hosts: list[str] = field(default_factory=list)


def plan(config: Config, job: JobDefinition | Mapping, target: Target, timeout: float | None = None,
         connections: list[Any] | None = None) -> FanOutPlan:
    """Find ``target``'s hosts for ``job`` (asking the servers unless ``connections`` are given)."""
    job = JobDefinition.from_any(job)
    target = target or target_of(job)
    if not target:
        raise UsageError("a fan-out needs a host, a label or all")
    if connections is None:
        connections = fleet_hosts(config, timeout)
    return FanOutPlan(job, resolve(target, job.task, serving(connections, job.task)))
