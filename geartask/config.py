"""One config file for every role: where it is found, what it may hold, and its defaults.

The YAML maps onto the dataclasses below. Validation is strict on purpose: an unknown
key is far more often a typo than a wish, so it is an error that names the key path.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .address import format_address, split_address
from .errors import ConfigError, UsageError
from .shellenv import check_shell_config

CONFIG_ENV = "GEARTASK_CONFIG"
DEFAULT_PORT = 4730
PRIORITIES = ("low", "normal", "high")
MAX_CONFIG_BYTES = 1024 * 1024  # a config is a page of YAML; /dev/zero must not be read for ever
MIN_MAX_PACKET = 4096  # gearman.max_packet below this would refuse gearmand's own small answers


def parse_hostport(text: Any, key: str = "servers", path: str | None = None) -> tuple[str, int]:
    """'host:port', '[v6]:port', 'host' or a bare IPv6 address (port 4730) -> (host, port);
    ConfigError naming ``key`` if malformed (geartask.address.split_address has the rules)."""
    try:
        return split_address(text, DEFAULT_PORT)
    except ValueError as e:
        raise ConfigError(str(e), path, key) from None


class ServerAddress(tuple):
    """One ``servers`` entry: unpacks to ``(host, port)`` like before; ``tls`` is True for an
    entry written ``tls://HOST:PORT`` (reached over TLS with the config's ``tls`` section)."""

    tls: bool

    def __new__(cls, host: str, port: int, tls: bool = False) -> "ServerAddress":
        self = super().__new__(cls, (host, port))
        self.tls = tls
        return self

    @property
    def host(self) -> str:
        return self[0]

    @property
    def port(self) -> int:
        return self[1]

    def __str__(self) -> str:
        hostport = format_address(self[0], self[1])
        return f"tls://{hostport}" if self.tls else hostport


def parse_server(text: Any, key: str = "servers", path: str | None = None) -> ServerAddress:
    """A ``servers`` entry: 'host:port', 'host' (port 4730) or 'tls://host:port'."""
    tls = False
    if isinstance(text, str) and "://" in text:
        scheme, _, rest = text.strip().partition("://")
        if scheme.lower() != "tls":
            raise ConfigError(f"unknown scheme {scheme!r} in {text!r}: write tls://HOST:PORT or HOST:PORT", path, key)
        tls, text = True, rest
    host, port = parse_hostport(text, key, path)
    return ServerAddress(host, port, tls)


@dataclass
class LogConfig:
    dir: Path = Path("logs")  # JSON-lines log files, one per role and name
    level: str = "info"  # debug|info|warning|error
    format: str = "text"  # console lines: text|json (auto and console, the old names, mean text)
    max_bytes: int = 10 * 1024 * 1024  # a log file is rotated past this size
    backups: int = 5  # rotated files kept


@dataclass
class PluginsConfig:
    paths: list[Path] = field(default_factory=lambda: [Path("plugins")])
    enabled: list[str] = field(default_factory=list)  # empty: every plugin found


@dataclass
class ShellConfig:
    allow: list[str] = field(default_factory=list)  # program names or absolute paths; empty refuses all
    env_allow: list[str] = field(default_factory=list)  # variables a job's "env" may set; empty: none
    max_output: int = 1024 * 1024  # bytes of output returned; the rest is cut and flagged
    heartbeat: float = 30.0  # seconds between WORK_STATUS heartbeats of a long command
    default_timeout: float = 600.0  # seconds a command may run unless the job says otherwise


@dataclass
class TaskOptions:
    threads: int = 1  # threads that serve only this task


