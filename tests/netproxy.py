"""A TCP proxy for tests that does to a byte stream what real networks do and loopback never does.

``SliceProxy(target)`` listens on a free loopback port and forwards every connection to
``target``. Each direction can be *sliced* (delivered in random 1-48-byte pieces, with an
occasional 2 ms pause, as toxiproxy's slicer does: packet boundaries never match Gearman
packet boundaries), *delayed* (each chunk held ``delay`` seconds, order kept: half of an
added round trip per direction) and *cut* (``cut()``: bytes are held, nothing is closed and
no RST is sent, as with a dead cable; ``restore()`` delivers what was held).

Everything runs in daemon threads; ``stop()`` closes the listener and every connection.

As a program (so it can run inside a network namespace of the test network, tests/netlab.py):
    python tests/netproxy.py --listen IP:PORT --target IP:PORT [--slice] [--delay S]
prints ``listening on IP:PORT`` once it accepts connections and runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import collections
import random
import signal
import socket
import sys
import threading
import time
from typing import Callable

from geartask.address import format_address, split_address, split_server


class _Pump(threading.Thread):
    """Copies one direction of one connection, slicing and delaying on the way."""

    def __init__(self, proxy: "SliceProxy", src: socket.socket, dst: socket.socket, sliced: bool,
                 delay: float, rng: random.Random, down: bool = False):
        super().__init__(daemon=True, name="netproxy-pump")
        self.proxy, self.src, self.dst, self.down = proxy, src, dst, down
        self.sliced, self.delay, self.rng = sliced, delay, rng
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.cond = threading.Condition()
        self.eof = False
        self.sender = threading.Thread(target=self._send_loop, daemon=True, name="netproxy-send")

    def run(self) -> None:
        self.sender.start()
        try:
            while True:
                chunk = self.src.recv(65536)
                if not chunk:
                    break
                if self.proxy.tap is not None:
                    self.proxy.tap(self, chunk)
                with self.cond:
                    self.queue.append((time.monotonic() + self.delay, chunk))
                    self.cond.notify()
        except OSError:
            pass
        with self.cond:
            self.eof = True
            self.cond.notify()

    def _send_loop(self) -> None:
        try:
            while True:
                with self.cond:
                    while True:
                        if self.proxy.stopped.is_set():
                            return
                        ready = self.queue and not self.proxy.is_cut and self.queue[0][0] <= time.monotonic()
                        if ready:
                            _, chunk = self.queue.popleft()
                            break
                        if self.eof and not self.queue:
                            self.dst.shutdown(socket.SHUT_WR)
                            return
                        wait = 0.05
                        if self.queue and not self.proxy.is_cut:
                            wait = max(0.0, self.queue[0][0] - time.monotonic())
                        self.cond.wait(wait)
                self._deliver(chunk)
        except OSError:
            pass
        finally:
            self.proxy._forget(self.src, self.dst)

    def _deliver(self, chunk: bytes) -> None:
        if not self.sliced:
            self.dst.sendall(chunk)
            self.proxy.bytes_forwarded += len(chunk)
            return
        view = memoryview(chunk)
        while view:
            n = self.rng.randint(self.proxy.min_slice, self.proxy.max_slice)
            self.dst.sendall(view[:n])
            self.proxy.bytes_forwarded += min(n, len(view))
            self.proxy.slices += 1
            view = view[n:]
            if self.rng.random() < self.proxy.pause_chance:
                time.sleep(0.002)


class SliceProxy:
    """A forwarding proxy from a free port on ``listen_host`` to ``target`` (host, port)."""

    def __init__(self, target: tuple[str, int] | str, listen_host: str = "127.0.0.1", *,
                 listen_port: int = 0, slice_down: bool = True, slice_up: bool = True, delay: float = 0.0,
                 min_slice: int = 1, max_slice: int = 48, pause_chance: float = 0.02,
                 seed: int | None = None, tap: Callable[["_Pump", bytes], None] | None = None):
        """``tap(pump, chunk)``, if given, sees every chunk as it arrives (``pump.down``: from
        the target), before slicing: a test can parse what the server sends."""
        if isinstance(target, str):
            target = split_address(target)
        self.target = target
        self.slice_down, self.slice_up, self.delay = slice_down, slice_up, delay
        self.min_slice, self.max_slice, self.pause_chance = min_slice, max_slice, pause_chance
        self.rng = random.Random(seed)
        self.tap = tap
        self.stopped = threading.Event()
        self.is_cut = False
        self.connections = 0
        self.slices = 0
        self.bytes_forwarded = 0
        self._socks: set[socket.socket] = set()
        self._open: dict[tuple[socket.socket, socket.socket], int] = {}  # pair -> directions still open
        self._lock = threading.Lock()
        self.listener = socket.socket(socket.AF_INET6 if ":" in listen_host else socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((listen_host, listen_port))
        self.listener.listen(512)
        self.host, self.port = self.listener.getsockname()[:2]
        self._accepter = threading.Thread(target=self._accept_loop, daemon=True, name="netproxy-accept")

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    def start(self) -> "SliceProxy":
        self._accepter.start()
        return self

    def __enter__(self) -> "SliceProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def cut(self) -> None:
        """Hold every byte from now on, silently: no FIN, no RST, connections stay open."""
        self.is_cut = True

    def restore(self) -> None:
        self.is_cut = False

    def stop(self) -> None:
        self.stopped.set()
        try:
            self.listener.close()
        except OSError:
            pass
        with self._lock:
            socks, self._socks = list(self._socks), set()
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept_loop(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()  # the target refused: so do we (a closed connection, like a RST)
                continue
            upstream.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks.update((client, upstream))
                self.connections += 1
            rng = random.Random(self.rng.random())
            self._open[(client, upstream)] = 2
            _Pump(self, upstream, client, self.slice_down, self.delay, rng, down=True).start()
            _Pump(self, client, upstream, self.slice_up, self.delay, random.Random(rng.random())).start()

    def _forget(self, src: socket.socket, dst: socket.socket) -> None:
        """One direction is done; when both are, close the pair."""
        with self._lock:
            key = (src, dst) if (src, dst) in self._open else (dst, src)
            left = self._open.get(key, 1) - 1
            if left > 0:
                self._open[key] = left
                return
            self._open.pop(key, None)
            self._socks.difference_update(key)
        for s in key:
            try:
                s.close()
            except OSError:
                pass


def _address(text: str) -> tuple[str, int]:
    try:
        return split_server(text)  # IP:PORT or [v6]:PORT
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected IP:PORT, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Forward TCP connections, sliced and/or delayed.")
    parser.add_argument("--listen", type=_address, required=True, metavar="IP:PORT")
    parser.add_argument("--target", type=_address, required=True, metavar="IP:PORT")
    parser.add_argument("--slice", action="store_true", help="deliver both directions in 1-48-byte slices")
    parser.add_argument("--slice-down", action="store_true",
                        help="slice only what the target sends (TLS terminators may drop sliced client records)")
    parser.add_argument("--delay", type=float, default=0.0, metavar="S",
                        help="hold each chunk S seconds per direction (half the added round trip)")
    args = parser.parse_args(argv)
    proxy = SliceProxy(args.target, args.listen[0], listen_port=args.listen[1], slice_down=args.slice or args.slice_down,
                       slice_up=args.slice, delay=args.delay).start()
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    print(f"listening on {proxy.address}", flush=True)
    while not done.wait(1.0):  # a timed wait lets the signal handler run
        pass
    proxy.stop()
    print(f"stopped: {proxy.connections} connection(s), {proxy.bytes_forwarded} bytes, {proxy.slices} slices",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
