"""Running the dashboard: check where it listens, start the collector and the fleet monitor,
serve the app with waitress until SIGTERM or Ctrl-C, then stop everything in order."""

from __future__ import annotations

import ipaddress
import signal
import sys
from dataclasses import dataclass
from typing import TextIO

from ..fleet import DEFAULT_TIMEOUT, Admin
from ..address import format_address
from ..config import Config, parse_hostport
from ..errors import GeartaskError, UsageError
from ..logs import configure_logging, get_logger
from .app import Dashboard, Settings
from .fleet import FleetMonitor
from ..outcomes.client import OutcomeClient
from ..outcomes.collector import Collector
from ..outcomes.store import open_store
from .outcomes import LocalOutcomeClient, OutcomesView

log = get_logger("geartask.dashboard")
THREADS = 8  # waitress request threads: pages wait on servers (with deadlines), never on each other


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name that could resolve anywhere


@dataclass
class Listen:
    host: str
    port: int

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)


def check_listen(listen: str, token: str) -> Listen:
    """Parse --listen / dashboard.listen; off loopback a token is required (UsageError, exit 2)."""
    try:
        host, port = parse_hostport(listen, "--listen")
    except GeartaskError as e:
        raise UsageError(f"--listen {listen!r}: {str(e).split(': ', 2)[-1]}") from None
    where = Listen(host, port)
    if not where.loopback and not token:
        raise UsageError(f"--listen {format_address(host, port)} is not a loopback address: anyone who reaches it could stop "
                         "workers and clear queues; set dashboard.token (or --token) and every request must "
                         "carry it, or listen on 127.0.0.1")
    return where


def allowed_hosts(where: Listen) -> set[str]:
    return {"localhost", "127.0.0.1", "::1", where.host.lower()}


def build(config: Config, *, refresh: float, token: str, where: Listen, collector: bool,
          timeout: float = DEFAULT_TIMEOUT) -> tuple[Dashboard, list]:
    """The dashboard app, the monitor and (with ``collector``) the collector, not started yet.

    Returns (dashboard, things to start in order: each has start() and stop())."""
    admin = Admin.from_config(config, timeout)
    parts: list = []
    if collector:
        store = open_store(config.outcomes.store, config.outcomes.path, config)
        parts.append(_Closing(store))  # stopped last: after the collector
        running = Collector(config, store)
        parts.append(running)
        client: OutcomeClient = LocalOutcomeClient(config, running.queries)
    elif config.outcomes.store == "postgresql":  # a shared store: read it directly, no collector needed
        from ..outcomes.query import Queries
        store = open_store(config.outcomes.store, config.outcomes.path, config)
        parts.append(_Closing(store))
        client = LocalOutcomeClient(config, Queries(store, config.outcomes.max_result,
                                                    info=lambda: {"collector": None, "store": "postgresql"}))
    else:
        client = OutcomeClient(config, timeout)
    outcomes = OutcomesView(config, client)
    monitor = FleetMonitor(admin, refresh, outcomes.counts)
    parts.append(monitor)
    settings = Settings(refresh=refresh, token=token, allowed_hosts=allowed_hosts(where),
                        collector="in this process" if collector else "elsewhere",
                        collector_stopped=(lambda: running.error) if collector else None)
    return Dashboard(admin, monitor, settings, outcomes), parts


class _Closing:
    """Closes the outcome store when the dashboard stops (the collector does not own it)."""

    def __init__(self, store):
        self.store = store

    def start(self) -> None:
        pass

    def stop(self) -> None:
        self.store.close()


def serve(config: Config, *, listen: str, refresh: float, token: str, collector: bool,
          timeout: float = DEFAULT_TIMEOUT, err: TextIO | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit status."""
    import waitress.server

    err = err or sys.stderr
    where = check_listen(listen, token)
    configure_logging(config.log, "dashboard")
    dashboard, parts = build(config, refresh=refresh, token=token, where=where, collector=collector,
                             timeout=timeout)
    try:
        server = waitress.server.create_server(dashboard.app, host=where.host, port=where.port, threads=THREADS,
                                               ident="geartask", clear_untrusted_proxy_headers=True,
                                               # a TLS proxy on this host says "https": the token cookie gets Secure
                                               trusted_proxy="127.0.0.1", trusted_proxy_headers={"x-forwarded-proto"})
    except OSError as e:
        raise GeartaskError(f"dashboard: cannot listen on {format_address(where.host, where.port)}: {e.strerror or e}") from None
    started = []
    try:
        for part in parts:
            part.start()
            started.append(part)
        port = server.effective_port if hasattr(server, "effective_port") else where.port
        url = f"http://{where.host if ':' not in where.host else f'[{where.host}]'}:{port}/"
        log.info("dashboard started", url=url, refresh=refresh, collector=collector, token=bool(token),
                 servers=config.servers)
        err.write(f"dashboard on {url} (collector {'in this process' if collector else 'elsewhere'}); "
                  "Ctrl-C to stop\n")
        err.flush()
        def on_signal(signum, frame):
            raise KeyboardInterrupt  # leaves waitress's loop, in the main thread

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            server.run()
        except KeyboardInterrupt:
            pass
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    finally:
        server.close()
        for part in reversed(started):
            part.stop()
            if hasattr(part, "close"):
                part.close()
        log.info("dashboard stopped")
    return 0

