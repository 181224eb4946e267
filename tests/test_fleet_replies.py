"""The parsers of gearmand's admin replies (geartask.fleet.replies): pure, no gearmand.
tests/test_manager.py checks them against a real gearmand; these pin the edges."""

import pytest

from geartask.errors import ServerError
from geartask.fleet.replies import (QueuedJob, parse_show_jobs, parse_show_unique_jobs, parse_status, parse_version,
                                    parse_workers)


def test_show_jobs_lines_become_queued_jobs():
    jobs = parse_show_jobs(["H:host:1\t0\t0\t1", "H:host:22\t3\t1\t0"])
    assert jobs == [QueuedJob("H:host:1", 0, False, True), QueuedJob("H:host:22", 3, True, False)]


@pytest.mark.parametrize("line", ["H:host:1\t0\t0", "H:host:1\t0\t2\t1", "H host\t0\t0\t1", "x" * 65 + "\t0\t0\t1",
                                  "H:host:1\t-1\t0\t1", "H:host:1\t0\t0\t1\textra"])
def test_a_show_jobs_line_of_another_shape_is_refused(line):
    with pytest.raises(ServerError, match="malformed 'show jobs' reply .*not a gearmand"):
        parse_show_jobs(["H:host:9\t0\t0\t0", line])


def test_show_unique_jobs_drops_blank_lines():
    assert parse_show_unique_jobs(["a", "", "b c"]) == ["a", "b c"]


def test_version_is_checked():
    assert parse_version("OK 1.1.20") == "1.1.20"
    with pytest.raises(ServerError, match=r"127.0.0.1:1: not a gearmand: it answered 'HTTP/1.1 400' to 'version'"):
        parse_version("HTTP/1.1 400", "127.0.0.1:1")


def test_status_reads_numbers_from_the_end_of_a_name_with_tabs_and_newlines():
    [f] = parse_status(["we\tird", "name\t5\t2\t1"])
    assert (f.function, f.total, f.running, f.queued, f.workers) == ("we\tird\nname", 5, 2, 3, 1)
    with pytest.raises(ServerError, match="malformed 'status' reply"):
        parse_status(["no numbers here"])


def test_workers_lines_continue_across_newlines_and_parse_geartask_client_ids():
    [w] = parse_workers(["12 127.0.0.1 w1:10.0.0.5:4242:3 : fn1 fn", "2"])
    assert (w.fd, w.ip, w.name, w.worker_ip, w.pid, w.thread, w.functions) == \
        (12, "127.0.0.1", "w1", "10.0.0.5", 4242, 3, ["fn1", "fn\n2"])
    with pytest.raises(ServerError, match="malformed 'workers' reply"):
        parse_workers(["12 127.0.0.1 no-colon-here"])
