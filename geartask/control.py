"""Worker identity and remote control: the names the manager sends to and the worker answers.

Gearman hands a job to exactly one worker, so each worker *process* registers its own
control function, ``geartask.control:<name>:<ip>:<pid>``; a shutdown job sent there
reaches that process and no other. Each worker thread identifies itself to the server with
the client id ``<name>:<ip>:<pid>:<thread-index>``, which ``gearadmin --workers`` and
the manager show. ``<ip>`` is the local address of that very connection (what that server
sees), so one process may show a different IP to each server. The manager sends (``shutdown_request``), the worker handles
(``parse_command``): both halves of the contract live here.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass

from .errors import UsageError

CONTROL_PREFIX = "geartask.control"
COMMANDS = ("shutdown", "ping")


def check_name(name: str) -> str:
    if not name or any(c.isspace() or c == ":" for c in name):
        raise UsageError(f"worker name {name!r} must be non-empty, without spaces or ':'")
    return name


def host_ip(servers: list[tuple[str, int]] | None = None) -> str:
    """The address this host uses to reach the first job server (no packet is sent)."""
    host, port = (servers or [("127.0.0.1", 4730)])[0]
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


@dataclass(frozen=True)
class WorkerIdentity:
    name: str
    ip: str
    pid: int
    thread: int | None = None

    @property
    def client_id(self) -> str:
        return f"{self.name}:{self.ip}:{self.pid}:{self.thread}"

    @property
    def control_function(self) -> str:
        return f"{CONTROL_PREFIX}:{self.name}:{self.ip}:{self.pid}"

    def for_thread(self, index: int) -> "WorkerIdentity":
        return WorkerIdentity(self.name, self.ip, self.pid, index)

    def at(self, ip: str) -> "WorkerIdentity":
        """The same process (and thread) as seen from a connection whose local address is ``ip``."""
        return WorkerIdentity(self.name, ip, self.pid, self.thread)


def _is_number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also says yes to '²', which int() refuses (a peer chose it)."""
    return text.isascii() and text.isdigit()


def parse_client_id(text: str) -> WorkerIdentity | None:
    """'w1:10.0.0.5:1234:3' -> WorkerIdentity; None for a client id of another form."""
    parts = text.strip().split(":")
    if len(parts) != 4 or not parts[0] or not _is_number(parts[2]) or not _is_number(parts[3]):
        return None
    return WorkerIdentity(parts[0], parts[1], int(parts[2]), int(parts[3]))


def parse_control_function(function: str) -> WorkerIdentity | None:
    """'geartask.control:w1:10.0.0.5:1234' -> WorkerIdentity (thread None); None otherwise."""
    prefix = CONTROL_PREFIX + ":"
    if not function.startswith(prefix):
        return None
    parts = function[len(prefix):].split(":")
    if len(parts) != 3 or not parts[0] or not _is_number(parts[2]):
        return None
    return WorkerIdentity(parts[0], parts[1], int(parts[2]))


def shutdown_request(now: bool = False) -> bytes:
    """The payload of a shutdown control job; ``now`` skips the grace period."""
    return json.dumps({"command": "shutdown", "now": bool(now)}).encode()


def ping_request() -> bytes:
    """The payload of a ping control job, sent as a *foreground* job with a deadline.

    A live process answers at once (its control thread never runs jobs) with a JSON object:
    ``{"ok": true, "command": "ping", "worker": label, "name", "pid", "ips": [...],
    "threads", "busy", "jobs_done", "started": epoch seconds, "running": [{"handle",
    "task", "unique", "server", "seconds"}]}``. A process that does not answer within the
    deadline is *silent*: its host is cut off, frozen or gone. Being a foreground job, an
    unanswered ping vanishes from gearmand's queue when the asking client disconnects.
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


MAX_COMMAND_BYTES = 4096  # a control payload is a few dozen bytes; anything bigger is refused unread


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
    if not isinstance(cmd.get("now", False), bool):
        raise UsageError(f"control 'now' must be true or false, got {repr(cmd['now'])[:80]}")
    return cmd
