"""Live output of a followed shell command (``"follow": true``): the chunk format and its limits.

A followed command's stdout and stderr reach the waiting client as Gearman WORK_DATA
chunks, each one JSON object of at most ``MAX_CHUNK`` bytes::

    {"host": "web3.example.com", "parts": [["stdout", "text"], ["stderr", "text"], ...],
     "dropped": 0}

``parts`` keeps the order in which the command wrote to its two streams; ``dropped`` is the
number of output bytes left out so far (it only grows). At most one chunk leaves per
``INTERVAL`` (about 10 a second per job) and at most ``PENDING`` bytes wait for the next one:
when more come, the oldest waiting bytes are dropped (up to a line start) and counted, so a
chunk after a gap starts with the newest whole lines, and a command that prints endlessly
costs the job server and the client at most about 640 KiB a second.

The worker also keeps the last ``TAIL`` bytes of output (``Tail``): that is the result's
``output``, and what the dashboard shows of the running job (the ``output`` control command).

Everything here is pure (the clock is an argument), so tests/test_follow_stream.py drives it
with a fake clock; the worker's reading of the pipes is geartask.shell.follow, the sender's
printing geartask.sender.follow.
"""

from __future__ import annotations

import codecs
import json
import socket
import threading
from typing import Any

from ..targets import machine_host

MAX_CHUNK = 64 * 1024  # bytes of one encoded chunk, at most
INTERVAL = 0.1  # seconds between two chunks of one job: about 10 a second
PENDING = 60 * 1024  # output bytes held for the next chunk; more is dropped and counted
TAIL = 64 * 1024  # bytes of the latest output kept: the result's output, the dashboard's view
STREAMS = ("stdout", "stderr")
MAX_HOST = 255  # characters of a chunk's host name a reader accepts
MAX_PARTS = 4096  # parts of one chunk a reader accepts
MAX_DROPPED = 2 ** 62  # a larger count is not a count


def worker_host(worker_config: Any = None) -> str:
    """The host name a chunk carries: the worker's ``host`` setting (``worker.host``), else the
    name the worker announces for targeted jobs (targets.machine_host), so a fan-out's
    ``HOST |`` prefixes match its table; the FQDN as a last resort."""
    host = getattr(worker_config, "host", None)
    return host if isinstance(host, str) and host else (machine_host() or socket.getfqdn())


class Tail:
    """The last ``cap`` bytes of a byte stream, and how many went by in all."""

    __slots__ = ("cap", "buf", "total")

    def __init__(self, cap: int = TAIL):
        self.cap = cap
        self.buf = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        buf = self.buf
        if len(data) >= self.cap:
            buf[:] = data[-self.cap:]
            return
        buf += data
        if len(buf) > 2 * self.cap:  # trimmed now and then, not on every write
            del buf[:len(buf) - self.cap]

    def bytes(self) -> bytes:
        return bytes(self.buf[-self.cap:]) if self.cap else b""

    def text(self) -> str:
        """The kept bytes as text; a character cut at the front is left out, not garbled."""
        data = self.bytes()
        if self.total > len(data):
            skip = 0
            while skip < min(3, len(data)) and 0x80 <= data[skip] < 0xC0:  # UTF-8 continuation bytes
                skip += 1
            data = data[skip:]
        return data.decode("utf-8", errors="replace")

    @property
    def cut(self) -> bool:
        return self.total > self.cap


