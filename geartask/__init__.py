"""geartask: YAML-configured task distribution on the Gearman job server.

The public API, importable from here::

    from geartask import JobSender, Admin, hookimpl, JobRejected, AttemptFailed, load_config

Roles live in subpackages: ``geartask.worker`` (the worker runner), ``geartask.sender``,
``geartask.fleet`` (the manager's library), ``geartask.admin`` (the manage command), ``geartask.shell``
(the shell task and veryeasyprocess), ``geartask.outcomes`` (job outcomes for the whole fleet).
"""

from __future__ import annotations

from typing import Any

from .config import Config, load_config
from .errors import (AttemptFailed, ConfigError, GeartaskError, JobDefinitionError, JobError, JobRejected,
                     LocalServerError, NoServerError, PluginError, ServerError, UsageError)
from .hookspecs import hookimpl

__version__ = "0.1.0"

# Imported on first use: a plugin that only needs ``hookimpl`` should not pay for the roles.
_LAZY = {
    "JobSender": "geartask.sender.sender",
    "JobResult": "geartask.sender.sender",
    "Admin": "geartask.fleet",
    "JobDefinition": "geartask.jobs",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'geartask' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = ["hookimpl", "load_config", "Config", "JobSender", "JobResult", "Admin", "JobRejected", "AttemptFailed",
           "JobDefinition", "GeartaskError", "ConfigError", "UsageError", "PluginError", "ServerError",
           "NoServerError", "LocalServerError", "JobError", "JobDefinitionError", "__version__"]
