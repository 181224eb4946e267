"""Gearman's binary packets: command numbers, the codec, and the error text of an ERROR packet.

pygearman is imported only here (its command table and parameter names); see the package's
docstring for why we drive the sockets ourselves.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import gearman.protocol as gp
from gearman.errors import ProtocolError

# Command numbers, named once for the rest of geartask.
CAN_DO = gp.GEARMAN_COMMAND_CAN_DO
CANT_DO = gp.GEARMAN_COMMAND_CANT_DO
RESET_ABILITIES = gp.GEARMAN_COMMAND_RESET_ABILITIES
PRE_SLEEP = gp.GEARMAN_COMMAND_PRE_SLEEP
NOOP = gp.GEARMAN_COMMAND_NOOP
JOB_CREATED = gp.GEARMAN_COMMAND_JOB_CREATED
GRAB_JOB = gp.GEARMAN_COMMAND_GRAB_JOB
GRAB_JOB_UNIQ = gp.GEARMAN_COMMAND_GRAB_JOB_UNIQ
NO_JOB = gp.GEARMAN_COMMAND_NO_JOB
JOB_ASSIGN = gp.GEARMAN_COMMAND_JOB_ASSIGN
JOB_ASSIGN_UNIQ = gp.GEARMAN_COMMAND_JOB_ASSIGN_UNIQ
WORK_STATUS = gp.GEARMAN_COMMAND_WORK_STATUS
WORK_COMPLETE = gp.GEARMAN_COMMAND_WORK_COMPLETE
WORK_FAIL = gp.GEARMAN_COMMAND_WORK_FAIL
WORK_EXCEPTION = gp.GEARMAN_COMMAND_WORK_EXCEPTION
WORK_DATA = gp.GEARMAN_COMMAND_WORK_DATA
WORK_WARNING = gp.GEARMAN_COMMAND_WORK_WARNING
GET_STATUS = gp.GEARMAN_COMMAND_GET_STATUS
STATUS_RES = gp.GEARMAN_COMMAND_STATUS_RES
ECHO_REQ = gp.GEARMAN_COMMAND_ECHO_REQ
ECHO_RES = gp.GEARMAN_COMMAND_ECHO_RES
ERROR = gp.GEARMAN_COMMAND_ERROR
SET_CLIENT_ID = gp.GEARMAN_COMMAND_SET_CLIENT_ID
OPTION_REQ = gp.GEARMAN_COMMAND_OPTION_REQ
OPTION_RES = gp.GEARMAN_COMMAND_OPTION_RES

# (priority, background) -> SUBMIT_JOB* command
_SUBMIT = {
    ("normal", False): gp.GEARMAN_COMMAND_SUBMIT_JOB,
    ("low", False): gp.GEARMAN_COMMAND_SUBMIT_JOB_LOW,
    ("high", False): gp.GEARMAN_COMMAND_SUBMIT_JOB_HIGH,
    ("normal", True): gp.GEARMAN_COMMAND_SUBMIT_JOB_BG,
    ("low", True): gp.GEARMAN_COMMAND_SUBMIT_JOB_LOW_BG,
    ("high", True): gp.GEARMAN_COMMAND_SUBMIT_JOB_HIGH_BG,
}


def submit_command(priority: str = "normal", background: bool = False) -> int:
    return _SUBMIT[(priority, background)]


def command_name(cmd: int) -> str:
    return str(gp.get_command_name(cmd)).replace("GEARMAN_COMMAND_", "")


def to_bytes(value: Any) -> bytes:
    """Everything on the wire is bytes; str is UTF-8, numbers are their decimal text."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return str(value).encode("utf-8")


def to_text(value: bytes | str) -> str:
    return value if isinstance(value, str) else value.decode("utf-8", errors="replace")


@dataclass
class Packet:
    """One binary response from the server; ``args`` keys are pygearman's parameter names."""

    cmd: int
    args: dict[str, bytes]

    @property
    def name(self) -> str:
        return command_name(self.cmd)

    def __getitem__(self, key: str) -> bytes:
        return self.args[key]

    def text(self, key: str) -> str:
        return to_text(self.args[key])