@dataclass
class WorkerConfig:
    name: str = field(default_factory=lambda: socket.gethostname().split(".")[0] or "worker")
    threads: int = 10
    job_timeout: float = 600.0  # seconds a plugin task or command may run
    retries: int = 2  # extra attempts after a failure
    max_retries: int = 10  # ceiling on what a job may ask for
    retry_backoff: float = 0.5  # seconds, doubled per attempt
    grace: float = 30.0  # seconds in-flight jobs get to finish on shutdown
    poll_timeout: float = 5.0  # seconds a sleeping worker waits before it asks again
    keepalive: float = 60.0  # seconds after which a silent server's connection is declared dead
    isolate: list[str] = field(default_factory=list)  # plugin tasks run in a child process each
    max_jobs: int = 0  # exit 0 after this many jobs (a supervisor starts a fresh process); 0: no limit
    tasks: dict[str, TaskOptions] = field(default_factory=dict)  # tasks with threads of their own
    metrics_listen: str = ""  # host:port of this process's own Prometheus /metrics; empty: off
    host: str = ""  # the host name targeted jobs name (TASK@host:HOST); "": the machine's FQDN
    labels: list[str] = field(default_factory=list)  # TASK@label:LABEL functions registered too
    shell: ShellConfig = field(default_factory=ShellConfig)


@dataclass
class SenderConfig:
    connect_timeout: float = 10.0  # seconds to keep trying to reach any server
    submit_timeout: float = 5.0  # seconds an answer may be late before "server slow" and an echo probe
    failover_after: float = 30.0  # seconds a server may owe an answer or be unreachable before its jobs move
    max_retries: int = 5  # resubmissions of one job after a dropped connection or a failover
    priority: str = "normal"
    background: bool = False


@dataclass
class QueueConfig:
    type: str = "sqlite"  # sqlite|postgresql|none
    path: Path = Path("var/gearmand-queue.sqlite")
    url: str = ""  # postgresql: the libpq URL of gearmand's queue (docs/gearmand.md: a standby server)
    table: str = "gearmand_queue"  # postgresql: the table (a standby server names the same one)


@dataclass
class KeepaliveConfig:
    # gearmand's TCP keepalive: a silent peer is dropped (its jobs requeued) after idle + interval x count s
    idle: int = 30
    interval: int = 10
    count: int = 3


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # gearmand has no authentication: loopback unless you mean it
    port: int = DEFAULT_PORT
    queue: QueueConfig = field(default_factory=QueueConfig)
    gearmand: str = "gearmand"  # program to run
    threads: int = 4
    keepalive: KeepaliveConfig = field(default_factory=KeepaliveConfig)  # --keepalive-* of gearmand
    tls: bool = False  # stunnel on host:port checks client certificates; gearmand on 127.0.0.1:backend_port
    backend_port: int = 0  # gearmand's port behind the terminator; 0: port + 1
    stunnel: str = "stunnel"  # program to run (Debian: stunnel4)


@dataclass
class OutcomesConfig:
    path: Path = Path("var/outcomes.sqlite")  # the collector's store (docs/outcomes.md)
    keep_days: float = 7.0  # outcomes older than this are pruned
    max_result: int = 1024 * 1024  # bytes of a result (and of a failed job's data) kept; the rest is cut and flagged
    store: str = "sqlite"  # backend: geartask.outcomes.store.BACKENDS
    report: bool = True  # workers report outcomes (needs a collector: they wait in gearmand until one runs)
    max_bytes: int = 1024 ** 3  # the store's quota: over it the oldest records go first (0: none)
    max_clock_skew: float = 300.0  # seconds a record's times may be ahead of the collector's clock
    url: str = ""  # store postgresql: postgresql://user:password@host:port/database (several collectors)


@dataclass
class SchedulerConfig:
    max_clock_skew: float = 300.0  # seconds the schedulers' clocks may differ with each slot still running once
    verify_after: float = 600.0  # seconds after a slot's time by which its outcome must exist (else an alert)


@dataclass
class DashboardConfig:
    listen: str = "127.0.0.1:8470"  # the web dashboard's address; not loopback needs a token
    refresh: float = 2.0  # seconds between the dashboard's looks at the servers and workers
    token: str = ""  # when set, every request must carry it (required off loopback)


@dataclass
class GearmanConfig:
    # bytes: no packet from a job server is buffered past this; a bigger answer fails its job
    max_packet: int = 64 * 1024 * 1024 + 64 * 1024  # geartask.gearman.MAX_PACKET


