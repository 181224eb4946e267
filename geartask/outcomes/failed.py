"""Failed jobs, for the manager's ``failed`` commands: find them, import a dead-letter file (sending
them again is geartask.sender.requeue: the sender sits above the outcomes).

Both work through an OutcomeClient, so they run on any machine that reaches a job server.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import UsageError
from .client import OutcomeClient
from .query import MAX_LIST
from .record import BATCH_BYTES, BadOutcome, cap_record, check, encode_bytes

IMPORT_RECORDS = 500  # records per import request ...
IMPORT_BYTES = BATCH_BYTES  # ... and bytes (one record may be bigger)
MAX_LINE = 64 * 1024 * 1024  # a dead-letter line longer than this is not one
BAD_LINES_KEPT = 20
IMPORT_ONE = 12 * 1024 * 1024  # a record bigger than this as JSON is cut first: a collector takes 16 MiB requests
IMPORT_CUT = 2 * 1024 * 1024  # ... to this much of its result, data and reason each (flagged *_cut)


def requester() -> str:
    """user@host: who requeued, as the record says."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@dataclass
class Requeued:
    """What became of one failed job sent again."""

    unique: str | None
    task: str
    ids: list[str]  # the failed records marked requeued (all of this unique not requeued before)
    handle: str | None = None  # the new job's, on ``server``
    server: str | None = None
    error: str | None = None  # why it was not sent (then nothing is marked)

    def to_dict(self) -> dict:
        return asdict(self)


MAX_PAGES = 20  # failed-list pages one requeue --all / --task reads ...
MAX_RECORDS = 10_000  # ... and failed records it takes: a rogue answerer paging forever stops here


def failed_targets(client: OutcomeClient, *, uniques: Iterable[str] = (), task: str | None = None,
                   every: bool = False, cut: list[str] | None = None) -> tuple[list[list[dict]], list[str]]:
    """The failed records to send again, grouped by unique key (newest first in each group), and
    the uniques asked for that have none (unknown, or nothing failed left to requeue).

    ``--all``/``--task`` read at most MAX_PAGES pages and MAX_RECORDS records; when they stop
    there, a line saying so is appended to ``cut`` (run the requeue again for the rest)."""
    groups: dict[str, list[dict]] = {}
    missing: list[str] = []
    for unique in uniques:
        rows = [r for r in client.history(unique, MAX_LIST)["records"]
                if r["state"] == "failed" and not r.get("requeues")]
        if rows:
            groups[unique] = rows[::-1]
        else:
            missing.append(unique)
    if task is not None or every:
        seen: set[str] = set()
        until = None
        for pages in range(1, MAX_PAGES + 1):  # page back in time; a page ends where the next begins
            page = client.failed(task=task, limit=MAX_LIST, until=until)["records"][:MAX_LIST]
            new = [r for r in page if r["id"] not in seen][:MAX_RECORDS - len(seen)]
            for r in new:
                seen.add(r["id"])
                groups.setdefault(r.get("unique") or f"\0{r['id']}", []).append(r)
            if len(page) < MAX_LIST or not new:
                break
            if len(seen) >= MAX_RECORDS or pages == MAX_PAGES:
                if cut is not None:
                    cut.append(f"stopped after {pages} pages and {len(seen)} failed records (at most {MAX_PAGES} "
                               f"pages, {MAX_RECORDS} records in one requeue): run it again for the rest")
                break
            until = page[-1]["finished_at"]
    return list(groups.values()), missing


# -- dead-letter files ---------------------------------------------------------------------

