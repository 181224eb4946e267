"""The manager's library under its older name: it is geartask.fleet now (below the ``manage``
command, the dashboard and the outcomes collector, which all use it). Kept for code that
imports ``geartask.admin.admin``; new code imports ``geartask.fleet``."""

from __future__ import annotations

from ..fleet import *  # noqa: F401,F403
from ..fleet import __all__  # noqa: F401