@dataclass
class TlsConfig:
    # PEM files, relative to the config file (geartask/trust/tls.py); empty: not set
    ca: str = ""  # the CA bundle that signs the fleet's certificates (old and new during a rotation)
    cert: str = ""  # this host's certificate, presented to servers (and by server.tls's terminator)
    key: str = ""  # its private key


@dataclass
class SecurityConfig:
    key: str = ""  # this process's Ed25519 private key (geartask keys new), relative to the config file
    trust: list[dict] = field(default_factory=list)  # {name, public_key, may}: geartask/trust/policy.py
    require_signed: bool = False  # workers run only jobs signed by a trusted key whose may covers the task
    max_job_age: float = 86400.0  # seconds a signed job (or a requeue note) stays valid


@dataclass
class Config:
    servers: list[str] = field(default_factory=lambda: [f"127.0.0.1:{DEFAULT_PORT}"])
    log: LogConfig = field(default_factory=LogConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    sender: SenderConfig = field(default_factory=SenderConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    schedules: list[dict] = field(default_factory=list)  # periodic jobs, checked by geartask.scheduler
    outcomes: OutcomesConfig = field(default_factory=OutcomesConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)  # how schedulers run (schedules is the list)
    gearman: GearmanConfig = field(default_factory=GearmanConfig)
    fleet: str = ""  # this fleet's name, carried by its workers; "" none (docs/configuration.md)
    source: Path | None = None  # the file this came from, None for pure defaults

    @property
    def server_addresses(self) -> list[ServerAddress]:
        """``(host, port)`` of every server; each also says ``.tls`` (written tls://)."""
        return [parse_server(s) for s in self.servers]

    def server_tls(self, host: str, port: int) -> bool:
        """Whether ``host:port`` is written tls:// in ``servers``."""
        return any(a.tls for a in self.server_addresses if tuple(a) == (host, port))

    def with_servers(self, servers: list[str] | str) -> "Config":
        """A copy with servers replaced (the --servers override), validated."""
        if isinstance(servers, str):
            servers = [s for s in servers.split(",") if s.strip()]
        new = dataclasses.replace(self, servers=[s.strip() for s in servers])
        _check_servers(new.servers, "--servers", None)
        return new


# Which keys must be > 0 and which >= 0; everything else numeric is free.
_POSITIVE = {"gearman.max_packet", "worker.threads", "worker.job_timeout", "worker.poll_timeout", "worker.keepalive",
             "sender.connect_timeout",
             "sender.submit_timeout", "sender.failover_after", "log.max_bytes", "server.port", "worker.shell.max_output",
             "worker.shell.heartbeat", "worker.shell.default_timeout", "server.threads",
             "server.keepalive.idle", "server.keepalive.interval", "server.keepalive.count",
             "outcomes.keep_days", "outcomes.max_result", "dashboard.refresh", "security.max_job_age",
             "outcomes.max_clock_skew", "scheduler.max_clock_skew", "scheduler.verify_after"}
_MAXIMUM = {"gearman.max_packet": 2**32 - 1,  # the wire format's length field
            "server.keepalive.idle": 32767, "server.keepalive.interval": 32767,  # Linux's own limits
            "server.keepalive.count": 127,
            "outcomes.keep_days": 36500, "outcomes.max_result": 64 * 1024 * 1024,
            "server.backend_port": 65535}
_NON_NEGATIVE = {"worker.retries", "worker.max_retries", "worker.retry_backoff", "worker.grace", "worker.max_jobs",
                 "sender.max_retries", "log.backups", "server.backend_port", "outcomes.max_bytes"}
_CHOICES = {"log.level": ("debug", "info", "warning", "error"),
            "log.format": ("text", "json", "auto", "console"),
            "sender.priority": PRIORITIES,
            "server.queue.type": ("sqlite", "postgresql", "none"),
            "outcomes.store": ("sqlite", "postgresql")}  # geartask.outcomes.store.BACKENDS (a test keeps them equal)


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            Path: "a path", list: "a list"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, key: str, path: str | None, base: Path) -> Any:
    """Check one value against its field type; resolve relative paths against the file's folder."""
    origin = getattr(tp, "__origin__", None)
    if origin is dict:  # a mapping of names chosen by the user (worker.tasks)
        _, item_tp = tp.__args__
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {value!r}", path, key)
        out = {}
        for name, item in value.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"keys must be names, got {name!r}", path, key)
            if item is None:
                raise ConfigError("has no value", path, f"{key}.{name}")
            out[name] = _convert(item, item_tp, f"{key}.{name}", path, base)
        return out
    if origin is list:
        (item_tp,) = tp.__args__
        if not isinstance(value, list):
            raise ConfigError(f"expected a list, got {value!r}", path, key)
        return [_convert(v, item_tp, f"{key}[{i}]", path, base) for i, v in enumerate(value)]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {value!r}", path, key)
        return _build(tp, value, key, path, base)
    if tp is dict:  # free-form: the module that uses it checks the inside, naming this key
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {value!r}", path, key)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {value!r}", path, key)
        return value
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and not isinstance(value, int)):
            raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", path, key)
        if not math.isfinite(value):  # .nan passes every check below; .inf disables a timeout
            raise ConfigError(f"must be a finite number, got {value!r}", path, key)
        if key in _POSITIVE and value <= 0:
            raise ConfigError(f"must be greater than 0, got {value!r}", path, key)
        if key in _NON_NEGATIVE and value < 0:
            raise ConfigError(f"must not be negative, got {value!r}", path, key)
        if key in _MAXIMUM and value > _MAXIMUM[key]:
            raise ConfigError(f"must be at most {_MAXIMUM[key]}, got {value!r}", path, key)
        return tp(value)
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"expected a path, got {value!r}", path, key)
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p
    if tp is str:
        if not isinstance(value, str) or value == "":
            quote = ': quote a bracketed IPv6 address in YAML, as "[2001:db8::1]:4730"' \
                if isinstance(value, list) and key.startswith("servers") else ""
            raise ConfigError(f"expected a string, got {value!r}{quote}", path, key)
        if key in _CHOICES and value.lower() not in _CHOICES[key]:
            raise ConfigError(f"must be one of {', '.join(_CHOICES[key])}, got {value!r}", path, key)
        return value.lower() if key in _CHOICES else value
    raise AssertionError(f"unhandled config type {tp!r}")  # a bug in the schema, not user input


