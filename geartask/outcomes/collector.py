"""The outcome collector: the one worker of ``geartask.outcomes`` and ``geartask.outcomes.query``.

It attaches to every configured server with two connections (outcomes, queries), each in
its own thread. Outcome jobs are grabbed in pipelined batches; a batch's records are stored
in one transaction, synced, and only then is each job answered WORK_COMPLETE, so an outcome
leaves gearmand only once it is on disk (the store is idempotent by record id: a job handed
out again after a crash stores nothing twice). A malformed job is logged and answered
WORK_FAIL, which drops it. Queries are answered at once. docs/outcomes.md for users.
"""

from __future__ import annotations

import json
import os
import select
import socket
import sqlite3
import threading
import time
from typing import Any, Callable

from .. import gearman as gp
from ..fleet import DEFAULT_TIMEOUT, Admin, WorkerConnection, server_workers
from ..address import format_address, split_address
from ..errors import ServerError
from ..gearman.grab import LinkMachine
from ..gearman.timing import RoundTrip
from ..logs import get_logger
from ..trust import policy, signing
from ..trust.keys import signing_key
from ..trust.signing import SIG_MAGIC
from .answers import CHANGING_OPS, open_report, sign_answer
from .errors import CollectorConflict, StoreError
from .query import Queries, parse_request
from .record import OUTCOME_FUNCTION, QUERY_FUNCTION, BadOutcome, cap_record, check
from .rivals import PROOF_TIMEOUT, answering_collectors
from .store import OutcomeStore

log = get_logger("geartask.collector")

CLIENT_PREFIX = "geartask-collector"
STORE_RETRY = 5.0  # seconds before jobs are taken again after the store failed to write
ANSWER_TIMEOUT = 10.0  # seconds gearmand may take to answer our grabs before the connection is dropped
PIPELINE = 50  # grabs in flight per round trip, at most ...
PIPELINE_BYTES = 64 * 1024 * 1024  # ... and as many as jobs of the last round's biggest size fit in this
QUERY_PIPELINE = 8  # queries are few, and each may be big (an import)
MIN_JOB_LIMIT = 16 * 1024 * 1024  # an outcome job or query bigger than max(this, 8 x max_result) is refused unread
PRUNE_INTERVAL = 600.0  # seconds between prunes of records past outcomes.keep_days
RIVAL_FIRST, RIVAL_INTERVAL = 1.0, 60.0  # seconds to the first look for another collector, and between looks
MALFORMED_SHOWN = 3  # bad records of one job named in the log


def collector_client_id(host: str | None = None, pid: int | None = None) -> str:
    """``geartask-collector:<host>:<pid>``: how a collector's connections show in ``workers``."""
    host = host or socket.gethostname().split(".")[0] or "localhost"
    return f"{CLIENT_PREFIX}:{host}:{os.getpid() if pid is None else pid}"


def is_collector_id(client_id: str) -> bool:
    return client_id.startswith(CLIENT_PREFIX + ":")


class _StoreFailed(Exception):
    """The store could not write a batch: its jobs stay unanswered (gearmand keeps them)."""


def _complete(handle: bytes, data: bytes = b"") -> bytes:
    return gp.pack(gp.WORK_COMPLETE, job_handle=handle, data=data)