class Chunker:
    """What the command wrote, turned into WORK_DATA chunks no faster than one per
    ``interval`` and no bigger than ``max_chunk`` bytes. At most ``pending`` bytes wait for
    the next chunk; when more come, the oldest waiting bytes are dropped (counted in
    ``dropped``), up to the next line start, so a chunk after a gap begins with the newest
    whole lines and the last lines of a flood are the ones shown. Not thread-safe:
    LiveOutput locks it."""

    def __init__(self, host: str, interval: float = INTERVAL, pending: int = PENDING, max_chunk: int = MAX_CHUNK):
        self.host = host[:MAX_HOST]
        self.interval, self.limit, self.max_chunk = interval, pending, max_chunk
        self.parts: list[list] = []  # [stream, bytearray], in the order written (str: decoded, put back)
        self.held = 0  # bytes waiting in parts
        self.dropped = 0  # bytes of output dropped so far
        self.sent = 0  # chunks made
        self.last: float | None = None  # when the last chunk was made
        self.gaps: set[str] = set()  # streams that lost bytes since the last chunk
        self.decoders = {s: codecs.getincrementaldecoder("utf-8")(errors="replace") for s in STREAMS}

    def add(self, stream: str, data: bytes) -> None:
        parts = self.parts
        if len(data) >= self.limit:  # a flood: only its newest bytes can be held
            self.dropped += self.held + len(data) - self.limit
            self.gaps.update(p[0] for p in parts)
            self.gaps.add(stream)
            parts[:] = [[stream, bytearray(data[len(data) - self.limit:])]]
            self.held = self.limit
            if len(data) > self.limit:
                self._to_line_start()
            return
        if parts and parts[-1][0] == stream and isinstance(parts[-1][1], bytearray):
            parts[-1][1] += data
        else:
            parts.append([stream, bytearray(data)])
        self.held += len(data)
        if self.held <= self.limit:
            return
        excess = self.held - self.limit
        while excess:
            head = parts[0]
            self.gaps.add(head[0])
            n = min(excess, len(head[1]))
            if isinstance(head[1], str):
                head[1] = head[1][n:]
            else:
                del head[1][:n]
            excess -= n
            self.held -= n
            self.dropped += n
            if not head[1]:
                del parts[0]
            elif not excess:
                self._to_line_start()  # a line was cut: start at the next one

    def _to_line_start(self) -> None:
        """After a gap: the waiting bytes start at the next line (the rest of a cut line is dropped)."""
        if not self.parts:
            return
        head = self.parts[0]
        cut = head[1].find("\n" if isinstance(head[1], str) else b"\n")
        if cut >= 0:
            if isinstance(head[1], str):
                head[1] = head[1][cut + 1:]
            else:
                del head[1][:cut + 1]
            self.held -= cut + 1
            self.dropped += cut + 1
            if not head[1]:
                del self.parts[0]

    def due(self, now: float) -> float:
        """Seconds until the next chunk may be made (0: now)."""
        return 0.0 if self.last is None else max(0.0, self.last + self.interval - now)

    def take(self, now: float, last: bool = False) -> bytes | None:
        """The next chunk when one is due and there is something to say, else None. ``last``:
        the command has ended, so a character cut at the very end goes out (replaced)."""
        if self.due(now) > 0 or not (self.parts or last):
            return None
        for stream in self.gaps:  # a character a decoder holds belongs before the gap
            self.decoders[stream].reset()
        texts: list[list] = []
        for stream, raw in self.parts:
            text = raw if isinstance(raw, str) else self.decoders[stream].decode(bytes(raw), final=last)
            _append(texts, stream, text)
        self.parts, self.held, self.gaps = [], 0, set()
        if last:
            for stream, decoder in self.decoders.items():
                _append(texts, stream, decoder.decode(b"", final=True))
        if not texts:
            return None
        chunk = self._encode(texts)
        while len(chunk) > self.max_chunk:
            # Escapes (control characters, replaced bytes) made it too big: the front half of
            # the text goes now, the rest waits for the next chunk.
            texts, back = _halve(texts)
            self.parts[:0] = back  # already decoded: the decoders may hold what comes after it
            self.held += sum(len(t) for _, t in back)
            chunk = self._encode(texts)
        self.last = now
        self.sent += 1
        return chunk

    def _encode(self, parts: list) -> bytes:
        return json.dumps({"host": self.host, "parts": parts, "dropped": self.dropped},
                          ensure_ascii=False, separators=(",", ":")).encode("utf-8", errors="surrogatepass")


