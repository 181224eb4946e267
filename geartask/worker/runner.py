"""Running one job to its answer: attempts under the retry policy, the result or the failure."""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import GeartaskError, ServerError
from ..jobs import encode_payload
from ..logs import JOB_LOGGER, get_logger, job_context
from ..outcomes.record import cap_traceback, make_record

from .dead_letters import DeadLetters, cap_text, payload_fields
from .errors import AttemptFailed, JobRejected, failure_traceback
from .job import STOPPED_BY_OPERATOR, Abandoned, Job, failure_packets, success_packets
from .outcomes import outcome_packets
from .retry import RetryPolicy
from .running import RunningJob
from .trust import SIG_MAGIC, Signed, WorkerTrust

if TYPE_CHECKING:
    from ..config import Config

log = get_logger("geartask.worker")

UNANSWERED_LIMIT = 2  # a job handed to this process this often without an answer is failed unrun
REMEMBERED_JOBS = 10_000  # jobs remembered as unanswered (or failed by the watchdog)


class UnansweredJobs:
    """Jobs (server, handle, unique) handed to this process whose answer never got out, and
    how often. A job at ``limit`` is failed unrun when gearmand hands it out again: its
    connection keeps breaking (a poison job), or the watchdog already failed it. Bounded."""

    def __init__(self, limit: int = UNANSWERED_LIMIT, remembered: int = REMEMBERED_JOBS):
        self.limit, self.remembered = limit, remembered
        self.seen: collections.OrderedDict[tuple, int] = collections.OrderedDict()
        self._lock = threading.Lock()

    def refuses(self, key: tuple) -> bool:
        """``key`` came back ``limit`` times unanswered (or the watchdog failed it): fail it unrun."""
        seen = self.seen
        return bool(seen) and seen.get(key, 0) >= self.limit

    def count(self, key: tuple, at_least: int = 0) -> None:
        with self._lock:
            seen = self.seen
            seen[key] = max(seen.pop(key, 0) + 1, at_least)
            while len(seen) > self.remembered:
                seen.popitem(last=False)


