"""The live-output pieces on their own, with a fake clock: the chunker's rate and caps, the tail,
the chunk check, and the sender's printer (geartask.shell.stream, geartask.sender.follow)."""

from __future__ import annotations

import io
import json

import pytest

from geartask.sender.follow import FollowPrinter
from geartask.shell.stream import (INTERVAL, MAX_CHUNK, PENDING, TAIL, Chunker, Tail, parse_chunk)


def decoded(chunk: bytes) -> dict:
    assert len(chunk) <= MAX_CHUNK
    return json.loads(chunk)


def test_one_chunk_per_interval_with_everything_written_in_order():
    c = Chunker("web3")
    c.add("stdout", b"one\n")
    c.add("stderr", b"oops\n")
    c.add("stdout", b"two\n")
    first = decoded(c.take(100.0))
    assert first == {"host": "web3", "parts": [["stdout", "one\n"], ["stderr", "oops\n"], ["stdout", "two\n"]],
                     "dropped": 0}
    c.add("stdout", b"three\n")
    assert c.take(100.0 + INTERVAL / 2) is None  # too soon: it waits
    assert c.due(100.0 + INTERVAL / 2) == pytest.approx(INTERVAL / 2)
    assert decoded(c.take(100.0 + INTERVAL))["parts"] == [["stdout", "three\n"]]
    assert c.take(200.0) is None  # nothing to say


def test_an_endless_writer_is_capped_and_the_drop_counted():
    """A second of a flood at the fake clock's pace: at most 10 chunks, each within the cap,
    every byte either sent or counted as dropped, and the newest lines are the ones kept."""
    c = Chunker("h")
    line = b"x" * 99 + b"\n"
    written = sent_text = 0
    chunks = []
    now = 0.0
    for _ in range(1000):  # 1 ms apart: 1000 writes of 10 KB = 10 MB in one second
        c.add("stdout", line * 100)
        written += 100 * len(line)
        chunk = c.take(now)
        if chunk is not None:
            chunks.append(decoded(chunk))
        now += 0.001
    chunk = c.take(now + INTERVAL, last=True)
    chunks.append(decoded(chunk))
    assert len(chunks) <= 1 / INTERVAL + 2
    sent_text = sum(len(t) for ch in chunks for _, t in ch["parts"])
    dropped = chunks[-1]["dropped"]
    assert dropped == c.dropped and written == sent_text + dropped
    assert sent_text <= len(chunks) * PENDING
    assert all(ch["parts"][0][1].startswith("x") and ch["parts"][0][1].endswith("\n") for ch in chunks)
    assert [ch["dropped"] for ch in chunks] == sorted(ch["dropped"] for ch in chunks)  # it only grows


def test_after_a_gap_the_chunk_starts_at_a_line_and_ends_with_the_newest_output():
    c = Chunker("h", pending=20)
    c.add("stdout", b"aaaaaaaaa\n")  # 10
    c.add("stdout", b"bbbbbbbbb\n")  # 20: full
    c.add("stdout", b"cccc\ndd\n")  # 8 more: the oldest 8 go, and the rest of their line
    got = decoded(c.take(0.0))
    assert got["parts"] == [["stdout", "bbbbbbbbb\ncccc\ndd\n"]]
    assert got["dropped"] == 10
    c.add("stderr", b"e" * 25)  # more than it holds at once, without a line end: its newest 20
    got = decoded(c.take(1.0))
    assert got["parts"] == [["stderr", "e" * 20]] and got["dropped"] == 15


def test_a_chunk_of_control_characters_stays_under_the_cap():
    """JSON writes a control character as 6 bytes: the chunk is split, nothing is lost."""
    c = Chunker("h")
    c.add("stdout", b"\x01" * PENDING)
    sizes, text = [], ""
    now = 0.0
    while True:
        chunk = c.take(now)
        if chunk is None and not c.parts:
            break
        if chunk is not None:
            sizes.append(len(chunk))
            text += "".join(t for _, t in decoded(chunk)["parts"])
        now += INTERVAL
    assert max(sizes) <= MAX_CHUNK and len(sizes) > 1
    assert text == "\x01" * PENDING and c.dropped == 0