def from_dead_letter(obj: Any, line: bytes) -> dict:
    """An outcome record from one dead-letter line: an outcome record as it is (a worker writes
    one there when no server took it), or a worker's older dead-letter record, converted (its
    id derived from the line, so importing a file twice stores nothing twice)."""
    if not isinstance(obj, dict):
        raise BadOutcome(f"a dead letter must be a JSON object, got {type(obj).__name__}")
    if "id" in obj and "state" in obj:
        return check(obj)
    rec: dict[str, Any] = {"id": "dl-" + hashlib.sha256(line).hexdigest()[:40], "state": "failed",
                           "server": obj.get("server") or "unknown", "finished_at": obj.get("time")}
    for key in ("task", "unique", "handle", "attempts", "worker", "host", "traceback"):
        if obj.get(key) is not None:
            rec[key] = obj[key]
    if obj.get("seconds") is not None:
        rec["duration"] = obj["seconds"]
    if obj.get("reason") is not None:
        rec["reason"] = obj["reason"] if isinstance(obj["reason"], dict) else {"error": obj["reason"]}
    size = obj.get("data_bytes")
    if "data" in obj:  # the payload whole: JSON kept decoded, or its text
        value = obj["data"]
        raw = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else \
            json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
        _put(rec, raw, size, cut=False)
    elif "data_hex" in obj or "data_head_hex" in obj or "data_head" in obj:
        hexed = obj.get("data_hex", obj.get("data_head_hex"))
        try:
            raw = bytes.fromhex(hexed) if isinstance(hexed, str) else str(obj["data_head"]).encode("utf-8")
        except ValueError:
            raise BadOutcome("'data_hex' is not hexadecimal") from None
        _put(rec, raw, size, cut="data_hex" not in obj)
    rec.setdefault("handle", "unknown")
    return check(rec)


def _put(rec: dict, raw: bytes, size: Any, cut: bool) -> None:
    enc = encode_bytes(raw, len(raw))
    rec["data"], rec["data_encoding"] = enc[""], enc["encoding"]
    rec["data_size"] = size if isinstance(size, int) and not isinstance(size, bool) and size >= len(raw) else len(raw)
    if cut:
        rec["data_cut"] = True


@dataclass
class ImportReport:
    added: int = 0  # new records stored
    known: int = 0  # records the store had already
    refused: int = 0  # lines that are no record (bad_lines names the first of them)
    bad_lines: list[tuple[int, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"added": self.added, "known": self.known, "refused": self.refused,
                "bad_lines": [{"line": n, "error": e} for n, e in self.bad_lines]}


def read_dead_letters(path: Path, report: ImportReport) -> Iterator[dict]:
    """The records of a dead-letter file, line by line; lines that are none go to ``report``."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        for number, line in enumerate(_lines(f), 1):
            if not line.strip():
                continue
            try:
                if line is _TOO_LONG:
                    raise BadOutcome(f"line longer than {MAX_LINE} bytes")
                try:
                    obj = json.loads(line.decode("utf-8"))
                except (UnicodeDecodeError, ValueError, RecursionError):
                    raise BadOutcome("not a JSON line") from None
                yield from_dead_letter(obj, line.rstrip(b"\r\n"))
            except BadOutcome as e:
                report.refused += 1
                if len(report.bad_lines) < BAD_LINES_KEPT:
                    report.bad_lines.append((number, str(e)))


_TOO_LONG = b"\0too long"


def _lines(f: Any) -> Iterator[bytes]:
    while True:
        line = f.readline(MAX_LINE + 1)
        if not line:
            return
        if len(line) > MAX_LINE and not line.endswith(b"\n"):
            while (more := f.readline(MAX_LINE)) and not more.endswith(b"\n"):
                pass
            yield _TOO_LONG
            continue
        yield line


def import_dead_letters(client: OutcomeClient, path: Path) -> ImportReport:
    """Store every record of a dead-letter file through the collector (``failed import``)."""
    report = ImportReport()
    chunk: list[dict] = []
    size = 0
    for rec in read_dead_letters(Path(path), report):
        n = len(json.dumps(rec, ensure_ascii=False))
        if n > IMPORT_ONE:  # sent whole, the collector would refuse the request and the import stop there
            rec = cap_record(rec, IMPORT_CUT)
            n = len(json.dumps(rec, ensure_ascii=False))
        if chunk and (len(chunk) >= IMPORT_RECORDS or size + n > IMPORT_BYTES):
            _send(client, chunk, report)
            chunk, size = [], 0
        chunk.append(rec)
        size += n
    if chunk:
        _send(client, chunk, report)
    return report


def _send(client: OutcomeClient, chunk: list[dict], report: ImportReport) -> None:
    answer = client.import_records(chunk)
    report.added += answer["added"]
    report.known += answer["known"]
    report.refused += answer["refused_count"]
    for r in answer["refused"]:
        if len(report.bad_lines) < BAD_LINES_KEPT:
            report.bad_lines.append((0, f"refused by the collector: {r['error']}"))
