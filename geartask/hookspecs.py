"""The hooks a geartask plugin may implement: the contract between geartask and plugins.

A plugin is a module (in one of ``plugins.paths``, or named by a ``geartask.plugins``
entry point) with functions marked ``@hookimpl``. Hooks are called with keyword arguments
only, and an implementation may accept fewer arguments than the spec lists, so specs can
grow without breaking plugins. A marked function whose name matches no spec is an error.

Example::

    from geartask import hookimpl

    @hookimpl
    def geartask_tasks():
        return {"reverse": lambda job: job.data[::-1]}

    @hookimpl
    def geartask_jobs():
        yield {"task": "reverse", "data": "hello"}
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

import pluggy

if TYPE_CHECKING:
    from .config import Config

PROJECT = "geartask"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def geartask_tasks(config: Config) -> dict[str, Callable[[Any], Any]]:
    """Worker side: return the tasks this plugin provides, as ``{task_name: callable}``.

    :param config: the loaded :class:`geartask.config.Config`.

    Each callable is called as ``fn(job)`` for every job of that name, in a worker
    thread. ``job`` has: ``data`` (the payload, JSON-decoded when it is JSON, else text,
    else bytes), ``raw`` (the payload bytes), ``task``, ``handle``, ``unique``, ``attempt``
    (1 for the first try), ``retries`` (how many retries this job gets), ``config``, ``log`` (a logger bound to this job),
    ``cancel`` (a threading.Event set when the job must end: the shutdown grace is over, or an
    operator stopped it; a long task may watch it), and ``status(numerator, denominator)`` and
    ``send_data(data)`` to report progress and partial output. The return value becomes the job's result: bytes as they are,
    anything else as JSON. An exception fails this attempt; the worker retries it up to
    ``worker.retries`` times and then fails the job with the reason.

    Two plugins returning the same task name is an error, not a silent override, and so is
    a name geartask serves itself (``shell``, ``geartask.control:*``).
    """


@hookspec
def geartask_jobs(config: Config) -> Iterable[Any]:
    """Sender side: yield the job definitions this plugin sends.

    :param config: the loaded :class:`geartask.config.Config`.

    Each definition is a mapping (or :class:`geartask.jobs.JobDefinition`) with
    ``task`` (required), ``data`` (anything JSON can hold, or bytes), and optionally
    ``unique`` (the key gearmand coalesces on; generated when missing), ``priority``
    (``low``/``normal``/``high``), ``background`` (bool) and ``retries``.
    """


@hookspec
def geartask_schedules(config: Config) -> Iterable[dict]:
    """Scheduler side: yield periodic job definitions, like the config's ``schedules`` list.

    :param config: the loaded :class:`geartask.config.Config`.

    Each is a mapping with ``name`` (unique among all schedules), ``task``, exactly one of
    ``cron`` (a cron expression, e.g. ``"*/5 * * * *"``) and ``every`` (seconds), and
    optionally ``data``, ``priority``, ``timezone`` (for the cron fields; default UTC),
    ``jitter`` (seconds), ``misfire`` (``latest``/``skip``/``all``) and ``misfire_cap``.
    """


@hookspec
def geartask_job_done(job: Any, result: Any) -> None:
    """Worker side: a job completed (after its retries). ``job`` is what the task received;
    ``result`` is what the task returned. For sinks: metrics, audit trails.

    Called in the worker thread after the answer is decided and before it is sent, so keep it
    quick. An exception here is logged and never fails the job.
    """


@hookspec
def geartask_job_failed(job: Any, reason: dict) -> None:
    """Worker side: a job failed for good. ``reason`` is the JSON reason the client gets
    (``error``, ``attempts``, ``task``, ``worker``...). For sinks: Sentry, mail, a chat.

    An exception here is logged and never fails the job (nor changes its reason).
    """
