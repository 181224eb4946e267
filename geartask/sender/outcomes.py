"""What became of a job after it left the sender, from the outcomes collector (geartask.outcomes).

``result(config, key, wait)`` reads one job's outcome by unique key or handle;
``resolve(statuses, client)`` turns the status of a background job that the server no
longer holds into ``complete``, ``failed`` or ``unknown`` (never a bare "done").
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from ..address import format_address, split_server
from ..errors import GeartaskError
from ..jobs import decode_payload
from ..outcomes.client import OutcomeClient
from ..outcomes.record import decode_bytes
from .background import StatusResult, handle_problem
from .status_outcomes import OutcomeBatch

if TYPE_CHECKING:
    from ..config import Config

POLL = 0.5  # seconds between asks while --wait runs


@dataclass
class Outcome:
    """One job's outcome as the collector keeps it: ``state`` complete | failed | unknown."""

    key: str
    state: str
    record: dict | None = None
    error: str | None = None  # why it is unknown (not found, or no collector)

    @property
    def result(self) -> Any:
        """The job's result, decoded like a foreground result (JSON, else text, else bytes)."""
        raw = decode_bytes(self.record, "result") if self.record else None
        return None if raw is None else decode_payload(raw)

    def to_json(self) -> dict:
        rec = dict(self.record or {})
        out: dict[str, Any] = {"key": self.key, "state": self.state, "error": self.error}
        if rec:
            for k in ("unique", "handle", "server", "task", "attempts", "worker", "finished_at", "duration",
                      "background", "result_cut", "result_size", "requeues", "signer"):
                if k in rec:
                    out[k] = rec[k]
            if self.state == "complete":
                result = self.result
                out["result"] = result if not isinstance(result, bytes) else result.hex()
            else:
                out["reason"] = rec.get("reason")
                out["traceback"] = rec.get("traceback")  # a failed plugin task's; None for a shell's
                if rec.get("traceback_cut"):
                    out["traceback_cut"] = True
        return out


def split_key(key: str) -> tuple[str | None, str | None, str | None]:
    """A job handle (``H:host:N``, optionally ``@HOST:PORT``) or else a unique key:
    (unique, handle, server)."""
    handle, _, server = key.partition("@")
    if handle.startswith("H:") and handle_problem(handle) is None:
        try:  # the spelling the worker records ('[::1]:4730')
            server = format_address(*split_server(server)) if server else server
        except ValueError:
            pass
        return None, handle, server or None
    return key, None, None


def result(config: Config, key: str, wait: float = 0.0, timeout: float = 5.0) -> Outcome:
    """The outcome of ``key`` (unique or handle); with ``wait``, ask again until it is there
    or ``wait`` seconds pass. NoCollectorError when no collector answers."""
    unique, handle, server = split_key(key)
    client = OutcomeClient(config, timeout=timeout)
    deadline = time.monotonic() + wait
    while True:
        record = client.latest(unique=unique, handle=handle, server=server)
        if record is not None:
            return Outcome(key, record["state"], record)
        if time.monotonic() >= deadline:
            return Outcome(key, "unknown", error="the outcomes store has no record of it (not finished, "
                                                 "not reported, or pruned)")
        time.sleep(min(POLL, max(0.0, deadline - time.monotonic())))


RESOLVE_CHUNK = 1000  # statuses held back at a time while their finished jobs' outcomes are asked for


def resolve(statuses: Iterable[StatusResult], config: Config, timeout: float = 5.0) -> Iterator[StatusResult]:
    """Each status as it is, except ``done`` (the server no longer holds the job): that one
    becomes complete or failed from its outcome, or unknown with the reason. In order; the
    outcomes are asked for RESOLVE_CHUNK at a time over one connection (status_outcomes)."""
    batch = OutcomeBatch(config, timeout=timeout)
    no_collector: list[str] = []  # asked once: the next ones would wait as long again
    pending: list[StatusResult] = []

    def settle() -> list[StatusResult]:
        done = [s for s in pending if s.state == "done"]
        records: list[dict | None] = [None] * len(done)
        if done and not no_collector:
            try:
                records = batch.latest([(s.unique, None, None) if s.unique else (None, s.handle, s.server)
                                        for s in done])
            except GeartaskError as e:
                no_collector.append(str(e))
        for s, record in zip(done, records, strict=False):
            if record is not None:
                s.state, s.outcome = record["state"], record
            else:
                s.state = "unknown"
                s.error = (f"finished, but its outcome can't be read: {no_collector[0]}" if no_collector
                           else "finished, but the outcomes store has no record of it")
        out = list(pending)
        pending.clear()
        return out

    try:
        for s in statuses:
            pending.append(s)
            if len(pending) >= RESOLVE_CHUNK:
                yield from settle()
        yield from settle()
    finally:
        batch.close()
