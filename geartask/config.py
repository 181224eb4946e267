"""One config file for every role: where it is found, what it may hold, and its defaults.

The YAML maps onto the dataclasses below. Validation is strict on purpose: an unknown
key is far more often a typo than a wish, so it is an error that names the key path.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .shellenv import check_shell_config

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_ENV = "GEARTASK_CONFIG"
DEFAULT_PORT = 4730
PRIORITIES = ("low", "normal", "high")


def parse_hostport(text: Any, key: str = "servers", path: str | None = None) -> tuple[str, int]:
    """'host:port' (or 'host', meaning port 4730) -> (host, port); ConfigError if malformed."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"expected 'host:port', got {text!r}", path, key)
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = text, str(DEFAULT_PORT)
    host = host.strip("[]")
    if not host or any(c.isspace() for c in host):
        raise ConfigError(f"bad host in {text!r}", path, key)
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"bad port in {text!r}: not a number", path, key) from None
    if not 0 < port < 65536:
        raise ConfigError(f"bad port in {text!r}: must be 1-65535", path, key)
    return host, port


@dataclass
class LogConfig:
    dir: Path = Path("logs")  # JSON-lines log files, one per role and name
    level: str = "info"  # debug|info|warning|error
    format: str = "auto"  # console output: auto (console on a terminal, else json)|console|json
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
class WorkerConfig:
    name: str = field(default_factory=lambda: socket.gethostname().split(".")[0] or "worker")
    threads: int = 10
    job_timeout: float = 600.0  # seconds a plugin task or command may run
    retries: int = 2  # extra attempts after a failure
    max_retries: int = 10  # ceiling on what a job may ask for
    retry_backoff: float = 0.5  # seconds, doubled per attempt
    grace: float = 30.0  # seconds in-flight jobs get to finish on shutdown
    poll_timeout: float = 5.0  # seconds a sleeping worker waits before it asks again
    shell: ShellConfig = field(default_factory=ShellConfig)


@dataclass
class SenderConfig:
    connect_timeout: float = 10.0  # seconds to keep trying to reach any server
    submit_timeout: float = 5.0  # seconds to wait for the server to accept a job
    max_retries: int = 5  # resubmissions of one job after a timeout or dropped connection
    priority: str = "normal"
    background: bool = False


@dataclass
class QueueConfig:
    type: str = "sqlite"  # sqlite|none
    path: Path = Path("var/gearmand-queue.sqlite")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # gearmand has no authentication: loopback unless you mean it
    port: int = DEFAULT_PORT
    queue: QueueConfig = field(default_factory=QueueConfig)
    gearmand: str = "gearmand"  # program to run
    threads: int = 4


@dataclass
class Config:
    servers: list[str] = field(default_factory=lambda: [f"127.0.0.1:{DEFAULT_PORT}"])
    log: LogConfig = field(default_factory=LogConfig)
    plugins: PluginsConfig = field(default_factory=PluginsConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    sender: SenderConfig = field(default_factory=SenderConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    source: Path | None = None  # the file this came from, None for pure defaults

    @property
    def server_addresses(self) -> list[tuple[str, int]]:
        return [parse_hostport(s) for s in self.servers]

    def with_servers(self, servers: list[str] | str) -> "Config":
        """A copy with servers replaced (the --servers override), validated."""
        if isinstance(servers, str):
            servers = [s for s in servers.split(",") if s.strip()]
        new = dataclasses.replace(self, servers=[s.strip() for s in servers])
        _check_servers(new.servers, "--servers", None)
        return new


# Which keys must be > 0 and which >= 0; everything else numeric is free.
_POSITIVE = {"worker.threads", "worker.job_timeout", "worker.poll_timeout", "sender.connect_timeout",
             "sender.submit_timeout", "log.max_bytes", "server.port", "worker.shell.max_output",
             "worker.shell.heartbeat", "worker.shell.default_timeout", "server.threads"}
_NON_NEGATIVE = {"worker.retries", "worker.max_retries", "worker.retry_backoff", "worker.grace",
                 "sender.max_retries", "log.backups"}
_CHOICES = {"log.level": ("debug", "info", "warning", "error"),
            "log.format": ("auto", "console", "json"),
            "sender.priority": PRIORITIES,
            "server.queue.type": ("sqlite", "none")}


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            Path: "a path", list: "a list"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, key: str, path: str | None, base: Path) -> Any:
    """Check one value against its field type; resolve relative paths against the file's folder."""
    origin = getattr(tp, "__origin__", None)
    if origin is list:
        (item_tp,) = tp.__args__
        if not isinstance(value, list):
            raise ConfigError(f"expected a list, got {value!r}", path, key)
        return [_convert(v, item_tp, f"{key}[{i}]", path, base) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {value!r}", path, key)
        return _build(tp, value, key, path, base)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {value!r}", path, key)
        return value
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (tp is int and not isinstance(value, int)):
            raise ConfigError(f"expected {_type_name(tp)}, got {value!r}", path, key)
        if key in _POSITIVE and value <= 0:
            raise ConfigError(f"must be greater than 0, got {value!r}", path, key)
        if key in _NON_NEGATIVE and value < 0:
            raise ConfigError(f"must not be negative, got {value!r}", path, key)
        return tp(value)
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"expected a path, got {value!r}", path, key)
        p = Path(value).expanduser()
        return p if p.is_absolute() else base / p
    if tp is str:
        if not isinstance(value, str) or value == "":
            raise ConfigError(f"expected a string, got {value!r}", path, key)
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
    for name, f in fields.items():
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
        parse_hostport(s, f"{key}[{i}]" if key == "servers" else key, path)


def find_config(explicit: str | os.PathLike | None = None) -> Path | None:
    """--config PATH, else $GEARTASK_CONFIG, else ./config.yaml, else the repository's config.yaml."""
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise ConfigError("config file not found", str(p))
        return p
    env = os.environ.get(CONFIG_ENV)
    if env:
        p = Path(env)
        if not p.is_file():
            raise ConfigError(f"config file named by ${CONFIG_ENV} not found", str(p))
        return p
    for p in (Path.cwd() / "config.yaml", REPO_ROOT / "config.yaml"):
        if p.is_file():
            return p
    return None


def parse_config(data: Any, path: str | None = None, base: Path | None = None) -> Config:
    """Validate an already-parsed YAML document and build a Config from it."""
    base = base or Path.cwd()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping of keys, got {type(data).__name__}", path)
    cfg = _build(Config, data, "", path, base)
    _check_servers(cfg.servers, "servers", path)
    check_shell_config(cfg.worker.shell.allow, cfg.worker.shell.env_allow, path)
    return cfg


def load_config(path: str | os.PathLike | None = None, servers: list[str] | str | None = None) -> Config:
    """Find, read and validate the config; ``servers`` overrides the file's list (--servers)."""
    found = find_config(path)
    if found is None:
        cfg = parse_config({}, None, REPO_ROOT)
    else:
        try:
            text = found.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read: {e.strerror}", str(found)) from None
        try:
            data = yaml.safe_load(text)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
            raise ConfigError(f"YAML syntax error: {e.problem or e}", str(found), line=line, column=col) from None
        except yaml.YAMLError as e:
            raise ConfigError(f"YAML error: {e}", str(found)) from None
        cfg = parse_config(data, str(found), found.resolve().parent)
        cfg.source = found
    if servers:
        cfg = cfg.with_servers(servers)
    return cfg
