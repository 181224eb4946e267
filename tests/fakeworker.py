"""A worker process's control side, faithful to geartask.control's contract, for manager tests.

``FakeControlWorker`` connects to each server (optionally from a chosen loopback source
address, so each server sees another IP), sets the client id ``NAME:IP:PID:0`` and registers
``geartask.control:NAME:IP:PID`` with that server's view of its IP, as a real worker does.
With ``answer=True`` it grabs its control jobs and answers ``ping`` with the documented reply
and ``shutdown`` by closing every connection; with ``answer=False`` it never grabs anything:
a process whose host went silent. ``reply_extra`` is merged into every ping reply (per-task
counters, running jobs); a ``stop`` command answers whether ``reply_extra["running"]`` lists it.
"""

from __future__ import annotations

import json
import socket
import threading
import time

from geartask import gearman as gp
from geartask.control import WorkerIdentity, parse_command
from geartask.errors import UsageError
from geartask.jobs import encode_payload


class FakeControlWorker:
    def __init__(self, servers: list[tuple[str, int]], name: str, pid: int, *, answer: bool = True,
                 source_ips: list[str] | None = None, extra_functions: list[str] = (),
                 reply_extra: dict | None = None):
        self.name, self.pid, self.answer = name, pid, answer
        self.reply_extra = reply_extra or {}
        self.received: list[tuple[str, dict]] = []  # (server, command) of every control job taken
        self.stopped = threading.Event()
        self.started = time.time()
        self.conns: list[gp.Connection] = []
        for i, (host, port) in enumerate(servers):
            conn = gp.Connection(host, port)
            source = source_ips[i] if source_ips else None
            sock = socket.create_connection((host, port), timeout=5,
                                            source_address=(source, 0) if source else None)
            sock.settimeout(None)
            conn.sock, conn.local_address = sock, sock.getsockname()[0]
            ident = WorkerIdentity(name, conn.local_address, pid, 0)
            conn.send_raw(gp.pack(gp.SET_CLIENT_ID, client_id=ident.client_id)
                          + gp.pack(gp.CAN_DO, task=ident.control_function)
                          + b"".join(gp.pack(gp.CAN_DO, task=f) for f in extra_functions))
            conn.echo()
            self.conns.append(conn)
        self.threads = [threading.Thread(target=self._serve, args=(c,), daemon=True) for c in self.conns]
        for t in self.threads:
            t.start()

    @property
    def ips(self) -> list[str]:
        return sorted({c.local_address for c in self.conns})

    def control_function(self, index: int = 0) -> str:
        return WorkerIdentity(self.name, self.conns[index].local_address, self.pid).control_function

    def _serve(self, conn: gp.Connection) -> None:
        if not self.answer:
            self.stopped.wait()
            return
        try:
            while not self.stopped.is_set():
                conn.send(gp.GRAB_JOB_UNIQ)
                pkt = conn.expect({gp.JOB_ASSIGN_UNIQ, gp.NO_JOB}, 10)
                if pkt.cmd == gp.NO_JOB:
                    conn.send(gp.PRE_SLEEP)
                    while not self.stopped.is_set() and conn.recv(0.1) is None:
                        pass
                    continue
                try:
                    cmd = parse_command(pkt["data"])
                except UsageError:  # 'stop' (the worker side is not on every branch yet)
                    cmd = json.loads(pkt["data"])
                    assert cmd["command"] == "stop"
                self.received.append((conn.address, cmd))
                handle = pkt["job_handle"]
                if cmd["command"] == "ping":
                    reply = {"ok": True, "command": "ping", "worker": f"{self.name}:{self.pid}", "name": self.name,
                             "pid": self.pid, "ips": self.ips, "threads": 0, "busy": 0, "jobs_done": 0,
                             "started": self.started, "running": [],
                             **(self.reply_extra() if callable(self.reply_extra) else self.reply_extra)}
                    conn.send(gp.WORK_COMPLETE, job_handle=handle, data=encode_payload(reply))
                elif cmd["command"] == "stop":
                    running = self.reply_extra.get("running", [])
                    hit = [j for j in running if j["handle"] == cmd["handle"]]
                    for j in hit:
                        running.remove(j)
                    conn.send(gp.WORK_COMPLETE, job_handle=handle,
                              data=encode_payload({"ok": True, "stopped": bool(hit), "handle": cmd["handle"]}))
                else:
                    conn.send(gp.WORK_COMPLETE, job_handle=handle,
                              data=encode_payload({"ok": True, "command": cmd["command"], "now": bool(cmd.get("now"))}))
                    self.close()  # the process is gone
        except Exception:
            pass  # closed under us

    def close(self) -> None:
        self.stopped.set()
        for c in self.conns:
            if c.sock is not None:
                try:
                    c.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            c.close()
