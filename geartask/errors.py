"""geartask's exception tree. Every error a user can cause is one of these.

The command lines turn them into a one-line message and an exit status
(``exit_status``); nothing below GeartaskError should reach a user as a traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # a job failed or a server could not be reached: found at run time
EXIT_USAGE = 2  # bad command line, config or plugin: found before any work starts


class GeartaskError(Exception):
    """Base of every error geartask raises on purpose."""

    exit_status = EXIT_FAILED


class ConfigError(GeartaskError):
    """Raised when the config file or a command-line override is invalid.

    ``path`` is the file, ``key`` the dotted key path (``worker.threads``),
    ``line``/``column`` are 1-based positions for YAML syntax errors.
    """

    exit_status = EXIT_USAGE

    def __init__(self, message: str, path: str | None = None, key: str | None = None,
                 line: int | None = None, column: int | None = None):
        self.path, self.key, self.line, self.column = path, key, line, column
        where = path or "<config>"
        if line is not None:
            where += f":{line}:{column}"
        if key:
            where += f": {key}"
        super().__init__(f"{where}: {message}")


class UsageError(GeartaskError):
    """Raised when a command line or API call is given something it can't use."""

    exit_status = EXIT_USAGE


class PluginError(GeartaskError):
    """Raised when a plugin can't be found, imported or called, or clashes with another."""

    exit_status = EXIT_USAGE

    def __init__(self, message: str, plugin: str | None = None, file: str | None = None):
        self.plugin, self.file = plugin, file
        prefix = ""
        if plugin:
            prefix = f"plugin {plugin!r}" + (f" ({file})" if file else "") + ": "
        super().__init__(prefix + message)


class ServerError(GeartaskError):
    """Raised when a job server can't be reached, drops the connection or answers an error."""

    def __init__(self, message: str, server: str | None = None):
        self.server = server
        super().__init__(f"{server}: {message}" if server else message)


class NoServerError(ServerError):
    """Raised when none of the configured job servers could be reached."""

    def __init__(self, servers: list[str], reasons: dict[str, str] | None = None):
        self.servers = servers
        self.reasons = reasons or {}
        tried = ", ".join(f"{s} ({self.reasons[s]})" if s in self.reasons else s for s in servers)
        super().__init__(f"no job server reachable; tried {tried}")


class LocalServerError(GeartaskError):
    """Raised when the local gearmand can't be started, found or stopped."""


class JobError(GeartaskError):
    """Raised when a job can't be built, sent or run."""

    def __init__(self, message: str, task: str | None = None, unique: str | None = None):
        self.task, self.unique = task, unique
        super().__init__(message)


class NoSuchHostError(JobError):
    """A targeted job names a host (or label) that no worker serving its task announces:
    reported at once, not queued for a worker that will never come."""


class JobDefinitionError(JobError):
    """Raised when a job definition is malformed (no task, data that can't be serialised...)."""

    exit_status = EXIT_USAGE


class AttemptFailed(JobError):
    """This attempt failed; the worker retries it (up to the job's retries)."""

    def __init__(self, reason: str, details: dict | None = None):
        super().__init__(reason)
        self.reason = reason
        self.details = details or {}


class JobRejected(AttemptFailed):
    """The job can never succeed as sent (bad data, refused command): fail it without retrying."""
