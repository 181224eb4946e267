"""geartask: YAML-configured task distribution on the Gearman job server.

The shared core of the three roles (sender, worker runner, manager): config, logging,
plugins, the Gearman protocol and its quirks, and the local gearmand.
"""

from .errors import (ConfigError, GeartaskError, JobDefinitionError, JobError, LocalServerError,
                     NoServerError, PluginError, ServerError, UsageError)
from .hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["hookimpl", "GeartaskError", "ConfigError", "UsageError", "PluginError", "ServerError",
           "NoServerError", "LocalServerError", "JobError", "JobDefinitionError", "__version__"]
