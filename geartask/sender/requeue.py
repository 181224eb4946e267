"""Send failed jobs again (``manage failed requeue``, the dashboard's Requeue): the newest
failed attempt of each group, from the outcomes store.

A record is what a peer reported, so it is never trusted to say what to run (issue 20 item 6,
issue 19 Must 5). ``plan`` says what each group would send (task, the head of its data, the
original sender and signer) so the command can show it and ask first. With ``security.key``
and a ``security.trust`` list, a job is sent again only with its original signature, verified
again against today's trust (``outcomes.signed.requeue_payload``), submitted raw with the same
task and unique key; a record without one, or whose job a worker refused (its reason has
``refused: true``), is not sent, with the reason. Without trust, as before: through a JobSender.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..display import printable
from ..errors import GeartaskError, ServerError
from ..outcomes.client import OutcomeClient
from ..outcomes.failed import Requeued, requester
from ..outcomes.record import decode_bytes, resend_function
from ..outcomes.signed import NotResendable, requeue_payload
from .sender import JobSender

if TYPE_CHECKING:
    from ..config import Config

DATA_HEAD = 60  # bytes of a job's data shown before it is sent again


@dataclass
class Planned:
    """One group's job as it would be sent again; ``error`` says why it won't be."""

    record: dict  # the newest failed record of the group (with its data)
    ids: list[str]
    error: str | None = None
    payload: bytes | None = field(default=None, repr=False)  # with trust: the exact bytes to submit

    @property
    def task(self) -> str:
        return str(self.record.get("task"))

    @property
    def function(self) -> str:
        """What it is sent to: the task, or the targeted name it first came as (shell@host:web1)."""
        return resend_function(self.record)

    @property
    def unique(self) -> str | None:
        return self.record.get("unique")

    def describe(self) -> str:
        """One line: what will be sent, and who first sent it."""
        rec = self.record
        try:
            data = decode_bytes(rec, "data") if rec.get("data") is not None else None
        except (ValueError, TypeError):
            data = None
        head = "(none kept)" if data is None else printable(data[:DATA_HEAD].decode("utf-8", "replace")) + (
            f"... ({len(data)} bytes)" if len(data) > DATA_HEAD else "")
        who = f"sent by {printable(rec.get('sender_host') or 'unknown')}"
        if rec.get("signer"):
            who += f", signed by {printable(rec['signer'])}"
        line = f"{printable(self.function)} {printable(self.unique or '-')}: data {head}; {who}"
        return line + (f" -- NOT SENT: {self.error}" if self.error else "")


def trusted(config: Config) -> bool:
    """Whether requeues follow the signature rule: a key to sign the note and a trust list."""
    return bool(config.security.key) and bool(config.security.trust)


def _refused_reason(rec: dict) -> str | None:
    reason = rec.get("reason")
    if isinstance(reason, dict) and reason.get("refused") is True:
        return printable(str(reason.get("error") or "refused"))[:300]
    return None


def plan(config: Config, client: OutcomeClient, groups: list[list[dict]]) -> list[Planned]:
    """What each group's newest failed job would be sent as, and what keeps one from being sent."""
    key = trust = None
    if trusted(config):
        from ..trust import policy
        from ..trust.keys import signing_key
        key, trust = signing_key(config), policy.trust_of(config)
    out = []
    for group in groups:
        newest = client.get(group[0]["id"]) or group[0]
        p = Planned(newest, [g["id"] for g in group])
        out.append(p)
        if newest.get("data") is None:
            p.error = "its payload was not kept (no 'data' in the record): it can't be sent again"
        elif newest.get("data_cut"):
            p.error = f"its payload was cut at {len(decode_bytes(newest, 'data') or b'')} of {newest.get('data_size')} bytes"
        elif trust is not None:
            refused = _refused_reason(newest)
            if refused is not None:
                p.error = f"a worker refused it ({refused}): it is not sent again"
                continue
            try:
                p.payload = requeue_payload(newest, key, trust)
            except NotResendable as e:
                p.error = f"not sent again: {e}"
    return out


def requeue(config: Config, client: OutcomeClient, groups: list[list[dict]], by: str | None = None,
            planned: list[Planned] | None = None) -> list[Requeued]:
    """Send each group's newest failed job again: its task, data and priority, the same unique
    key, as a background job; then mark every record of the group requeued, by ``by``, with
    the new handle. A record whose data was not kept whole can't be sent (its ``error`` says);
    with trust, neither can one without a verifiable original signature (``plan``)."""
    by = by or requester()
    planned = plan(config, client, groups) if planned is None else planned
    out = [Requeued(p.unique, p.task, p.ids, error=p.error) for p in planned]
    sendable = [(i, p) for i, p in enumerate(planned) if p.error is None]
    if not sendable:
        return out
    try:
        with JobSender(config, record_background=False) as sender:
            if trusted(config):  # the original signed bytes, as they are
                results = sender.submit_raw([_raw_job(p.function, p.unique, p.payload or b"", p.record.get("priority"))
                                             for _, p in sendable])
            else:
                # requeue_of lands in JobDefinition.extra: the envelope carries it to the worker
                jobs = [{"task": p.function, "data": decode_bytes(p.record, "data"), "unique": p.unique,
                         "priority": p.record.get("priority"), "background": True,
                         "retries": p.record.get("retries"), "requeue_of": p.record["id"]} for _, p in sendable]
                results = sender.submit_many([{k: v for k, v in j.items() if v is not None} for j in jobs],
                                             wait=False)
    except ServerError as e:  # nothing accepted (no server reachable): every one says so
        for i, _ in sendable:
            out[i].error = f"not accepted by any server: {e}"
        return out
    for (i, _), res in zip(sendable, results, strict=True):
        if res.state != "queued":
            out[i].error = f"not accepted by any server: {res.error or res.state}"
        else:
            out[i].handle, out[i].server = res.handle, res.server
    for r in out:
        if r.error is None and r.handle is not None:
            try:
                for id in r.ids:  # the client signs it (security.key): a strict collector wants that
                    client.mark_requeued(id, by, handle=r.handle, server=r.server)
            except GeartaskError as e:  # sent already: say so, and that the record still looks failed
                r.error = f"sent again as {r.handle} on {r.server}, but not marked requeued: {e}"
    return out


def _raw_job(task: str, unique: str | None, payload: bytes, priority: Any) -> dict:
    job = {"task": task, "data": payload, "unique": unique or None,
           "priority": priority if priority in ("high", "normal", "low") else None}
    return {k: v for k, v in job.items() if v is not None}


def submit_raw(config: Config, task: str, unique: str, payload: bytes, priority: Any = None) -> tuple[str, str]:
    """Submit these exact bytes as a background job (JobSender.submit_raw, not recorded);
    (handle, server). ServerError when no server accepts it."""
    with JobSender(config, record_background=False) as sender:
        res = sender.submit_raw([_raw_job(task, unique, payload, priority)])[0]
    if res.state != "queued" or res.handle is None or res.server is None:
        raise ServerError(str(res.error or res.state))
    return res.handle, res.server
