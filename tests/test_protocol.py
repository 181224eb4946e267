"""geartask's own packet codec must match pygearman's, byte for byte, on every command."""

from __future__ import annotations

import gearman.protocol as pg
import pytest

from geartask import gearman as gp

COMMANDS = [c for c in pg.GEARMAN_PARAMS_FOR_COMMAND if c != pg.GEARMAN_COMMAND_TEXT_COMMAND]


def sample_args(cmd: int) -> dict[str, bytes]:
    params = pg.GEARMAN_PARAMS_FOR_COMMAND[cmd]
    # every argument but the last is NUL-free; the last (the payload) may hold anything
    return {p: (f"{p}-{i}".encode() if i < len(params) - 1 else b"pay\x00load \xff")
            for i, p in enumerate(params)}


@pytest.mark.parametrize("cmd", COMMANDS, ids=gp.command_name)
def test_pack_matches_pygearman(cmd):
    args = sample_args(cmd)
    assert gp.pack(cmd, **args) == pg.pack_binary_command(cmd, args, is_response=False)


@pytest.mark.parametrize("cmd", COMMANDS, ids=gp.command_name)
def test_parse_matches_pygearman(cmd):
    args = sample_args(cmd)
    raw = pg.pack_binary_command(cmd, args, is_response=True)
    expected_cmd, expected_args, expected_size = pg.parse_binary_command(memoryview(bytearray(raw)),
                                                                         is_response=True)
    assert gp.parse_response(bytearray(raw) + b"\0\0\0") == (expected_cmd, expected_args, expected_size)
    assert gp.parse_response(bytearray(raw[:-1])) is None  # incomplete: wait for more


def test_pack_encodes_str_and_int_and_refuses_bad_arguments():
    assert gp.pack(gp.CAN_DO, task="eg.reverse") == gp.pack(gp.CAN_DO, task=b"eg.reverse")
    assert gp.pack(gp.WORK_STATUS, job_handle="H:1", numerator=3, denominator=10) == \
        pg.pack_binary_command(gp.WORK_STATUS, {"job_handle": b"H:1", "numerator": b"3", "denominator": b"10"})
    with pytest.raises(pg.ProtocolError):
        gp.pack(gp.CAN_DO)  # missing argument
    with pytest.raises(pg.ProtocolError):
        gp.pack(gp.submit_command("normal", True),
                task=b"a\0b", unique=b"u", data=b"d")  # NUL inside a non-final argument


def test_submit_job_epoch_is_held_until_its_time_and_coalesced(fresh_gearmand):
    """gearmand 1.1 holds a SUBMIT_JOB_EPOCH job until its Unix time; a second submission of the
    same unique while it is held gets the same job (the scheduler relies on both)."""
    import time

    from geartask import gearman as gp

    conn = gp.Connection(fresh_gearmand.host, fresh_gearmand.port).connect()
    worker = gp.Connection(fresh_gearmand.host, fresh_gearmand.port).connect()
    try:
        when = int(time.time()) + 3
        handles = []
        for _ in range(2):
            conn.send(gp.SUBMIT_JOB_EPOCH, task="t.epoch", unique="slot-1", epoch=when, data=b"x")
            handles.append(conn.expect(gp.JOB_CREATED, 5).text("job_handle"))
        assert handles[0] == handles[1]
        worker.send(gp.CAN_DO, task="t.epoch")
        worker.send(gp.GRAB_JOB_UNIQ)
        assert worker.expect({gp.JOB_ASSIGN_UNIQ, gp.NO_JOB}, 5).cmd == gp.NO_JOB  # not yet
        deadline = time.monotonic() + 10
        while True:
            worker.send(gp.GRAB_JOB_UNIQ)
            pkt = worker.expect({gp.JOB_ASSIGN_UNIQ, gp.NO_JOB}, 5)
            if pkt.cmd == gp.JOB_ASSIGN_UNIQ:
                break
            assert time.monotonic() < deadline, "the epoch job never came"
            time.sleep(0.2)
        assert time.time() >= when - 1 and pkt.text("unique") == "slot-1"
    finally:
        conn.close()
        worker.close()