def test_a_character_split_between_reads_is_not_garbled():
    c = Chunker("h")
    c.add("stdout", "é".encode()[:1])
    first = c.take(0.0)
    assert first is None  # only half a character so far: nothing to say yet
    c.add("stdout", "é".encode()[1:] + b"\n")
    assert decoded(c.take(1.0))["parts"] == [["stdout", "é\n"]]
    c.add("stderr", b"\xff")  # not UTF-8 at all: replaced, at the end at the latest
    assert decoded(c.take(2.0, last=True))["parts"] == [["stderr", "\ufffd"]]


def test_tail_keeps_the_last_bytes_and_the_total():
    t = Tail(10)
    for i in range(100):
        t.add(b"%03d" % i)
    assert t.bytes() == b"".join(b"%03d" % i for i in range(100))[-10:]
    assert t.total == 300 and t.cut
    t2 = Tail(4)
    t2.add("aé".encode() + b"bcd")  # keeps 0xa9 'bcd': the half character is left out
    assert t2.text() == "bcd"
    big = Tail(TAIL)
    big.add(b"y" * (3 * TAIL))
    assert len(big.bytes()) == TAIL and len(big.buf) <= 2 * TAIL


@pytest.mark.parametrize("raw", [
    b"not json", b"[]", b'{"parts": [], "dropped": 0}',
    b'{"host": "", "parts": [], "dropped": 0}',
    b'{"host": "h", "parts": [["stdin", "x"]], "dropped": 0}',
    b'{"host": "h", "parts": [["stdout", 5]], "dropped": 0}',
    b'{"host": "h", "parts": [["stdout", "x", "y"]], "dropped": 0}',
    b'{"host": "h", "parts": [], "dropped": -1}',
    b'{"host": "h", "parts": [], "dropped": true}',
    b'{"host": "h", "parts": {}, "dropped": 0}',
    b'{"host": "' + b"h" * 300 + b'", "parts": [], "dropped": 0}',
    b'{"host": "h", "parts": [["stdout", "' + b"x" * MAX_CHUNK + b'"]], "dropped": 0}',
    b"[" * 100_000,
])
def test_parse_chunk_refuses_what_is_not_a_chunk(raw):
    assert parse_chunk(raw) is None


def printer_output(feed) -> list[str]:
    out = io.StringIO()
    clock = [0.0]
    p = FollowPrinter(out, clock=lambda: clock[0])
    feed(p, clock)
    return out.getvalue().splitlines()


def chunk(host: str, *parts, dropped: int = 0) -> bytes:
    return json.dumps({"host": host, "parts": [list(p) for p in parts], "dropped": dropped}).encode()


def test_printer_interleaves_jobs_and_holds_partial_lines_per_job_and_stream():
    def feed(p, clock):
        p.feed("a", chunk("web1", ("stdout", "hel"), ("stderr", "warn")))
        p.feed("b", chunk("web2", ("stdout", "b1\nb")))
        p.feed("a", chunk("web1", ("stdout", "lo\nnext"), ("stderr", "ing\n")))
        p.end("b")
        p.end("a")
    assert printer_output(feed) == ["web2 | b1", "web1 | hello", "web1 |! warning", "web2 | b", "web1 | next"]


def test_printer_escapes_what_a_peer_sent_and_reports_drops_and_bad_chunks():
    def feed(p, clock):
        p.feed("a", chunk("evil\x1b[2J", ("stdout", "ok\x1b]0;pwned\x07\n")))
        p.feed("a", b"garbage")
        p.feed("a", chunk("other-host", ("stdout", "cut off"), dropped=0))
        p.feed("a", chunk("x", ("stdout", "after the gap\n"), dropped=5000))
        clock[0] += 0.1
        p.feed("a", chunk("x", ("stdout", "more\n"), dropped=9000))  # noted once a second, not per chunk
        p.end("a")
    lines = printer_output(feed)
    assert "\x1b" not in "".join(lines) and "\x07" not in "".join(lines)
    host = "evil\\x1b[2J"  # the first good chunk's host, escaped
    assert lines[0] == f"{host} | ok\\x1b]0;pwned\\x07"
    assert lines[1] == f"{host} | cut off"  # the held line ends at the gap
    assert lines[2].startswith(f"{host} |# 5000 bytes of output dropped so far")
    assert lines[3:5] == [f"{host} | after the gap", f"{host} | more"]
    assert lines[5].startswith(f"{host} |# 9000 bytes of output were not streamed")
    assert lines[6] == f"{host} |# 1 malformed output chunk(s) ignored"
    assert len(lines) == 7


