"""The fleet: gearmand's admin protocol, asked of every configured server at once.

Every call runs against each server in its own thread with a deadline and returns one
``ServerResult`` per server, holding either the value or the error: a dead or slow server
is reported as such and never hides (or holds up) the others.

One module per concern: ``checks`` (what an operator may type), ``replies`` (one parser per
admin reply), ``server`` (the operations on one server, each over one connection), ``ping``
(worker processes through their control functions), ``drain`` (the clear-queue grab loop),
``reports`` (what the fleet-wide calls return) and ``admin`` (``Admin``, the fleet-wide class).
The ``manage`` command (geartask/admin/) and the dashboard are built on it; the outcomes
collector uses it to find rival collectors. It sits below all three and loads no role.

What gearmand 1.1 really does, found by trying it (tests/test_manager.py keeps it true):

* ``drop function`` only unlinks the function: its queued jobs stay in memory (``show jobs``)
  and in the sqlite queue, a worker can no longer grab them, and they come back at restart.
  Never used here.
* ``cancel job H`` marks a job ignored and deletes its sqlite row, but ``status`` keeps
  counting it until a worker's grab skips it. It does so for a *running* job too (deleting the
  row that would have saved it from a crash), so ``cancel`` first checks GET_STATUS says "not
  running". For a job orphaned by ``drop function`` it answers OK and deletes nothing.
* ``show jobs`` lines are ``handle \\t retries \\t ignore \\t queued``; the last column is 1 for
  running jobs as well, and no line names the function or unique key; ``show unique jobs``
  lists unique keys without handles. So ``jobs`` asks GET_STATUS for each handle.
* What truly clears: connect as a worker of the function, GRAB_JOB_UNIQ until NO_JOB and
  answer every job with WORK_FAIL. gearmand then frees the job and deletes its sqlite row,
  with or without other workers connected; running jobs are never handed out, so they stay.
"""

from __future__ import annotations

from .admin import Admin
from .drain import DRAIN_BATCH
from .checks import MAX_FUNCTION, MAX_HANDLE, MAX_QUEUE, check_function, check_handle, check_host, check_worker_name
from .ping import PING_UNIQUE, PingResult
from .replies import FunctionStatus, QueuedJob, WorkerConnection, parse_show_jobs, parse_status, parse_workers
from .reports import (FleetProcess, JobStop, ProcessShutdown, ServerResult, ShutdownReport, StopReport, all_ok,
                      group_processes, plain)
from .server import (DEFAULT_TIMEOUT, MANAGER_CLIENT_ID, PartialError, connected, server_cancel, server_clear,
                     server_control_call, server_jobs, server_maxqueue, server_ping, server_ping_workers, server_snapshot, server_status,
                     server_version, server_workers, submit_control)

__all__ = ["Admin", "MAX_FUNCTION", "MAX_HANDLE", "MAX_QUEUE", "check_function", "check_handle", "check_host",
           "check_worker_name", "PING_UNIQUE", "PingResult", "FunctionStatus", "QueuedJob", "WorkerConnection",
           "parse_show_jobs", "parse_status", "parse_workers", "FleetProcess", "JobStop", "ProcessShutdown",
           "ServerResult", "ShutdownReport", "StopReport", "all_ok", "group_processes", "plain", "DEFAULT_TIMEOUT",
           "MANAGER_CLIENT_ID", "PartialError", "DRAIN_BATCH", "connected", "server_cancel", "server_clear",
           "server_control_call", "server_jobs",
           "server_maxqueue", "server_ping", "server_ping_workers", "server_snapshot", "server_status",
           "server_version", "server_workers", "submit_control"]