def _append(texts: list[list], stream: str, text: str) -> None:
    if not text:
        return
    if texts and texts[-1][0] == stream:
        texts[-1][1] += text
    else:
        texts.append([stream, text])


def _halve(parts: list) -> tuple[list, list]:
    """``parts`` split at half their characters: (front, back)."""
    total = sum(len(t) for _, t in parts)
    keep = max(1, total // 2)
    front, back = [], []
    for stream, text in parts:
        if keep >= len(text):
            front.append([stream, text])
            keep -= len(text)
        elif keep > 0:
            front.append([stream, text[:keep]])
            back.append([stream, text[keep:]])
            keep = 0
        else:
            back.append([stream, text])
    return front, back


class LiveOutput:
    """One followed command's output as the worker holds it: the chunker (fed by the thread
    that reads the pipes, drained by the job's thread) and the tail, under one lock."""

    def __init__(self, host: str, tail: int = TAIL, **chunker: Any):
        self.lock = threading.Lock()
        self.chunker = Chunker(host, **chunker)
        self.tail = Tail(tail)

    def add(self, stream: str, data: bytes) -> None:
        with self.lock:
            self.tail.add(data)
            self.chunker.add(stream, data)

    def take(self, now: float, last: bool = False) -> bytes | None:
        with self.lock:
            return self.chunker.take(now, last)

    def due(self, now: float) -> float:
        with self.lock:
            return self.chunker.due(now)

    def pending(self) -> bool:
        with self.lock:
            return bool(self.chunker.parts)

    @property
    def dropped(self) -> int:
        return self.chunker.dropped

    def snapshot(self) -> dict:
        """What the ``output`` control command answers about the running command."""
        with self.lock:
            return {"output": self.tail.text(), "bytes": self.tail.total, "cut": self.tail.cut,
                    "dropped": self.chunker.dropped, "host": self.chunker.host}


# The followed commands running in this process, by their Job (identity): the control
# thread's ``output`` command reads them. Only followed jobs are here.
_live: dict[int, tuple[Any, LiveOutput]] = {}
_live_lock = threading.Lock()


def register(job: Any, live: LiveOutput) -> None:
    with _live_lock:
        _live[id(job)] = (job, live)


def unregister(job: Any) -> None:
    with _live_lock:
        _live.pop(id(job), None)


def live_output(job: Any) -> LiveOutput | None:
    """The LiveOutput of ``job`` while it runs followed, else None."""
    with _live_lock:
        entry = _live.get(id(job))
    return entry[1] if entry is not None and entry[0] is job else None


class Chunk:
    """A chunk as a reader checked it (see ``parse_chunk``)."""

    __slots__ = ("host", "parts", "dropped")

    def __init__(self, host: str, parts: list[tuple[str, str]], dropped: int):
        self.host, self.parts, self.dropped = host, parts, dropped


def parse_chunk(raw: bytes) -> Chunk | None:
    """A WORK_DATA payload checked as a chunk, or None when it is not one (too big, not JSON,
    wrong shapes): it comes from whoever answers the job, so nothing is taken on trust."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) > MAX_CHUNK:
        return None
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    host, parts, dropped = obj.get("host"), obj.get("parts"), obj.get("dropped", 0)
    if not isinstance(host, str) or not host or len(host) > MAX_HOST:
        return None
    if isinstance(dropped, bool) or not isinstance(dropped, int) or not 0 <= dropped <= MAX_DROPPED:
        return None
    if not isinstance(parts, list) or len(parts) > MAX_PARTS:
        return None
    checked = []
    for part in parts:
        if (not isinstance(part, list) or len(part) != 2 or part[0] not in STREAMS
                or not isinstance(part[1], str)):
            return None
        checked.append((part[0], part[1]))
    return Chunk(host, checked, dropped)
