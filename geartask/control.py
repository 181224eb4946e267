"""Worker identity and remote control: the names the manager sends to and the worker answers.

Each worker process registers its own control function, ``geartask.control:<name>:<ip>:<pid>``
(Gearman hands a job to exactly one worker); each thread's client id is
``<name>:<ip>:<pid>:<thread-index>``, ``<ip>`` being what that server sees (an IPv6 address
bracketed, ``w1:[::1]:1234:0``), followed by ``:<fleet>`` when the config names one (``fleet``).
Both are written by WorkerIdentity and read by parse_client_id/parse_control_function only.
The send side of each control command is here (``*_request``, ``parse_command``); the worker's side is
geartask.worker.control. docs/worker.md#control-commands describes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .address import format_host, split_fields, unbracket
from .errors import UsageError

CONTROL_PREFIX = "geartask.control"
COMMANDS = ("shutdown", "ping", "stop", "output")


def check_name(name: str) -> str:
    if not name or any(c.isspace() or c == ":" for c in name):
        raise UsageError(f"worker name {name!r} must be non-empty, without spaces or ':'")
    return name


MAX_FLEET = 64


def check_fleet(fleet: str) -> str:
    """A fleet name: printable, without spaces or ':' (it ends the client id), at most MAX_FLEET."""
    if (not isinstance(fleet, str) or not fleet or len(fleet) > MAX_FLEET or not fleet.isprintable()
            or any(c.isspace() or c == ":" for c in fleet)):
        raise UsageError(f"fleet name {str(fleet)[:80]!r} must be 1-{MAX_FLEET} printable characters, "
                         "without spaces or ':'")
    return fleet


@dataclass(frozen=True)
class WorkerIdentity:
    name: str
    ip: str
    pid: int
    thread: int | None = None
    fleet: str = ""  # the config's ``fleet``; "" none

    @property
    def client_id(self) -> str:
        return f"{self.name}:{format_host(self.ip)}:{self.pid}:{self.thread}" + (f":{self.fleet}" if self.fleet else "")

    @property
    def control_function(self) -> str:
        return f"{CONTROL_PREFIX}:{self.name}:{format_host(self.ip)}:{self.pid}"

    def for_thread(self, index: int) -> "WorkerIdentity":
        return WorkerIdentity(self.name, self.ip, self.pid, index, self.fleet)

    def at(self, ip: str) -> "WorkerIdentity":
        """The same process (and thread) as seen from a connection whose local address is ``ip``."""
        return WorkerIdentity(self.name, ip, self.pid, self.thread, self.fleet)


def _is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also says yes to '²', which int() refuses (a peer chose it)."""
    return text.isascii() and text.isdigit()


def parse_client_id(text: str) -> WorkerIdentity | None:
    """'w1:10.0.0.5:1234:3' or 'w1:[::1]:1234:3' (or with ':FLEET' after it) -> WorkerIdentity
    (its ip unbracketed); None for a client id of another form."""
    parts = split_fields(text.strip())
    fleet = ""
    if len(parts) == 5:  # a fleet's worker
        fleet = parts.pop()
        try:
            check_fleet(fleet)
        except UsageError:
            return None
    if len(parts) != 4 or not parts[0] or not _is_number(parts[2]) or not _is_number(parts[3]):
        return None
    ip = unbracket(parts[1])
    if ip is None:
        return None
    return WorkerIdentity(parts[0], ip, int(parts[2]), int(parts[3]), fleet)


def parse_control_function(function: str) -> WorkerIdentity | None:
    """'geartask.control:w1:10.0.0.5:1234' -> WorkerIdentity (thread None); None otherwise."""
    prefix = CONTROL_PREFIX + ":"
    if not function.startswith(prefix):
        return None
    parts = split_fields(function[len(prefix):])
    if len(parts) != 3 or not parts[0] or not _is_number(parts[2]):
        return None
    ip = unbracket(parts[1])
    if ip is None:
        return None
    return WorkerIdentity(parts[0], ip, int(parts[2]))


def shutdown_request(now: bool = False) -> bytes:
    """The payload of a shutdown control job; ``now`` skips the grace period."""
    return json.dumps({"command": "shutdown", "now": bool(now)}).encode()


