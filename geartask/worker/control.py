"""The worker's side of the control commands (the sender's side: geartask.control)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from .. import gearman as gp
from ..control import WorkerIdentity, parse_command, parse_control_function
from ..errors import UsageError
from ..jobs import encode_payload
from ..logs import get_logger, job_context
from ..trust.policy import Refused

from .budget import UNLIMITED
from .dead_letters import cap_text
from .grab import GrabLoop, Link
from .job import STOPPED_BY_OPERATOR, failure_packets
from .stats import summarize

if TYPE_CHECKING:
    from .process import WorkerProcess

log = get_logger("geartask.worker")


class ControlLoop(GrabLoop):
    """Serves only this process's control function (registered per connection, under the IP
    that server sees): ping, shutdown and stop, each answered at once by its handler below."""

    def __init__(self, process: WorkerProcess, *args, **kwargs):
        super().__init__(process, *args, **kwargs)
        self.worker = process  # the handlers act on the whole process, not only the Host a grab loop needs
        self.budget = UNLIMITED  # control jobs are not jobs: worker.max_jobs does not count them
        self.refused = 0  # control jobs refused for their signature (security.require_signed)

    def abilities_at(self, identity: WorkerIdentity) -> list[str]:
        return [identity.control_function]

    def _serve(self, link: Link, pkt: gp.Packet, handle: str) -> bytes:
        function = parse_control_function(pkt.text("task"))
        if function is None or (function.name, function.pid) != (self.identity.name, self.identity.pid):
            return failure_packets(handle, {"error": f"not this worker's control function: "
                                                     f"{cap_text(pkt.text('task'), 200)!r}"})
        trust = self.process.runner.trust
        try:
            signer, body = trust.control(pkt["data"])
        except Refused as e:
            return self._refuse(link, handle, e.reason)
        try:
            cmd = parse_command(body)
        except UsageError as e:
            log.warning("bad control job", error=str(e), server=link.conn.address)
            return failure_packets(handle, {"error": str(e)})
        # A command may name the control function it is for ("to"); a signed one must, so that
        # it can't be replayed at another worker within max_job_age.
        to = cmd.get("to")
        if to is not None and to != pkt.text("task"):
            return self._refuse(link, handle, "addressed to another worker")
        if trust.require_signed and to is None:
            return self._refuse(link, handle, "not addressed to this worker ('to' missing)")
        return HANDLERS[cmd["command"]](self.worker, cmd, link, handle)

    def _refuse(self, link: Link, handle: str, reason: str) -> bytes:
        """A control job that must not be obeyed: answered with the refusal, logged, counted."""
        self.refused += 1
        log.warning("control job refused", reason=reason, server=link.conn.address, refused=self.refused)
        return failure_packets(handle, {"error": f"control refused: {reason}", "refused": True})


def _reply(handle: str, answer: dict) -> bytes:
    return gp.pack(gp.WORK_COMPLETE, job_handle=handle, data=encode_payload(answer))


def handle_ping(process: "WorkerProcess", cmd: dict, link: Link, handle: str) -> bytes:
    """Answer with what the process is and does (the contract: geartask.control.ping_request)."""
    return _reply(handle, ping_reply(process))


def ping_reply(process: "WorkerProcess") -> dict:
    now = time.monotonic()
    running = [{"handle": job.handle, "task": job.task, "unique": job.unique, "server": job.server,
                "seconds": round(now - job.started, 3)} for _, job in process.running()]
    return {"ok": True, "command": "ping", "worker": process.label, "name": process.name,
            "fleet": process.identity.fleet,
            "pid": process.identity.pid, "ips": sorted(process.ips), "threads": process.threads_wanted,
            "busy": len(running), "jobs_done": sum(t.jobs_done for t in list(process.job_threads)),
            "started": round(process.started_at, 3), "running": running,
            "dedicated": {g.tasks[0]: g.threads for g in process.groups if g.dedicated},
            "max_jobs": process.max_jobs, "tasks": summarize(list(process.counters)),
            "control_refused": getattr(process.control, "refused", 0),
            "host": process.targets[0], "labels": list(process.targets[1])}


def handle_shutdown(process: "WorkerProcess", cmd: dict, link: Link, handle: str) -> bytes:
    """Answer first, then stop taking jobs (``now``: without the grace)."""
    now = bool(cmd.get("now"))
    link.conn.send_raw(_reply(handle, {"ok": True, "worker": process.label, "command": "shutdown", "now": now}))
    process.request_shutdown(now=now, reason=f"control job from {link.conn.address}")
    return b""


def handle_stop(process: "WorkerProcess", cmd: dict, link: Link, handle: str) -> bytes:
    """Stop the running job ``cmd["handle"]`` (of ``cmd["server"]``, if given) and say whether
    this process ran it."""
    stopped = stop_job(process, cmd["handle"], cmd.get("server"), by=link.conn.address)
    return _reply(handle, {"ok": True, "command": "stop", "worker": process.label, "handle": cmd["handle"],
                           "stopped": stopped})


def stop_job(process: "WorkerProcess", handle: str, server: str | None = None, by: str = "") -> bool:
    """End a running job for an operator: a shell command's process group or an isolated
    task's child is killed through the job's cancel; a plugin task, which can't be killed, is
    abandoned as the watchdog does (its thread replaced). Either way the job fails with
    "stopped by operator", not retried. False when no thread of this process runs it."""
    for t, job in process.running():
        if job.handle != handle or (server is not None and job.server != server):
            continue
        with job_context(task=job.task, handle=job.handle, unique=job.unique):
            if job.task in process.own_timeout:
                stopped = t.running.request_stop(job)
                if stopped:
                    log.warning("job stopped by operator; killing it", by=by, thread=t.index)
            else:
                stopped = process.watchdog.abandon(
                    t, job, {"error": STOPPED_BY_OPERATOR, "stopped": True},
                    "job stopped by operator; failing it and replacing its thread", by=by)
        if stopped:
            return True
    return False


def handle_output(process: "WorkerProcess", cmd: dict, link: Link, handle: str) -> bytes:
    """The recent output of the running job ``cmd["handle"]`` (contract: geartask.control.output_request)."""
    from ..shell.stream import live_output
    answer = {"ok": True, "command": "output", "worker": process.label, "handle": cmd["handle"],
              "running": False, "live": False}
    server = cmd.get("server")
    for _, job in process.running():
        if job.handle != cmd["handle"] or (server is not None and job.server != server):
            continue
        answer["running"] = True
        live = live_output(job)
        if live is not None:
            answer.update(live=True, **live.snapshot())
            break
    return _reply(handle, answer)


HANDLERS: dict[str, Callable[["WorkerProcess", dict, Link, str], bytes]] = {
    "ping": handle_ping, "shutdown": handle_shutdown, "stop": handle_stop, "output": handle_output}