class JobRunner:
    """Runs a job's attempts and returns the packets that answer it.

    A task that raises is retried per the RetryPolicy (a JobRejected never is); after the
    last attempt the job fails with the reason, which is also written as a dead letter. A
    success after retries carries its attempts (success_packets). A job whose thread was
    cancelled ends as ``Abandoned`` (shutdown past grace: gearmand gives it to another
    worker), or, when an operator stopped it, fails with "stopped by operator", not retried.
    Each ending is counted in the thread's TaskCounters, and logged as one "job" line per
    attempt.
    """

    def __init__(self, config: Config, tasks: dict[str, Callable], label: str, unanswered: UnansweredJobs,
                 sinks: Any = None):
        self.tasks = tasks
        self.label = label  # the worker's label in reasons and dead letters (updated by the process)
        self.retry = RetryPolicy(config.worker)
        self.unanswered = unanswered
        self.dead_letters = DeadLetters(Path(config.log.dir) / "dead-letter.jsonl",
                                        max_bytes=config.log.max_bytes, backups=config.log.backups)
        self.report = config.outcomes.report  # outcomes to the job's server (else dead letters only)
        # Plugins' geartask_job_done/geartask_job_failed, None when no plugin has them
        self.on_done = sinks.sink("geartask_job_done") if sinks is not None else None
        self.on_failed = sinks.sink("geartask_job_failed") if sinks is not None else None
        self.max_result = config.outcomes.max_result
        self.job_log = get_logger(JOB_LOGGER)  # the per-job line: on the console only with -v
        self.trust = WorkerTrust(config)  # security.*: which jobs may run (geartask.worker.trust)
        self.checks = self.trust.checks  # False with security off: the hot path's one check

    def run(self, running: RunningJob, job: Job) -> bytes:
        """Run ``job``, the one ``running`` holds (its cancel, stop request, abandonment and
        the thread's counters); the answer's packets. Raises Abandoned, or ServerError when
        the job's own connection is gone (gearmand requeues the job)."""
        fn = self.tasks.get(job.task)
        job_log = self.job_log
        counters = running.counters
        with job_context(task=job.task, handle=job.handle, unique=job.unique):
            if fn is None:  # only a misbehaving server assigns a task we did not CAN_DO
                return self.fail(job, {"error": f"no such task {cap_text(job.task, 200)!r} on this worker"},
                                 0, 0.0)
            try:
                if self.checks or job.raw.startswith(SIG_MAGIC):  # security off: a signed job only
                    refusal = self._admit(job, counters)
                    if refusal is not None:
                        return refusal
                job.open_envelope()
                job.retries = retries = self.retry.retries_for(job)
            except JobRejected as e:
                job_log.info("job", attempt=1, outcome="rejected", seconds=0.0, reason=e.reason)
                counters.finished(job.task, 0.0, False)
                return self.fail(job, {"error": e.reason, **e.details}, 1, 0.0, defer=True)
            cancel = job.cancel
            t0 = time.monotonic()
            attempt = 0
            while True:
                attempt += 1
                job.attempt = attempt
                a0 = time.monotonic()
                running.attempt(a0)
                try:
                    result = fn(job)
                except BaseException as e:  # SystemExit and KeyboardInterrupt too: a task's, not ours
                    if isinstance(e, ServerError) and not job.connection.connected:
                        raise  # our connection is gone: gearmand requeues the job
                    if running.interrupted:
                        return self._interrupted(running, job, attempt, t0)
                    now = time.monotonic()
                    if isinstance(e, JobRejected):
                        job_log.info("job", attempt=attempt, outcome="rejected", seconds=round(now - a0, 6),
                                     reason=e.reason)
                        counters.finished(job.task, now - t0, False)
                        return self.fail(job, {"error": e.reason, **e.details}, attempt, now - t0, defer=True)
                    if isinstance(e, AttemptFailed):
                        reason = {"error": e.reason, **e.details}
                    else:
                        reason = {"error": f"{type(e).__name__}: {e}", "type": type(e).__name__}
                    last = attempt > retries
                    job_log.info("job", attempt=attempt, outcome="failed" if last else "retrying",
                                 seconds=round(now - a0, 6), reason=cap_text(reason["error"], 500))
                    if last:
                        counters.finished(job.task, now - t0, False)
                        return self.fail(job, reason, attempt, now - t0, defer=True, traceback=failure_traceback(e))
                    counters.retried(job.task)
                    if cancel.wait(self.retry.backoff(attempt)) or running.abandoned:
                        return self._interrupted(running, job, attempt, t0)
                    continue
                if running.interrupted:
                    return self._interrupted(running, job, attempt, t0)
                try:
                    payload = encode_payload(result, job.task)
                except GeartaskError as e:
                    counters.finished(job.task, time.monotonic() - t0, False)
                    return self.fail(job, {"error": f"task result {e}"}, attempt, time.monotonic() - t0,
                                     defer=True)
                except Exception as e:  # nested too deep for JSON, or a broken container type
                    counters.finished(job.task, time.monotonic() - t0, False)
                    return self.fail(job, {"error": f"task result cannot be serialised as JSON: "
                                                    f"{type(e).__name__}: {e}"}, attempt, time.monotonic() - t0,
                                     defer=True)
                now = time.monotonic()
                job_log.info("job", attempt=attempt, outcome="complete", seconds=round(now - a0, 6),
                             server=job.server)
                counters.finished(job.task, now - t0, True)
                if self.on_done is not None:
                    self.on_done(job=job, result=result)
                options = job.options
                if self.report and (options is None or options.get("bg")):  # a client waits for the rest
                    job.outcome = self.record(job, "complete", attempt, result=payload)
                return success_packets(job.handle, payload, attempt)

    def _admit(self, job: Job, counters) -> bytes | None:
        """Strip the job's signature line and apply the policy (geartask.trust.policy.decide):
        None when the job may run, else the answer that fails it once, unrun, with the reason
        (recorded as its outcome, never retried)."""
        raw = job.raw
        decision = self.trust.decide(job.function, job.unique, raw)
        payload = job.raw = decision.payload
        if decision.line is not None or not decision.allowed:
            job.signed = Signed(decision, raw[:len(raw) - len(payload)] if decision.line is not None else b"",
                                payload)
        if decision.allowed:
            return None
        log.warning("job refused: not run", reason=decision.reason)
        self.job_log.info("job", attempt=0, outcome="refused", seconds=0.0, reason=decision.reason)
        try:
            job.open_envelope()  # its options (background?) for the outcome; never to run it
        except JobRejected:
            pass
        counters.finished(job.task, 0.0, False)
        return self.fail(job, {"error": decision.reason, "refused": True}, 0, 0.0, defer=True)

    def _interrupted(self, running: RunningJob, job: Job, attempt: int, t0: float) -> bytes:
        """The job's cancel was set: an operator's stop fails it; anything else abandons it."""
        if running.stopped_by_operator:
            seconds = time.monotonic() - t0
            self.job_log.info("job", attempt=attempt, outcome="stopped", seconds=round(seconds, 6),
                              reason=STOPPED_BY_OPERATOR)
            running.counters.finished(job.task, seconds, False)
            return self.fail(job, {"error": STOPPED_BY_OPERATOR, "stopped": True}, attempt, seconds, defer=True)
        raise Abandoned(job.handle)

    def fail(self, job: Job, reason: dict, attempts: int, seconds: float, defer: bool = False,
             traceback: str | None = None) -> bytes:
        """A final failure: the packets that tell the client, after the job's outcome (set on
        ``job.outcome`` instead when ``defer``: the grab thread sends it). Without outcome
        reporting the failure is written as a dead letter instead. ``traceback``: a task's that
        raised, logged once here and kept in the outcome (capped)."""
        reason = {**reason, "error": cap_text(str(reason.get("error"))), "task": job.task,
                  "attempts": attempts, "worker": self.label}
        capped = None
        if traceback is not None:
            capped = cap_traceback(traceback)[0]
            log.warning("job failed: the task raised", attempts=attempts, error=cap_text(reason["error"], 500),
                        exception=capped)  # "exception": the console keeps its lines
        packets = failure_packets(job.handle, reason)
        if self.on_failed is not None:
            self.on_failed(job=job, reason=reason)
        if not self.report:
            self._dead_letter({"time": time.time(), "task": job.task, "unique": job.unique, "handle": job.handle,
                               **payload_fields(job.raw, job.decoded),
                               "reason": reason["error"], "attempts": attempts, "worker": self.label,
                               "seconds": round(seconds, 6),
                               **({"traceback": capped} if capped is not None else {})})
            return packets
        job.outcome = self.record(job, "failed", attempts, reason=reason, traceback=traceback)
        if defer:
            return packets
        return outcome_packets([job.outcome], collections.deque(), self._sign) + packets

    def record(self, job: Job, state: str, attempts: int, result: bytes | None = None,
               reason: dict | None = None, traceback: str | None = None) -> dict:
        """The job's outcome record (geartask.outcomes.record)."""
        opts = job.options or {}
        now = time.time()
        signed = job.signed
        extra = signed.fields(job.raw, state == "failed") if signed is not None else {}
        requeue_of = opts.get("requeue_of")
        if signed is not None and signed.decision.requeue_of is not None:
            requeue_of = signed.decision.requeue_of  # the signed requeue note says which outcome
        return make_record(server=job.server, handle=job.handle, task=job.task, state=state,
                           unique=job.unique or None, finished_at=now,
                           started_at=now - (time.monotonic() - job.started) if job.started else None,
                           submitted_at=opts.get("at"), attempts=attempts, retries=job.retries,
                           background=opts.get("bg"), worker=self.label, sender_host=opts.get("host"),
                           priority=opts.get("prio"), result=result, reason=reason,
                           data=job.raw if state == "failed" else None, requeue_of=requeue_of,
                           max_result=self.max_result, traceback=traceback,
                           function=job.function if job.function != job.task else None, **extra)

    def fail_unrun(self, key: tuple, task: str, reason: dict) -> bytes:
        """Fail a job that was not run (a worker error, or a job refused unrun), with its outcome."""
        server, handle, unique = key
        reason = {**reason, "error": cap_text(str(reason.get("error"))), "task": task, "worker": self.label}
        packets = failure_packets(handle, reason)
        if not self.report:
            self._dead_letter({"time": time.time(), "task": task, "unique": unique, "handle": handle,
                               "reason": reason["error"], "attempts": 0, "worker": self.label})
            return packets
        record = make_record(server=server, handle=handle, task=task, state="failed", unique=unique or None,
                             attempts=0, worker=self.label, reason=reason, max_result=self.max_result)
        return outcome_packets([record], collections.deque(), self._sign) + packets

    @property
    def _sign(self):
        return self.trust.sign_report if self.trust.key is not None else None

    def keep_locally(self, records: list[dict], server: str) -> None:
        """Outcomes gearmand refused: kept in the dead-letter file (``failed import`` reads it)."""
        log.error("job server refused outcomes; kept in the dead-letter file", server=server, count=len(records),
                  path=str(self.dead_letters.path))
        for rec in records:
            self._dead_letter(rec)

    def _dead_letter(self, record: dict) -> None:
        try:
            self.dead_letters.append(record)
        except OSError as e:
            log.error("cannot write dead letter", error=str(e), path=str(self.dead_letters.path))

    def refuse(self, key: tuple, task: str) -> bytes:
        """Fail a job that came back after it went unanswered here ``unanswered.limit`` times
        (or after the watchdog failed it), without running it again."""
        server, handle, unique = key
        with job_context(task=task, handle=handle, unique=unique):
            log.warning("job handed out again after it went unanswered here; failing it unrun",
                        times=self.unanswered.seen.get(key))
        return self.fail_unrun(key, task, {"error": "this job was handed to this worker again after it "
                                                    "timed out or went unanswered here: failed without "
                                                    "running it again"})