def _refuse(handle: bytes, error: str) -> bytes:
    """WORK_WARNING with the reason (for a client that waits on it), then WORK_FAIL: gearmand
    drops the job (and its sqlite row)."""
    reason = json.dumps({"error": error}, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return gp.fail_packets(handle, reason)


def parse_outcomes(raw: bytes) -> list:
    """The records of one outcome job's payload (a JSON object or a list of them), unchecked;
    BadOutcome names what is wrong with the payload as a whole."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise BadOutcome(f"payload is not UTF-8 ({len(raw)} bytes)") from None
    except RecursionError:
        raise BadOutcome(f"payload is JSON nested too deeply ({len(raw)} bytes)") from None
    except ValueError as e:
        raise BadOutcome(f"payload is not JSON: {e}") from None
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list):
        return value
    raise BadOutcome(f"payload must be a JSON object or a list of them, got {type(value).__name__}")


_CHANGING = tuple(f'"{op}"'.encode() for op in CHANGING_OPS)  # a cheap look before parsing


def _op_of(raw: bytes) -> Any:
    """A query's op (None when it can't be read: Queries.answer says what is wrong)."""
    try:
        req = parse_request(raw)
    except Exception:
        return None
    return req.get("op") if isinstance(req, dict) else None


class _Attachment(threading.Thread):
    """One connection to one server as the worker of one function, kept up for as long as the
    collector runs: grab in pipelined rounds, let ``handle`` answer a round, sleep when empty.
    Where the connection is in the grab cycle, its deadlines and its reconnect backoff are the
    LinkMachine's (geartask.gearman.grab), as for the worker's threads."""

    def __init__(self, collector: "Collector", host: str, port: int, function: str, max_job: int,
                 handle: Callable[[list[gp.Packet], str], bytes], pipeline: int):
        super().__init__(name=f"collector-{'query' if function == QUERY_FUNCTION else 'outcomes'}-{host}:{port}",
                         daemon=True)
        self.collector, self.host, self.port, self.function = collector, host, port, function
        self.address = format_address(host, port)
        self.max_job, self.handle, self.pipeline = max_job, handle, pipeline
        self.link = LinkMachine(RoundTrip(), collector.poll_timeout, floor=ANSWER_TIMEOUT)
        self.attached = False
        self.rounds = 0

    def run(self) -> None:
        c, link = self.collector, self.link
        down_since, refusal_said = None, False
        while not c.stopping:
            # max_packet: a job bigger than max_job is never buffered; it comes as a packet with
            # only its handle and ``oversize``, so it can still be answered and dropped
            conn = gp.Connection(self.host, self.port, connect_timeout=gp.CONNECT_TIMEOUT,
                                 keepalive=c.keepalive, max_packet=self.max_job)
            try:
                conn.connect()
                conn.send_raw(link.connected(time.monotonic(), c.client_id, [self.function]))
                conn.expect(gp.ECHO_RES, link.hello_timeout)
                link.hello_answered(time.monotonic())
                self.attached = True
                log.info("attached", server=self.address, function=self.function,
                         down_for=None if down_since is None else round(time.monotonic() - down_since, 1),
                         **({"failures": link.reconnects} if down_since is not None else {}))
                down_since, link.reconnects, refusal_said = None, 0, False
                self._serve(conn)
            except ServerError as e:
                link.tick(time.monotonic())  # a hello past its deadline is counted: the next waits longer
                refusal = isinstance(e, gp.TLSError)
                if refusal and not refusal_said:  # once per outage, at error level: it will not pass
                    refusal_said = True
                    down_since = down_since or time.monotonic()
                    log.error(gp.REFUSED_EVENT, server=self.address, function=self.function,
                              error=str(e).removeprefix(self.address + ": "))
                elif down_since is None:  # once per outage
                    down_since = time.monotonic()
                    log.warning("server unreachable; retrying" if not self.attached else "connection lost; reconnecting",
                                server=self.address, function=self.function, error=str(e))
            except _StoreFailed as e:
                down_since = down_since or time.monotonic()
                log.error("outcome store failed; the batch stays in gearmand and is taken again",
                          server=self.address, error=str(e.__cause__ or e), retry_in=STORE_RETRY)
                link.backoff = STORE_RETRY
            except Exception as e:  # a bug: log it, and keep serving rather than leave outcomes unread
                down_since = down_since or time.monotonic()
                log.exception("collector thread error; reconnecting", server=self.address, error=repr(e))
                link.backoff = max(link.backoff, 1.0)
            finally:
                conn.close()  # gearmand hands out again any job we grabbed and did not answer
                self.attached = False
            now = time.monotonic()
            link.dropped(now)
            if c.stopping or c.wait(link.next_try - now):
                break

    def _serve(self, conn: gp.Connection) -> None:
        c, link, n = self.collector, self.link, self.pipeline
        while not c.stopping:
            conn.send_raw(link.grab(time.monotonic(), n))
            jobs, empty = [], False
            for _ in range(n):
                pkt = self._next(conn)
                if pkt.cmd == gp.NO_JOB:
                    link.no_job(time.monotonic())
                    empty = True
                else:
                    link.assigned(time.monotonic())
                    jobs.append(pkt)
            self.rounds += 1
            if jobs:
                conn.send_raw(self.handle(jobs, self.address))
                link.answered(time.monotonic())
                biggest = max(int(p.args["oversize"]) if "oversize" in p.args else len(p["data"]) for p in jobs)
                n = max(1, min(self.pipeline, PIPELINE_BYTES // (biggest + 1)))
                continue  # more may have come while we stored these: grab again before sleeping
            if empty:
                conn.send_raw(link.rest(time.monotonic(), sleep=True))
                self._sleep(conn)

    def _next(self, conn: gp.Connection) -> gp.Packet:
        """The answer to one grab (NOOPs from an earlier PRE_SLEEP are skipped)."""
        timeout = self.link.grab_timeout
        deadline = time.monotonic() + timeout
        while True:
            pkt = conn.recv(max(0.0, deadline - time.monotonic()))
            if pkt is None:
                raise ServerError(f"no answer to GRAB_JOB within {timeout:g}s", conn.address)
            if pkt.cmd in (gp.JOB_ASSIGN_UNIQ, gp.NO_JOB):
                return pkt
            if pkt.cmd == gp.ERROR:
                raise ServerError(gp.error_text(pkt), conn.address)

    def _sleep(self, conn: gp.Connection) -> None:
        """Until the server sends something (its NOOP), the collector stops, or poll_timeout
        passes: then we grab again anyway (a NOOP can be lost; see the worker's docstring)."""
        if conn.has_buffered_packet():
            return
        poller = select.poll()
        poller.register(conn.fileno(), select.POLLIN)
        poller.register(self.collector.wake_fd, select.POLLIN)
        poller.poll(int(self.link.deadline(time.monotonic(), self.collector.poll_timeout) * 1000))


class Collector:
    """Stores the outcomes every configured server receives and answers queries about them.

    ``start()`` checks that no other collector answers (CollectorConflict: exit 2) and
    starts the threads; ``stop(timeout)`` lets each thread finish its batch and closes the
    connections; ``serve_forever()`` does both around a wait, for ``outcomes serve``. The
    caller owns ``store`` (opens and closes it). ``error`` says why it stopped by itself.
    """

    def __init__(self, config: Any, store: OutcomeStore, *, client_id: str | None = None):
        self.config, self.store = config, store
        self.servers = list(config.server_addresses)
        self.max_result = config.outcomes.max_result
        self.keep_seconds = config.outcomes.keep_days * 86400
        self.max_job = max(MIN_JOB_LIMIT, 8 * self.max_result)
        self.poll_timeout = config.worker.poll_timeout
        self.keepalive = gp.keepalive_for(config.worker.keepalive)
        self.client_id = client_id or collector_client_id()
        self.prune_interval, self.rival_interval = PRUNE_INTERVAL, RIVAL_INTERVAL
        self.queries = Queries(store, self.max_result, info=self.info,
                               on_error=lambda what, e: log.error(what, error=str(e)))
        self.error: str | None = None
        self.started_at: float | None = None
        self.counts = {"stored": 0, "known": 0, "malformed_jobs": 0, "refused_records": 0, "queries": 0,
                       "store_failures": 0, "refused_reports": 0, "refused_queries": 0}
        # security.*: with require_signed only outcome jobs signed for "report" by a trusted
        # signer are stored; with security.key query answers are signed for "answer".
        sec = config.security
        self.require_signed = bool(sec.require_signed)
        self.max_age = float(sec.max_job_age)
        # An outcome job may wait in gearmand while no collector runs: its signature stays good
        # for as long as records are kept (a replay stores nothing new: records have ids).
        self.report_age = max(self.max_age, self.keep_seconds)
        self.trust = policy.trust_of(config) if sec.trust else policy.Trust()
        self.key = signing_key(config)
        self._count_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self._threads: list[threading.Thread] = []
        self._attachments: list[_Attachment] = []
        self._warned: set[tuple[str, str]] = set()
        self._unlisted: set[str] = set()  # servers whose workers could not be listed: said once per outage
        # A rival's ping answer must be signed for "answer" by a trusted signer once trust is set.
        self.proof_signed = bool(sec.trust) or self.require_signed
        self.yielded = False  # stopped for a rival that proved itself a collector (exit 3: restartable)

    # -- life cycle ------------------------------------------------------------------------
    @property
    def wake_fd(self) -> int:
        """Readable once the collector stops (its threads poll it with their sockets)."""
        return self._wake_r

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when the collector is stopping."""
        return self._stop.wait(seconds)

    def start(self) -> None:
        """Refuse (CollectorConflict) if another collector is registered and answers a ping;
        else start serving. A registration that does not answer within PROOF_TIMEOUT (a dead
        host's, kept by gearmand for minutes, or a client id claimed by anyone) is ignored."""
        if self._threads:
            raise RuntimeError("this collector was started already")
        rivals = [] if self.config.outcomes.store == "postgresql" else self.rivals()  # a shared store: any number
        proven = self._proven(rivals) if rivals else []
        for server, w in rivals:
            if (server, w) not in proven:
                log.warning("another worker of geartask.outcomes is registered but does not answer a ping as a "
                            "collector: ignored (a dead host's stale registration, or not a collector)",
                            server=server, other=w.client_id, ip=w.ip)
        if proven:
            named = "; ".join(f"{w.client_id} (from {w.ip}) on {server}" for server, w in proven)
            raise CollectorConflict(f"another outcomes collector is registered: {named}; "
                                    "run one collector for all servers (stop that one first)")
        self._launch()

    def _proven(self, rivals: list[tuple[str, WorkerConnection]],
                timeout: float = PROOF_TIMEOUT) -> list[tuple[str, WorkerConnection]]:
        """The rivals that answer a ping over the query function as the collector they claim to be."""
        by_server: dict[str, list[WorkerConnection]] = {}
        for server, w in rivals:
            by_server.setdefault(server, []).append(w)
        proven = []
        for server, ws in by_server.items():
            host, port = split_address(server)
            try:
                answered = answering_collectors(host, port, {w.client_id for w in ws}, trust=self.trust,
                                                signed=self.proof_signed, timeout=timeout)
            except ServerError as e:
                log.warning("cannot ping the other collector", server=server, error=str(e))
                continue
            proven += [(server, w) for w in ws if w.client_id in answered]
        return proven

    def _launch(self) -> None:
        """Start the threads (start() without the check: tests use it to make two collectors race)."""
        log.info("collector starting", client_id=self.client_id, servers=self.addresses,
                 keep_days=self.config.outcomes.keep_days, max_result=self.max_result)
        self.started_at = time.time()
        for host, port in self.servers:
            self._attachments.append(_Attachment(self, host, port, OUTCOME_FUNCTION, self.max_job,
                                                 self._store_round, PIPELINE))
            self._attachments.append(_Attachment(self, host, port, QUERY_FUNCTION, self.max_job,
                                                 self._query_round, QUERY_PIPELINE))
        self._threads = [*self._attachments, threading.Thread(target=self._housekeeping, daemon=True,
                                                              name="collector-housekeeping")]
        for t in self._threads:
            t.start()

    @property
    def addresses(self) -> list[str]:
        return [format_address(h, p) for h, p in self.servers]

    def request_stop(self) -> None:
        """Tell every thread to stop, without waiting (safe in a signal handler)."""
        if not self._stop.is_set():
            self._stop.set()
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop taking jobs; each thread finishes the batch it has. True when all have ended."""
        self.request_stop()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        done = not any(t.is_alive() for t in self._threads)
        if done:
            log.info("collector stopped", **self.counts)
        return done

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def serve_forever(self) -> int:
        """start(), then run until stop() (a signal handler calls it); 0, or 3 after it gave way
        to a rival collector (restartable: a restart's start check decides again)."""
        self.start()
        while not self._stop.wait(1.0):
            pass
        self.stop()
        return 3 if self.error else 0

    def close(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- one round of jobs -------------------------------------------------------------------
    def _store_round(self, jobs: list[gp.Packet], server: str) -> bytes:
        """Store every good record of these outcome jobs in one transaction; their answers."""
        checked: list[tuple[bytes, list[dict]]] = []  # (handle, good records) per job
        answers: dict[bytes, bytes] = {}
        for pkt in jobs:
            try:
                records, refusal = self._records_of(pkt, server)
            except Exception as e:  # a bug must not leave the job to come back for ever
                log.exception("outcome job could not be read; dropped", server=server, error=repr(e))
                records, refusal = [], f"the collector failed on this job: {type(e).__name__}"
            checked.append((pkt["job_handle"], records))
            answers[pkt["job_handle"]] = _refuse(pkt["job_handle"], refusal) if refusal else _complete(pkt["job_handle"])
        every = [r for _, records in checked for r in records]
        try:
            added = self.store.add(every, checked=True) if every else 0
        except (sqlite3.Error, OSError, StoreError) as e:
            self._count("store_failures")
            raise _StoreFailed(str(e)) from e
        except Exception:  # a record the checks let through and the store can't take: find its job
            added = self._store_each(checked, answers, server)
        with self._count_lock:
            self.counts["stored"] += added
            self.counts["known"] += len(every) - added
        return b"".join(answers.values())

    def _records_of(self, pkt: gp.Packet, server: str) -> tuple[list[dict], str | None]:
        """The good records of one outcome job, and why (some of) it was refused."""
        handle = pkt.text("job_handle")
        if "oversize" in pkt.args:
            error = f"outcome job of {int(pkt.args['oversize'])} bytes refused unread (at most {self.max_job})"
            log.warning("malformed outcome job skipped", server=server, handle=handle, error=error)
            self._count("malformed_jobs")
            return [], error
        data = pkt["data"]
        try:
            signer, data = open_report(data, self.trust, require_signed=self.require_signed, max_age=self.report_age)
        except policy.Refused as e:
            log.warning("outcome job refused: not stored", server=server, handle=handle, reason=e.reason,
                        unique=pkt.text("unique"))
            self._count("refused_reports")
            return [], f"outcome job refused: {e.reason}"
        try:
            raw = parse_outcomes(data)
        except BadOutcome as e:
            log.warning("malformed outcome job skipped", server=server, handle=handle, unique=pkt.text("unique"),
                        error=str(e), head=pkt["data"][:80].decode("utf-8", "replace"))
            self._count("malformed_jobs")
            return [], str(e)
        records, bad = [], []
        for i, obj in enumerate(raw):
            try:
                records.append(cap_record(check(obj), self.max_result))
            except BadOutcome as e:
                bad.append(f"record {i}: {e}")
        if not bad:
            return records, None
        log.warning("malformed outcome records skipped", server=server, handle=handle, unique=pkt.text("unique"),
                    refused=len(bad), of=len(raw), errors=bad[:MALFORMED_SHOWN])
        self._count("refused_records", len(bad))
        return records, f"{len(bad)} of {len(raw)} records refused: {'; '.join(bad[:MALFORMED_SHOWN])}"

    def _store_each(self, checked: list[tuple[bytes, list[dict]]], answers: dict[bytes, bytes], server: str) -> int:
        """Store job by job; a job whose records the store refuses is dropped (and logged)."""
        added = 0
        for handle, records in checked:
            try:
                added += self.store.add(records, checked=True) if records else 0
            except (sqlite3.Error, OSError, StoreError) as e:
                self._count("store_failures")
                raise _StoreFailed(str(e)) from e
            except Exception as e:
                log.exception("outcome records the store can't take; job dropped", server=server,
                              handle=handle.decode(errors="replace"), error=repr(e))
                self._count("malformed_jobs")
                answers[handle] = _refuse(handle, f"the store refused these records: {type(e).__name__}")
        return added

    def _count(self, key: str, n: int = 1) -> None:
        with self._count_lock:
            self.counts[key] += n

    def _query_round(self, jobs: list[gp.Packet], server: str) -> bytes:
        answers = []
        for pkt in jobs:
            if "oversize" in pkt.args:
                error = f"request of {int(pkt.args['oversize'])} bytes refused (at most {self.max_job})"
                answer = json.dumps({"ok": False, "error": error}).encode()
            else:
                answer = self._answer(pkt["data"], server)
            if self.key is not None:
                answer = sign_answer(answer, self.key)
            answers.append(_complete(pkt["job_handle"], answer))
        self._count("queries", len(jobs))
        return b"".join(answers)

    def _answer(self, raw: bytes, server: str) -> bytes:
        """The answer to one query. A signature line is stripped; with require_signed a query
        that changes the store must be signed: ``import`` for ``report`` (it stores outcomes,
        like an outcome job), ``mark_requeued`` and ``purge`` for ``control`` (an operator's)."""
        body = raw
        if raw.startswith(SIG_MAGIC):
            try:
                body = signing.split(raw)[1]
            except signing.SignatureFormatError:
                pass  # not JSON either: Queries.answer says what is wrong
        if self.require_signed and any(word in body for word in _CHANGING):
            op = _op_of(body)
            purpose = CHANGING_OPS.get(op)
            if purpose is not None:
                try:
                    policy.verify_message(purpose, raw, self.trust, time.time(), max_age=self.max_age)
                except policy.Refused as e:
                    log.warning("query refused: the store is left as it is", server=server, op=op, reason=e.reason)
                    self._count("refused_reports" if purpose == "report" else "refused_queries")
                    return json.dumps({"ok": False, "error": f"{op} refused: {e.reason}"}).encode()
        return self.queries.answer(body)

    def info(self) -> dict:
        """What ``ping`` answers: who this collector is, where it is attached, what it did."""
        servers: dict[str, dict[str, bool]] = {}
        for a in self._attachments:
            servers.setdefault(a.address, {})["query" if a.function == QUERY_FUNCTION else "outcomes"] = a.attached
        with self._count_lock:
            counts = dict(self.counts)
        return {"collector": self.client_id, "started_at": self.started_at, "servers": servers,
                "keep_days": self.config.outcomes.keep_days, "max_result": self.max_result,
                "store": self.config.outcomes.store, **counts}

    # -- housekeeping: pruning, and other collectors ------------------------------------------
    def _housekeeping(self) -> None:
        next_prune, next_rivals = 0.0, time.monotonic() + RIVAL_FIRST
        while not self.stopping:
            now = time.monotonic()
            if now >= next_prune:
                next_prune = now + self.prune_interval
                self.prune()
            if now >= next_rivals:
                next_rivals = now + self.rival_interval
                self._yield_to_rivals()
            if self.wait(max(0.05, min(next_prune, next_rivals) - time.monotonic())):
                break

    def prune(self) -> int:
        """Delete records older than outcomes.keep_days; how many."""
        try:
            n = self.store.prune(self.keep_seconds)
        except (sqlite3.Error, OSError, StoreError) as e:
            log.error("outcome store prune failed", error=str(e))
            return 0
        if n:
            log.info("pruned outcomes", count=n, keep_days=self.config.outcomes.keep_days)
        return n

    def rivals(self) -> list[tuple[str, WorkerConnection]]:
        """(server, connection) of every other worker of OUTCOME_FUNCTION on the reachable servers."""
        found = []
        for r in Admin(self.servers, DEFAULT_TIMEOUT).each(server_workers, False):
            if not r.ok:
                if r.server not in self._unlisted:
                    self._unlisted.add(r.server)
                    log.warning("cannot list the workers of a server", server=r.server, error=r.error)
                continue
            self._unlisted.discard(r.server)
            for w in r.value:
                if OUTCOME_FUNCTION in w.functions and w.client_id != self.client_id:
                    found.append((r.server, w))
        return found

    def _yield_to_rivals(self) -> None:
        """Two collectors that started at the same instant both got past start()'s check: the
        one whose client id sorts higher stops, so one remains (docs/outcomes.md). It stops only
        for a rival that answers a ping as that collector, never for a client id alone."""
        if self.config.outcomes.store == "postgresql":  # collectors share the store: none stops
            return
        rivals = self.rivals()
        lower = [(server, w) for server, w in rivals if is_collector_id(w.client_id) and w.client_id < self.client_id]
        for server, w in self._proven(lower) if lower else []:
            self.error = (f"another outcomes collector, {w.client_id} (from {w.ip}), is registered on "
                          f"{server} and answers; this one ({self.client_id}) stops")
            self.yielded = True
            log.error("collector conflict: stopping", server=server, other=w.client_id, ip=w.ip)
            self.request_stop()
            return
        for server, w in rivals:
            if (server, w.client_id) not in self._warned:
                self._warned.add((server, w.client_id))
                log.warning("another worker of geartask.outcomes is registered: it takes outcomes this "
                            "collector never sees" if not is_collector_id(w.client_id) else
                            "another outcomes collector is registered; it should stop by itself, or it does "
                            "not answer a ping (ignored)",
                            server=server, other=w.client_id, ip=w.ip)