def test_printer_splits_a_line_that_never_ends():
    from geartask.sender.follow import MAX_LINE

    def feed(p, clock):
        for _ in range(5):
            p.feed("a", chunk("h", ("stdout", "z" * (MAX_LINE // 2))))
        p.end("a")
    lines = printer_output(feed)
    assert [len(line) for line in lines] == [len("h | ") + MAX_LINE] * 2 + [len("h | ") + MAX_LINE // 2]


@pytest.mark.parametrize("follow", ["yes", 1, None, [True]])
def test_the_shell_task_refuses_a_follow_that_is_not_true_or_false(follow):
    from geartask.config import ShellConfig, WorkerConfig
    from geartask.errors import JobRejected
    from geartask.shell.task import ShellTask
    task = ShellTask(WorkerConfig(shell=ShellConfig(allow=["sh"])), "w")
    assert task.check({"cmd": ["sh", "-c", "true"], "follow": True})["follow"] is True
    assert task.check({"cmd": ["sh", "-c", "true"]})["follow"] is False
    with pytest.raises(JobRejected, match="'follow' must be true or false"):
        task.check({"cmd": ["sh", "-c", "true"], "follow": follow})


def test_the_output_control_command_needs_a_handle():
    from geartask.control import output_request, parse_command
    from geartask.errors import UsageError
    assert parse_command(output_request("H:gm:1", "127.0.0.1:4730")) == {
        "command": "output", "handle": "H:gm:1", "server": "127.0.0.1:4730"}
    for bad in (b'{"command": "output"}', b'{"command": "output", "handle": 5}',
                b'{"command": "output", "handle": "H", "server": ""}'):
        with pytest.raises(UsageError, match="control 'output' needs"):
            parse_command(bad)


def test_half_a_character_before_a_gap_is_not_glued_to_what_follows():
    c = Chunker("h", pending=10)
    c.add("stdout", "é".encode()[:1])
    assert c.take(0.0) is None  # held by the decoder: the rest may come
    c.add("stdout", b"x" * 30 + b"\nnewest\n")  # a flood: the rest of that character is lost
    got = decoded(c.take(1.0))
    assert got["parts"] == [["stdout", "newest\n"]] and got["dropped"] == 31


def test_a_stream_that_lost_all_its_waiting_bytes_starts_clean_in_a_later_chunk():
    c = Chunker("h", pending=10)
    c.add("stdout", "é".encode()[:1])
    assert c.take(0.0) is None
    c.add("stdout", b"zzzz")
    c.add("stderr", b"e" * 10)  # pushes out all of stdout's waiting bytes
    assert decoded(c.take(1.0))["parts"] == [["stderr", "e" * 10]]
    c.add("stdout", b"ok\n")
    assert decoded(c.take(2.0)) == {"host": "h", "parts": [["stdout", "ok\n"]], "dropped": 4}


def test_text_put_back_after_a_split_comes_before_a_character_still_being_decoded():
    c = Chunker("h")
    c.add("stdout", b"\x01" * 20_000 + "é".encode()[:1])  # 120 KB as JSON: split in two
    first = decoded(c.take(0.0))
    c.add("stdout", "é".encode()[1:] + b"\n")
    second = decoded(c.take(1.0))
    text = "".join(t for ch in (first, second) for _, t in ch["parts"])
    assert text == "\x01" * 20_000 + "é\n" and second["dropped"] == 0