def _build(cls: type, data: dict, prefix: str, path: str | None, base: Path) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    types = _resolved_types(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"unknown key (known here: {known})", path, key)
        if value is None:
            raise ConfigError("has no value", path, key)
        kwargs[name] = _convert(value, types[name], key, path, base)
    for name in fields:  # absent sections still need their relative default paths resolved
        if name not in kwargs and dataclasses.is_dataclass(types[name]):
            kwargs[name] = _build(types[name], {}, f"{prefix}.{name}" if prefix else name, path, base)
    obj = cls(**kwargs)
    # Defaults that are relative paths belong to the config file's folder too.
    for name in fields:
        if name not in kwargs and types[name] is Path and not getattr(obj, name).is_absolute():
            setattr(obj, name, base / getattr(obj, name))
        if name not in kwargs and name == "paths":
            obj.paths = [p if p.is_absolute() else base / p for p in obj.paths]
    return obj


_TYPES_CACHE: dict[type, dict[str, Any]] = {}


def _resolved_types(cls: type) -> dict[str, Any]:
    if cls not in _TYPES_CACHE:
        import typing
        _TYPES_CACHE[cls] = typing.get_type_hints(cls)
    return _TYPES_CACHE[cls]


def _check_servers(servers: list[str], key: str, path: str | None) -> None:
    if not servers:
        raise ConfigError("needs at least one 'host:port'", path, key)
    for i, s in enumerate(servers):
        parse_server(s, f"{key}[{i}]" if key == "servers" else key, path)


def search_path() -> list[Path]:
    """Where a config is looked for when neither --config nor $GEARTASK_CONFIG names one."""
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return [Path.cwd() / "config.yaml", Path(xdg) / "geartask" / "config.yaml", Path("/etc/geartask/config.yaml")]