def ping_request() -> bytes:
    """The payload of a ping control job, sent as a *foreground* job with a deadline.

    A live process answers at once (its control thread never runs jobs) with a JSON object:
    ``{"ok": true, "command": "ping", "worker": label, "name", "fleet" ("" none), "pid", "ips": [...],
    "threads", "busy" (threads running a job now), "jobs_done", "started": epoch seconds,
    "running": [{"handle", "task", "unique", "server", "seconds"}], "dedicated": {task:
    threads}, "max_jobs" (0: none), "host" (worker.host), "labels", "tasks": {task: {"complete", "failed", "retried",
    "seconds_sum", "buckets": {"0.005": n, ..., "+Inf": n}}}}``: counters since the process
    started, ``buckets`` a cumulative histogram of job durations (Prometheus "le" bounds,
    geartask.worker.stats.BOUNDS). A process that does not answer within the deadline is
    *silent*: its host is cut off, frozen or gone.

    An unanswered foreground ping is *not* removed when the asking client disconnects:
    gearmand keeps it, marked "ignored", and counts it in the function's queue until a grab
    of that process skips it. So every ping is sent with one shared unique key (the
    manager's PING_UNIQUE): gearmand coalesces the next ping with a waiting one, leaving at
    most one such job per silent process however often anyone asks.
    """
    return json.dumps({"command": "ping"}).encode()


def stop_request(handle: str, server: str | None = None) -> bytes:
    """The payload of a stop control job: end the running job ``handle`` (of job server
    ``server``, "host:port" as the worker's config names it, when handles may clash).

    The worker kills a shell command's process group or an isolated task's child, abandons a
    plugin task as its watchdog does, and fails the job with "stopped by operator" (not
    retried). It answers ``{"ok": true, "command": "stop", "worker": label, "handle": H,
    "stopped": true|false}``: false when that process does not run the job.
    """
    cmd: dict = {"command": "stop", "handle": handle}
    if server is not None:
        cmd["server"] = server
    return json.dumps(cmd).encode()


def output_request(handle: str, server: str | None = None) -> bytes:
    """The payload of an output control job: the recent output of the running job ``handle``
    (of job server ``server``, as for ``stop``), when it runs followed (``"follow": true``).

    The worker answers ``{"ok": true, "command": "output", "worker": label, "handle": H,
    "running": true|false, "live": true|false, "output": text (the last 64 KiB), "bytes": N
    (written so far), "cut": bool, "dropped": N (bytes not streamed), "host": name}``; ``live``
    false (and no output) for a job that runs unfollowed. The dashboard's Job page polls it.
    """
    cmd: dict = {"command": "output", "handle": handle}
    if server is not None:
        cmd["server"] = server
    return json.dumps(cmd).encode()


def signed_request(payload: bytes, function: str, key=None) -> bytes:
    """A control job's payload (``*_request``) as it is sent to ``function`` (the worker's
    control function): addressed to it (``"to"``), and signed for ``control`` with ``key``
    (``geartask.trust.keys.signing_key(config)``, built once per process) when there is one.

    A worker with ``security.require_signed`` obeys only a command signed by a signer whose
    ``may`` holds ``control`` and addressed to its own control function (a signed command
    can't be replayed at another worker); without a key the payload goes unsigned, which
    such a worker refuses ("control refused: unsigned").
    """
    cmd = json.loads(payload)
    cmd["to"] = function
    body = json.dumps(cmd).encode()
    if key is None:
        return body
    from .trust.signing import sign_message
    return sign_message("control", body, key)


MAX_COMMAND_BYTES = 4096  # a control payload is a few dozen bytes; anything bigger is refused unread
MAX_HANDLE = 1024  # characters of a job handle or server address in a stop command


def parse_command(raw: bytes) -> dict:
    """Validate a control job's payload; UsageError names what is wrong (never anything else:
    anyone who reaches a job server can send one, and it must not disable the control thread)."""
    if len(raw) > MAX_COMMAND_BYTES:
        raise UsageError(f"control payload of {len(raw)} bytes refused (at most {MAX_COMMAND_BYTES})")
    try:
        cmd = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise UsageError(f"control payload is not JSON: {raw[:80]!r}") from None
    if not isinstance(cmd, dict) or cmd.get("command") not in COMMANDS:
        shown = repr(cmd.get("command") if isinstance(cmd, dict) else cmd)[:80]
        raise UsageError(f"unknown control command {shown}; known: {', '.join(COMMANDS)}")
    if "to" in cmd and (not isinstance(cmd["to"], str) or len(cmd["to"]) > MAX_HANDLE):
        raise UsageError(f"control 'to' must be a control function name, got {repr(cmd['to'])[:80]}")
    if not isinstance(cmd.get("now", False), bool):
        raise UsageError(f"control 'now' must be true or false, got {repr(cmd['now'])[:80]}")
    if cmd["command"] in ("stop", "output"):
        for key, required in (("handle", True), ("server", False)):
            value = cmd.get(key)
            if value is None and not required:
                continue
            if not isinstance(value, str) or not value or len(value) > MAX_HANDLE:
                raise UsageError(f"control '{cmd['command']}' needs '{key}' as a non-empty string of at most "
                                 f"{MAX_HANDLE} characters, got {repr(value)[:80]}")
    return cmd
