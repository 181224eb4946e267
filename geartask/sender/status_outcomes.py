"""The outcomes of many finished background jobs, for ``send status``: pipelined over one connection.

``OutcomeClient.latest`` (geartask.outcomes.client) opens a connection, asks the server's
admin ``status`` whether a collector is attached, and submits one query, for every job: against
20,000 background records that was 20,000 connections, 20,000 admin ``status`` walks of every
function and 20,000 round trips, enough to slow gearmand for everyone (its outcomes collector
lost its connection for 14 s). Here one connection is checked once and the queries go
``WINDOW`` at a time, each the same request (and unique key) ``latest`` sends, so the answers
are the collector's own, checked the same way.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any, Sequence

from .. import gearman as gp
from ..address import format_address
from ..errors import ServerError
from ..outcomes.client import OutcomeClient, collector_attached, checked_record, query_answer, query_unique
from ..outcomes.errors import NoCollectorError, QueryError
from ..outcomes.query import Refused, check_request
from ..outcomes.record import QUERY_FUNCTION

if TYPE_CHECKING:
    from ..config import Config

WINDOW = 100  # queries in flight: enough to hide the round trip, few enough to leave gearmand to others


def _payload(key: tuple[str | None, str | None, str | None]) -> bytes:
    unique, handle, server = key
    request: dict[str, Any] = {"op": "latest"}
    if unique:
        request["unique"] = unique
    else:
        request.update({k: v for k, v in (("handle", handle), ("server", server)) if v is not None})
    try:
        check_request(request)
    except Refused as e:
        raise QueryError(f"bad query: {e}") from None
    return json.dumps(request, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode("utf-8", "surrogatepass")


class OutcomeBatch:
    """``latest`` for many jobs at once; NoCollectorError / QueryError as OutcomeClient raises."""

    def __init__(self, config: Config, timeout: float = 5.0):
        self.servers = list(config.server_addresses)
        self.timeout = timeout
        self.conn: gp.Connection | None = None
        self.answers = OutcomeClient(config, timeout)  # opens answers as it does: signed ones checked

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _connection(self) -> gp.Connection:
        if self.conn is not None:
            return self.conn
        tried: dict[str, str] = {}
        for host, port in self.servers:
            conn = gp.Connection(host, port, connect_timeout=min(self.timeout, gp.CONNECT_TIMEOUT))
            try:
                conn.connect()
                if collector_attached(conn, self.timeout):
                    self.conn = conn
                    return conn
                tried[format_address(host, port)] = "no collector attached"
            except ServerError as e:
                tried[format_address(host, port)] = str(e).removeprefix(f"{format_address(host, port)}: ")
            conn.close()
        detail = "; ".join(f"{a}: {why}" for a, why in tried.items()) or "no server tried"
        raise NoCollectorError(f"no outcomes collector answered (is `geartask manage outcomes serve` running?): "
                               f"{detail}")

    def latest(self, keys: Sequence[tuple[str | None, str | None, str | None]]) -> list[dict | None]:
        """For each (unique, handle, server) key, the latest outcome record or None."""
        out: list[dict | None] = [None] * len(keys)
        for start in range(0, len(keys), WINDOW):
            part = keys[start:start + WINDOW]
            for i, answer in enumerate(self._window([_payload(k) for k in part])):
                out[start + i] = answer
        return out

    def _window(self, payloads: list[bytes]) -> list[dict | None]:
        conn = self._connection()
        try:
            conn.send_raw(b"".join(gp.pack(gp.submit_command("high", False), task=QUERY_FUNCTION,
                                           unique=query_unique(p), data=p) for p in payloads))
            deadline = time.monotonic() + self.timeout
            waiting: dict[bytes, list[int]] = {}  # handle -> payload indexes (equal queries share one job)
            created = 0
            answers: dict[int, dict | None] = {}
            warnings: dict[bytes, bytes] = {}
            while created < len(payloads) or waiting:
                pkt = conn.recv(max(0.0, deadline - time.monotonic()))
                if pkt is None:
                    raise NoCollectorError(f"no outcomes collector answered within {self.timeout:g}s "
                                           f"({len(payloads) - len(answers)} of {len(payloads)} queries open)")
                if pkt.cmd == gp.ERROR:
                    raise ServerError(gp.error_text(pkt), conn.address)
                if pkt.cmd == gp.JOB_CREATED and created < len(payloads):  # in the order submitted
                    waiting.setdefault(pkt["job_handle"], []).append(created)
                    created += 1
                    continue
                handle = pkt.args.get("job_handle")
                if handle not in waiting:
                    continue
                if pkt.cmd == gp.WORK_WARNING:
                    warnings[handle] = pkt["data"]
                elif pkt.cmd == gp.WORK_COMPLETE:
                    record = checked_record(query_answer(self.answers.open_reply(pkt["data"], conn.address),
                                                         conn.address), "latest")
                    for i in waiting.pop(handle):
                        answers[i] = record
                elif pkt.cmd in (gp.WORK_FAIL, gp.WORK_EXCEPTION):
                    why = warnings.get(handle)
                    raise QueryError(f"the query failed on {conn.address}: "
                                     f"{why[:300].decode('utf-8', 'replace') if why else 'no reason given'}")
        except ServerError:
            self.close()
            raise
        return [answers.get(i) for i in range(len(payloads))]