def no_config_note() -> str:
    """Said with an error that may come from running without a config file (no plugins found):
    that none was found, and where it was looked for."""
    looked = ", ".join(str(p) for p in search_path())
    return (f"no config file was found (${CONFIG_ENV} is not set; looked for {looked}), so the built-in "
            f"defaults are used: run from your config's folder or give --config")


def find_config(explicit: str | os.PathLike | None = None) -> Path | None:
    """--config PATH, else $GEARTASK_CONFIG, else the first of search_path() that exists;
    None means built-in defaults (relative paths then start at the working directory)."""
    if explicit:
        p = Path(explicit)
        if not os.path.lexists(p):
            raise ConfigError("config file not found", str(p))
        return p  # a directory or a device is reported by read_config_text, as what it is
    env = os.environ.get(CONFIG_ENV)
    if env:
        p = Path(env)
        if not os.path.lexists(p):
            raise ConfigError(f"config file named by ${CONFIG_ENV} not found", str(p))
        return p
    for p in search_path():
        if p.is_file():
            return p
    return None


PIPE_READ_TIMEOUT = 10.0  # seconds a config given as a pipe (--config <(...)) may take to arrive


def read_config_text(path: Path) -> str:
    """The file's text: a regular file or a pipe, at most MAX_CONFIG_BYTES, UTF-8."""
    where = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO must not block
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", where) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError("is a directory, not a config file", where)
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            raise ConfigError("is not a regular file (a device or socket); a config is a YAML file", where)
        data = _read_capped(fd, where, pipe=stat.S_ISFIFO(mode))
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror or e}", where) from None
    finally:
        os.close(fd)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8",
                          where, line=line, column=column) from None


def _read_capped(fd: int, where: str, pipe: bool) -> bytes:
    import select
    chunks, size = [], 0
    deadline = time.monotonic() + PIPE_READ_TIMEOUT
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while size <= MAX_CONFIG_BYTES:
        if pipe:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(int(left * 1000) + 1):
                raise ConfigError(f"nothing more came through the pipe within {PIPE_READ_TIMEOUT:g}s", where)
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"larger than {MAX_CONFIG_BYTES // 1024} KiB: not a config file", where)
    return b"".join(chunks)


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, mark: Any, first_line: int):
        self.key, self.mark, self.first_line = key, mark, first_line
        super().__init__(f"duplicate key {key!r}")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last, silently)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # '<<' merges are overridden on purpose
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise _DuplicateKey(key, key_node.start_mark, seen[key])
                    seen[key] = key_node.start_mark.line + 1
                except TypeError:
                    continue  # an unhashable key: the base class reports it
        return super().construct_mapping(node, deep)


def parse_config(data: Any, path: str | None = None, base: Path | None = None) -> Config:
    """Validate an already-parsed YAML document and build a Config from it."""
    base = base or Path.cwd()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping of keys, got {type(data).__name__}", path)
    cfg = _build(Config, data, "", path, base)
    _check_servers(cfg.servers, "servers", path)
    if cfg.fleet:
        from .control import check_fleet
        try:
            check_fleet(cfg.fleet)
        except UsageError as e:
            raise ConfigError(str(e), path, "fleet") from None
    for name, options in cfg.worker.tasks.items():
        if options.threads <= 0:
            raise ConfigError(f"must be greater than 0, got {options.threads}", path, f"worker.tasks.{name}.threads")
    check_shell_config(cfg.worker.shell.allow, cfg.worker.shell.env_allow, path)
    _check_targets(cfg, path)
    if cfg.gearman.max_packet < MIN_MAX_PACKET:
        raise ConfigError(f"must be at least {MIN_MAX_PACKET} bytes, got {cfg.gearman.max_packet}", path,
                          "gearman.max_packet")
    for key, value in (("dashboard.listen", cfg.dashboard.listen), ("worker.metrics_listen", cfg.worker.metrics_listen)):
        if value:
            parse_hostport(value, key, path)
    _check_trust(cfg, path, base)
    _check_postgresql(cfg, path)
    return cfg


