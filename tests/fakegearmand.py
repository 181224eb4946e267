"""A scripted job server for tests: speaks just enough Gearman to play a hostile or broken gearmand.

``FakeGearmand(script)`` listens on a free loopback port; every connection gets its own
thread that answers ECHO_REQ, records each request packet and calls ``script(conn, cmd,
args)`` for the others, which may ``conn.reply(cmd, *args)`` or ``conn.send_raw(bytes)``.
Test workers connect to it like to any server.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Callable

from gearman.protocol import GEARMAN_PARAMS_FOR_COMMAND

from geartask import gearman as gp

_HEADER = struct.Struct("!4sII")


def response(cmd: int, *args: bytes | str) -> bytes:
    payload = b"\0".join(a.encode() if isinstance(a, str) else a for a in args)
    return _HEADER.pack(b"\0RES", cmd, len(payload)) + payload


class FakeConnection:
    def __init__(self, server: "FakeGearmand", sock: socket.socket):
        self.server, self.sock = server, sock
        self.client_id = ""
        self.abilities: list[str] = []
        self.packets: list[tuple[int, dict]] = []

    def reply(self, cmd: int, *args: bytes | str) -> None:
        self.send_raw(response(cmd, *args))

    def send_raw(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            pass

    @property
    def is_control(self) -> bool:
        return self.client_id.endswith(":0")

    def serve(self) -> None:
        buf = b""
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
                while len(buf) >= 12:
                    magic, cmd, size = _HEADER.unpack_from(buf)
                    if len(buf) < 12 + size:
                        break
                    params = GEARMAN_PARAMS_FOR_COMMAND.get(cmd, ())
                    parts = buf[12:12 + size].split(b"\0", max(len(params) - 1, 0)) if params else []
                    args = dict(zip(params, parts, strict=False))
                    buf = buf[12 + size:]
                    self.packets.append((cmd, args))
                    if cmd == gp.SET_CLIENT_ID:
                        self.client_id = args["client_id"].decode()
                    elif cmd == gp.CAN_DO:
                        self.abilities.append(args["task"].decode())
                    elif cmd == gp.ECHO_REQ:
                        self.reply(gp.ECHO_RES, args["data"])
                        continue
                    self.server.script(self, cmd, args)
        except OSError:
            return
        finally:
            self.sock.close()


class FakeGearmand:
    def __init__(self, script: Callable[[FakeConnection, int, dict], None],
                 on_connect: Callable[[FakeConnection], None] | None = None):
        self.script, self.on_connect = script, on_connect
        self.connections: list[FakeConnection] = []
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            conn = FakeConnection(self, sock)
            self.connections.append(conn)
            if self.on_connect is not None:
                self.on_connect(conn)
            threading.Thread(target=conn.serve, daemon=True).start()

    def packets(self, cmd: int) -> list[dict]:
        return [args for c in list(self.connections) for command, args in list(c.packets) if command == cmd]

    def close(self) -> None:
        self.listener.close()
        for c in list(self.connections):
            try:
                c.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
