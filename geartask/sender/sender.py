"""JobSender: the sender's public API and its connections to the job servers."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from .. import gearman as p
from ..errors import UsageError
from ..logs import get_logger
from .background import RECORD_NAME, BackgroundRecord, StatusQuery, StatusResult, asks_for
from .batch import Batch
from .link import ServerLink
from .no_worker import ServedTasks
from .results import JobResult, Progress
from .routing import rendezvous
from .settings import BatchSettings

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["JobSender", "JobResult", "Progress", "StatusResult", "rendezvous", "MAX_PAYLOAD", "MAX_DATA"]

# gearmand 1.1.20 itself accepts payloads up to the wire format's 4 GiB (measured: 200 MB
# went through) and holds every one in memory; the sender refuses more than this per job so
# one runaway plugin can't exhaust the job server. Checked before anything is sent.
MAX_PAYLOAD = 64 * 1024 * 1024
MAX_DATA = MAX_PAYLOAD  # bytes of WORK_DATA kept per job; later chunks are counted, not kept
BACKGROUND_RECORD = RECORD_NAME


def _signing_key(config: Config) -> Any:
    """security.key loaded (None when unset): what every job this sender submits is signed with."""
    if not getattr(getattr(config, "security", None), "key", ""):
        return None
    from ..trust.keys import signing_key
    return signing_key(config)


class JobSender:
    """Submits jobs to the configured job servers and reports what became of each.

    ``JobSender(config).stream(jobs)`` yields each job's JobResult as it finishes, taking job
    definitions from any iterable in bounded windows, so memory is flat in the number of
    jobs; ``submit_many`` collects them in input order, ``submit`` sends one. Each job goes
    to one server, chosen by rendezvous hashing of its unique key (``routing.rendezvous``),
    and moves to another only when that server refuses connections or stays silent for
    ``sender.failover_after`` seconds; a broken connection is reopened and its jobs are
    resubmitted with the same unique key. docs/sender.md gives the rules and says when a job
    can run twice.

    Accepted background jobs are appended to ``log.dir/sender-background.jsonl`` (unless
    ``record_background`` is False); ``status`` asks the servers about them.

    A JobSender keeps only its server connections (``servers``) between calls, so it can be
    reused for any number of calls, one at a time; every call's state lives in its own
    batch.Batch. It is not thread-safe: one sender per thread. ``close()`` (or a ``with``
    block) closes the connections.
    """

    def __init__(self, config: Config, log: Any = None, record_background: bool = True):
        self.config = config
        self.settings = config.sender
        # Bound once: structlog's lazy proxy builds a new logger on every call otherwise.
        self.log = (log or get_logger("geartask.sender")).bind()
        fa = self.settings.failover_after
        # The kernel ends a connection whose peer is silent for about failover_after: unacked
        # data (TCP_USER_TIMEOUT) or unanswered keepalive probes.
        self.keepalive = p.keepalive_for(fa)
        max_packet = getattr(getattr(config, "gearman", None), "max_packet", None)
        if hasattr(config, "tls"):
            from ..trust.tls import install
            install(config)  # tls:// servers over TLS, even for a config that load_config did not read
        self.servers = [ServerLink(h, port, self.keepalive, max_packet=max_packet) for h, port in config.server_addresses]
        self.record = BackgroundRecord(Path(config.log.dir) / BACKGROUND_RECORD, config.log.max_bytes,
                                       config.log.backups)
        self.record_path = self.record.path
        self.batch_settings = BatchSettings(
            self.settings, self.log, logging.getLogger("geartask.sender").isEnabledFor(logging.DEBUG),
            MAX_PAYLOAD, MAX_DATA, self.record if record_background else None, _signing_key(config), ServedTasks())
        self._batch: Batch | None = None  # the call in progress

    # The limits and the background record can be changed between calls: a new BatchSettings.
    @property
    def max_payload(self) -> int:
        return self.batch_settings.max_payload

    @max_payload.setter
    def max_payload(self, value: int) -> None:
        self.batch_settings = replace(self.batch_settings, max_payload=value)

    @property
    def max_data(self) -> int:
        return self.batch_settings.max_data

    @max_data.setter
    def max_data(self, value: int) -> None:
        self.batch_settings = replace(self.batch_settings, max_data=value)

    @property
    def record_background(self) -> bool:
        return self.batch_settings.record is not None

    @record_background.setter
    def record_background(self, value: bool) -> None:
        self.batch_settings = replace(self.batch_settings, record=self.record if value else None)

    def close(self) -> None:
        for link in self.servers:
            link.close()

    def __enter__(self) -> "JobSender":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def submit(self, task: str, data: Any = None, unique: str | None = None, priority: str | None = None,
               background: bool | None = None, timeout: float | None = None, wait: bool = True,
               on_data: Callable[[JobResult, bytes], None] | None = None,
               host: Any = None, label: Any = None, all: bool = False) -> Any:
        """Send one job and return its JobResult; waits for the result unless it is a
        background job (or wait=False). The arguments are those of a job definition
        (docs/plugins.md); ``timeout`` in seconds; ``on_data`` as for stream().

        With ``host`` (a name or several), ``label`` (likewise) or ``all=True`` the job is
        fanned out instead (``fan_out``): a list of HostResult, one per host."""
        job = {"task": task, "data": data, "unique": unique, "priority": priority, "background": background}
        if host is not None or label is not None or all:
            extra: dict[str, Any] = {"on_data": on_data} if on_data is not None else {}
            return self.fan_out(job, host=host, label=label, all=all, timeout=timeout, wait=wait, **extra)
        return self.submit_many([{k: v for k, v in job.items() if v is not None or k == "data"}],
                                wait=wait, timeout=timeout, on_data=on_data)[0]

    def submit_many(self, jobs: Iterable[Any], wait: bool = True, timeout: float | None = None,
                    on_progress: Callable[[Progress], None] | None = None,
                    on_data: Callable[[JobResult, bytes], None] | None = None) -> list[JobResult]:
        """stream() collected into a list in input order (memory grows with the batch)."""
        results = list(self.stream(jobs, wait, timeout, on_progress, on_data))
        results.sort(key=lambda r: r.index)
        return results

    def stream(self, jobs: Iterable[Any], wait: bool = True, timeout: float | None = None,
               on_progress: Callable[[Progress], None] | None = None,
               on_data: Callable[[JobResult, bytes], None] | None = None) -> Iterator[JobResult]:
        """Submit every job; yield each one's JobResult as it finishes (completion order).

        ``jobs``: JobDefinitions or mappings (task, data, unique, priority, background, retries),
        from any iterable; at most 10,000 (batch.OPEN_JOBS) are held at a time.
        ``wait``: wait for foreground jobs' results (background jobs never wait). With
        wait=False every job goes as a background job and is done once accepted, because
        gearmand discards a queued foreground job when its client disconnects.
        ``timeout``: seconds for the whole batch; jobs unfinished then end as 'timeout' (jobs
        not yet taken from ``jobs`` too, without being sent).
        ``on_progress``: called with a Progress at most every 0.1 s, and once at the end.
        ``on_data``: called with (JobResult, payload bytes) for each WORK_DATA packet as it
        arrives, which is then not kept in the JobResult's ``data``: a followed shell job's
        live output (``"follow": true`` in its data; sender.follow.FollowPrinter prints it).

        A bad definition among the first 10,000 raises JobDefinitionError before anything
        is sent; a later one (or an error from the iterable) stops taking jobs, lets those
        sent finish and report, then is raised. NoServerError: no server could be reached
        within sender.connect_timeout and nothing was accepted. NoWorkerError: every job was a
        foreground job of a task no worker served for sender.no_worker_timeout (in a batch
        with others they fail one by one; any job of such a task has ``no_worker`` set, and a
        warning is logged at once: docs/sender.md, "A task no worker serves"). UsageError:
        another call of this sender is still running.
        """
        if self._batch is not None:
            raise UsageError("this JobSender is already running a batch (one at a time)")
        self._batch = batch = Batch(self.batch_settings, self.servers, jobs, wait, timeout, on_data=on_data)
        try:
            yield from batch.run(on_progress)
        finally:
            self._batch = None

    def submit_raw(self, jobs: Iterable[Any], timeout: float | None = None) -> list[JobResult]:
        """Background jobs whose data (bytes) is the exact payload gearmand gets: no envelope and
        no signature added (a requeue that travels with its original signature,
        geartask.sender.requeue), routed, failed over and recorded like any other. One
        JobResult per job, in input order."""
        if self._batch is not None:
            raise UsageError("this JobSender is already running a batch (one at a time)")
        jobs = ({**job, "background": True} for job in jobs)
        self._batch = batch = Batch(self.batch_settings, self.servers, jobs, False, timeout, raw=True)
        try:
            results = list(batch.run(None))
        finally:
            self._batch = None
        results.sort(key=lambda r: r.index)
        return results

    def fan_out(self, job: Any, host: Any = None, label: Any = None, all: bool = False, batch: Any = None,
                max_fail: int | None = None, timeout: float | None = None, wait: bool = True,
                **stream_kwargs: Any) -> list[Any]:
        """Run ``job`` (a definition or mapping) once on each host chosen by ``host``/``label``/``all``,
        ``batch`` hosts (N or 'N%') at a time, stopping new batches once ``max_fail`` failed:
        one ``fanout.HostResult`` per host, in the order they finished (not started ones last).
        NoSuchHostError when a named host or label serves nothing. See geartask.sender.fanout."""
        from . import fanout
        plan = fanout.plan(self.config, job, fanout.Target.of(host, label, all), self.settings.submit_timeout)
        return list(fanout.fan_out(self, plan.job, plan.hosts, batch=batch, max_fail=max_fail, timeout=timeout,
                                   wait=wait, **stream_kwargs))

    def status(self, handles: Iterable[Any] | None = None, timeout: float | None = None) -> list[StatusResult]:
        """GET_STATUS for background jobs; list(iter_status(...))."""
        return list(self.iter_status(handles, timeout))

    def iter_status(self, handles: Iterable[Any] | None = None,
                    timeout: float | None = None) -> Iterator[StatusResult]:
        """One StatusResult per handle (or per record line), in order.

        ``handles``: handle strings (``HANDLE`` or ``HANDLE@HOST:PORT``), (handle, server) pairs
        or record dicts; None means every line of the background record. A handle with no
        server given or recorded is asked of every configured server. A bad handle, record
        line or server reply is reported as state 'unknown' with the reason; the rest are asked.
        ``timeout``: seconds per server answer (default sender.submit_timeout).
        """
        asks = self.record.entries() if handles is None else asks_for(handles, self.record)
        query = StatusQuery([s.address for s in self.servers], timeout or self.settings.submit_timeout)
        try:
            yield from query.run(asks)
        finally:
            query.close()

    def background_records(self) -> list[dict]:
        """Every well-formed background job record in log.dir (rotated files included)."""
        return list(self.record.records())