def _check_targets(cfg: Config, path: str | None) -> None:
    """worker.host and worker.labels become gearmand function names: a checked charset only."""
    from .targets import TargetError, check_host, check_label
    try:
        if cfg.worker.host:
            check_host(cfg.worker.host)
    except TargetError as e:
        raise ConfigError(str(e), path, "worker.host") from None
    for i, label in enumerate(cfg.worker.labels):
        try:
            check_label(label)
        except TargetError as e:
            raise ConfigError(str(e), path, f"worker.labels[{i}]") from None


def _check_trust(cfg: Config, path: str | None, base: Path) -> None:
    """tls.* and security.key are paths relative to the config file; security.trust is checked
    entry by entry (cryptography is imported only when a trust list is given)."""
    for section, name in (("tls", "ca"), ("tls", "cert"), ("tls", "key"), ("security", "key")):
        obj = getattr(cfg, section)
        if getattr(obj, name):
            setattr(obj, name, str(base / Path(getattr(obj, name)).expanduser()))
    if cfg.server.backend_port == cfg.server.port:
        raise ConfigError(f"must differ from server.port ({cfg.server.port}): gearmand listens there behind "
                          "the terminator", path, "server.backend_port")
    if cfg.security.trust:
        from .trust.policy import Trust
        Trust.from_config(cfg.security.trust, path)


def _check_postgresql(cfg: Config, path: str | None) -> None:
    """A postgresql store or queue needs its URL; the queue's table must be a plain name
    (gearmand puts it into its SQL as it is)."""
    for kind, url, key in ((cfg.outcomes.store, cfg.outcomes.url, "outcomes.url"),
                           (cfg.server.queue.type, cfg.server.queue.url, "server.queue.url")):
        if kind != "postgresql":
            continue
        if not url:
            raise ConfigError(f"is needed with {key.rsplit('.', 1)[0]}.{'store' if key[0] == 'o' else 'type'}: "
                              "postgresql (postgresql://user@host:port/database)", path, key)
        if not url.startswith(("postgresql://", "postgres://")):
            raise ConfigError("must be a postgresql:// URL (postgresql://user@host:port/database)", path, key)
    table = cfg.server.queue.table
    if not (table.replace("_", "a").isalnum() and table.isascii() and not table[0].isdigit() and len(table) <= 63):
        raise ConfigError(f"must be a plain table name (letters, digits, _; at most 63), got {table!r}",
                          path, "server.queue.table")


def load_config(path: str | os.PathLike | None = None, servers: list[str] | str | None = None) -> Config:
    """Find, read and validate the config; ``servers`` overrides the file's list (--servers)."""
    found = find_config(path)
    if found is None:
        cfg = parse_config({}, None, Path.cwd())  # never the package's folder: it may be site-packages
    else:
        text = read_config_text(found)
        try:
            data = yaml.load(text, Loader=_StrictLoader)
        except _DuplicateKey as e:
            raise ConfigError(f"duplicate key {e.key!r} (first given at line {e.first_line}); keep one",
                              str(found), line=e.mark.line + 1, column=e.mark.column + 1) from None
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
            hint = ""
            bad_line = text.splitlines()[line - 1] if line and line <= len(text.splitlines()) else ""
            if "[" in bad_line and "]:" in bad_line:  # - [::1]:4730 starts a YAML list
                hint = ': quote a bracketed IPv6 address in YAML, as "[2001:db8::1]:4730"'
            raise ConfigError(f"YAML syntax error: {e.problem or e}{hint}", str(found), line=line, column=col) from None
        except yaml.YAMLError as e:
            raise ConfigError(f"YAML error: {e}", str(found)) from None
        except RecursionError:  # PyYAML's composer recurses once per nesting level
            raise ConfigError("nested too deeply to be a config", str(found)) from None
        cfg = parse_config(data, str(found), found.resolve().parent)
        cfg.source = found
    if servers:
        cfg = cfg.with_servers(servers)
    from .trust.tls import install
    install(cfg)  # every connection this process makes to a tls:// server uses TLS
    return cfg
