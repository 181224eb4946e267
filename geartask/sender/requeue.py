"""Send failed jobs again (``manage failed requeue``, the dashboard's Requeue): the newest
failed attempt of each group, from the outcomes store, through a JobSender."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..outcomes.client import OutcomeClient
from ..outcomes.failed import Requeued, requester
from ..outcomes.record import decode_bytes
from .sender import JobSender

if TYPE_CHECKING:
    from ..config import Config


def requeue(config: Config, client: OutcomeClient, groups: list[list[dict]], by: str | None = None) -> list[Requeued]:
    """Send each group's newest failed job again: its task, data and priority, the same unique
    key, as a background job; then mark every record of the group requeued, by ``by``, with
    the new handle. A record whose data was not kept whole can't be sent (its ``error`` says)."""
    by = by or requester()
    out: list[Requeued] = []
    jobs: list[dict] = []
    for group in groups:
        newest = client.get(group[0]["id"]) or group[0]
        r = Requeued(newest.get("unique"), newest["task"], [g["id"] for g in group])
        out.append(r)
        if newest.get("data") is None:
            r.error = "its payload was not kept (no 'data' in the record): it can't be sent again"
        elif newest.get("data_cut"):
            r.error = f"its payload was cut at {len(decode_bytes(newest, 'data') or b'')} of {newest.get('data_size')} bytes"
        else:
            # requeue_of lands in JobDefinition.extra: the envelope carries it to the worker
            jobs.append({"task": newest["task"], "data": decode_bytes(newest, "data"), "unique": newest.get("unique"),
                         "priority": newest.get("priority"), "background": True, "retries": newest.get("retries"),
                         "requeue_of": newest["id"], "_index": len(out) - 1})
    if not jobs:
        return out
    index = [j.pop("_index") for j in jobs]
    with JobSender(config, record_background=False) as sender:
        results = sender.submit_many([{k: v for k, v in j.items() if v is not None} for j in jobs], wait=False)
    for i, res in zip(index, results, strict=False):
        r = out[i]
        if res.state != "queued":
            r.error = f"not accepted by any server: {res.error or res.state}"
            continue
        r.handle, r.server = res.handle, res.server
        for id in r.ids:
            client.mark_requeued(id, by, handle=r.handle, server=r.server)
    return out
