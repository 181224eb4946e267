"""Whether another registered worker of ``geartask.outcomes`` really is a collector (issue 20, items 1 and 9).

A client id costs nothing to claim (``SET_CLIENT_ID geartask-collector:!:0``) and gearmand
keeps a dead host's registration for up to ~15 minutes, so neither the id nor the
registration alone may stop a collector or keep one from starting. A rival proves itself by
answering a ``ping`` over ``geartask.outcomes.query`` with a collector's reply naming its own
client id; with ``security.trust`` set, that reply must be signed for ``answer`` by a trusted
signer. Pings go in rounds of a few, each with its own random unique key, so that when this
collector serves queries too some of them reach the rival; a round with an unanswered ping
ends the search (nobody else is serving), so a silent registration costs at most ``timeout``.
"""

from __future__ import annotations

import json
import time
import uuid

from .. import gearman as gp
from ..errors import ServerError
from ..trust import policy
from .answers import RogueAnswer, open_answer
from .record import QUERY_FUNCTION

PROOF_TIMEOUT = 3.0  # seconds a registered rival has to answer a ping before it is ignored
PROOF_PINGS = 4  # pings per round
PROOF_ROUND = 1.5  # seconds one round waits for its answers
MAX_PROOF_ANSWER = 1024 * 1024  # bytes of a ping answer looked at (a collector's is a few hundred)
_PING = json.dumps({"op": "ping"}).encode()


def _collector_of(data: bytes, trust: policy.Trust, signed: bool) -> tuple[str | None, str | None]:
    """(collector id, signer) a ping answer names; (None, why) when it is no collector's answer."""
    if len(data) > MAX_PROOF_ANSWER:
        return None, f"answer of {len(data)} bytes"
    try:
        signer, body = open_answer(data, trust, require_signed=signed)
    except RogueAnswer as e:
        return None, e.reason
    try:
        answer = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None, "not JSON"
    result = answer.get("result") if isinstance(answer, dict) and answer.get("ok") is True else None
    cid = result.get("collector") if isinstance(result, dict) else None
    if not isinstance(cid, str) or not isinstance(result, dict) or not isinstance(result.get("servers"), dict):
        return None, "not a collector's ping answer"
    return cid, signer


def answering_collectors(host: str, port: int, wanted: set[str], *, trust: policy.Trust, signed: bool,
                         timeout: float = PROOF_TIMEOUT) -> dict[str, str | None]:
    """{collector id: signer} of the ids in ``wanted`` whose collector answered a ping over the
    query function on this server within ``timeout`` seconds. ``signed``: only an answer signed
    for ``answer`` by a signer of ``trust`` counts. ServerError when the server can't be asked."""
    found: dict[str, str | None] = {}
    deadline = time.monotonic() + timeout
    conn = gp.Connection(host, port, connect_timeout=min(timeout, gp.CONNECT_TIMEOUT))
    submit = gp.submit_command("high", False)
    try:
        conn.connect()
        while wanted - found.keys() and time.monotonic() < deadline:
            conn.send_raw(b"".join(gp.pack(submit, task=QUERY_FUNCTION, unique=f"{QUERY_FUNCTION}:proof:{uuid.uuid4().hex}",
                                           data=_PING) for _ in range(PROOF_PINGS)))
            round_end = min(deadline, time.monotonic() + PROOF_ROUND)
            handles: set[bytes] = set()
            answered = 0
            while answered < PROOF_PINGS:
                pkt = conn.recv(max(0.0, round_end - time.monotonic()))
                if pkt is None:
                    break
                if pkt.cmd == gp.JOB_CREATED:
                    handles.add(pkt["job_handle"])
                elif pkt.cmd == gp.ERROR:
                    raise ServerError(gp.error_text(pkt), conn.address)
                elif pkt.cmd in (gp.WORK_COMPLETE, gp.WORK_FAIL, gp.WORK_EXCEPTION) and pkt["job_handle"] in handles:
                    handles.discard(pkt["job_handle"])
                    answered += 1
                    if pkt.cmd == gp.WORK_COMPLETE:
                        cid, signer = _collector_of(pkt["data"], trust, signed)
                        if cid in wanted:
                            found[cid] = signer
            if answered < PROOF_PINGS:
                break  # a ping nobody took: no other query worker is serving
    finally:
        conn.close()
    return found