# The packet codec is on every job's path (a worker packs a result and parses an assignment
# per job, a sender the reverse). pygearman's pack_binary_command/parse_binary_command cost
# several microseconds each in set building, format strings and copies; these do the same
# checks against pygearman's own parameter table, with one precompiled struct.
_HEADER = struct.Struct("!4sII")
# SUBMIT_JOB_EPOCH (36): a background job that gearmand holds until a Unix time (gearmand 1.1
# keeps it in its persistent queue too); pygearman's table lacks it.
SUBMIT_JOB_EPOCH = 36
_PARAMS = {**gp.GEARMAN_PARAMS_FOR_COMMAND, SUBMIT_JOB_EPOCH: ["task", "unique", "epoch", "data"]}
_NUL = b"\0"
_PARAM_SETS = {cmd: frozenset(params) for cmd, params in _PARAMS.items()}


def pack(cmd: int, **args: Any) -> bytes:
    """A request packet; str/int arguments are encoded (pygearman insists on bytes)."""
    params = _PARAMS.get(cmd)
    if params is None or cmd == gp.GEARMAN_COMMAND_TEXT_COMMAND:
        raise ProtocolError(f"Received unknown binary command: {gp.get_command_name(cmd)}")
    if args.keys() != _PARAM_SETS[cmd]:
        raise ProtocolError(f"Received arguments did not match expected arguments: "
                               f"{set(params)!r} != {set(args)!r}")
    items = [v if type(v) is bytes else to_bytes(v) for v in map(args.__getitem__, params)]
    for a in items[:-1]:
        if _NUL in a:
            raise ProtocolError("Received arguments with NULL byte in non-final argument")
    payload = _NUL.join(items)
    return _HEADER.pack(gp.MAGIC_REQ_STRING, cmd, len(payload)) + payload


def parse_response(buf: bytes | bytearray) -> tuple[int, dict[str, bytes], int] | None:
    """(command, arguments, size) of the server packet at the start of ``buf``; None while
    it is incomplete. Raises pygearman's ProtocolError on a malformed packet."""
    if len(buf) < gp.COMMAND_HEADER_SIZE:
        return None
    magic, cmd, length = _HEADER.unpack_from(buf)
    if magic != gp.MAGIC_RES_STRING:
        raise ProtocolError("Malformed Magic")
    params = _PARAMS.get(cmd)
    if params is None or cmd == gp.GEARMAN_COMMAND_TEXT_COMMAND:
        raise ProtocolError(f"Received unknown binary command: {cmd}")
    size = gp.COMMAND_HEADER_SIZE + length
    if len(buf) < size:
        return None
    if not params:
        if length:
            raise ProtocolError(f"Expected no binary payload: {gp.get_command_name(cmd)}")
        return cmd, {}, size
    parts = bytes(buf[gp.COMMAND_HEADER_SIZE:size]).split(_NUL, len(params) - 1)
    if len(parts) != len(params):
        raise ProtocolError(f"Received {len(parts)} argument(s), expecting {len(params)} "
                               f"argument(s): {gp.get_command_name(cmd)}")
    return cmd, dict(zip(params, parts, strict=True)), size


HEADER = _HEADER  # magic, command, body length: the one copy of a packet header's layout
HEADER_SIZE = gp.COMMAND_HEADER_SIZE
MAGIC_REQ = gp.MAGIC_REQ_STRING
MAGIC_RES = gp.MAGIC_RES_STRING


def error_text(pkt: Packet) -> str:
    """What an ERROR packet says, as every geartask message words it."""
    return f"server error {pkt.text('error_code')}: {pkt.text('error_text')}"


def response_bytes(cmd: int, payload: bytes) -> bytes:
    """How a server packet with one argument looks on the wire (to find an expected answer)."""
    return _HEADER.pack(gp.MAGIC_RES_STRING, cmd, len(payload)) + payload


def fail_packets(handle: bytes | str, reason: bytes) -> bytes:
    """WORK_WARNING with the reason, then WORK_FAIL: every waiting client hears why, and
    gearmand drops the job (and its persistent-queue row)."""
    return pack(WORK_WARNING, job_handle=handle, data=reason) + pack(WORK_FAIL, job_handle=handle)
