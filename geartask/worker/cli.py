"""runworkers: start N threaded Gearman workers for the enabled plugins' tasks and `shell`.

    python worker_client/runworkers.py --name w1 --threads 10 [--config PATH] [--servers H:P,...]
                                       [--plugins eg,...] [--max-jobs N]

Runs until a shutdown control job (``manage_client.py shutdown``), SIGTERM, SIGINT, SIGHUP or
``--max-jobs`` jobs done; then stops taking jobs, lets in-flight jobs finish within
worker.grace seconds and exits 0. A second signal exits at once (gearmand requeues what was
in flight).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from typing import TYPE_CHECKING, Sequence

from ..cli import ArgumentParser, add_common_args, config_from_args, run, setup_logging
from ..arguments import prog
from ..control import check_name
from ..errors import ConfigError, UsageError
from ..logs import flush_logs, get_logger
from ..plugins import load_plugins, plugin_path_warnings
from ..shell import veryeasyprocess
from ..targets import TargetError, check_label
from .isolate import isolated_tasks
from .process import WorkerProcess
from .resources import check_keepalive, check_threads, ensure_open_files

if TYPE_CHECKING:
    from ..config import Config


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=prog("worker", "runworkers.py"), description="Start threaded geartask workers.")
    add_common_args(p)
    p.add_argument("--name", help="worker name shown by the manager (default: worker.name, the host name)")
    p.add_argument("--threads", type=int, help="worker threads (default: worker.threads)")
    p.add_argument("--plugins", metavar="NAME,...",
                   help="plugins whose tasks to serve (default: plugins.enabled, or every plugin found)")
    p.add_argument("--max-jobs", type=int, metavar="N",
                   help="exit 0 after N jobs, for a supervisor to start a fresh process (default: "
                        "worker.max_jobs; 0: no limit)")
    p.add_argument("--label", action="append", metavar="LABEL",
                   help="a label targeted jobs can name (TASK@label:LABEL), added to worker.labels (repeat for several)")
    return p


def with_labels(config: Config, labels: list[str]) -> Config:
    """worker.labels plus the --label ones, each checked (UsageError names the bad one)."""
    for label in labels:
        try:
            check_label(label, "--label")
        except TargetError as e:
            raise UsageError(str(e)) from None
    merged = list(dict.fromkeys([*config.worker.labels, *labels]))
    return dataclasses.replace(config, worker=dataclasses.replace(config.worker, labels=merged))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    if args.label:
        config = with_labels(config, args.label)
    name = check_name(args.name if args.name is not None else config.worker.name)
    source = str(config.source) if config.source else None
    if args.threads is not None:
        threads = check_threads(args.threads)
    else:
        threads = check_threads(config.worker.threads, source, flag=False)
    check_keepalive(config.worker.keepalive, source)
    max_jobs = config.worker.max_jobs if args.max_jobs is None else args.max_jobs
    if max_jobs < 0:
        raise UsageError(f"--max-jobs must be 0 (no limit) or more, got {max_jobs}")
    only = [p.strip() for p in args.plugins.split(",") if p.strip()] if args.plugins else None
    # Everything that can fail on bad input fails here, before a single thread starts.
    plugins = load_plugins(config, only=only)
    tasks = isolated_tasks(plugins.tasks(), config)
    WorkerProcess.plan(config, threads, tasks)  # worker.tasks against the tasks and threads
    ensure_open_files(threads, len(config.servers))
    from ..gearman import CONNECT_TIMEOUT, tls_for
    for address in config.server_addresses:  # tls.* files read now: a thread would only retry
        if address.tls:
            tls_for(*address)
    from ..trust.tls import refused_everywhere
    refusal = refused_everywhere(config, CONNECT_TIMEOUT)  # only a new certificate and a restart cure it
    if refusal:
        raise ConfigError(f"every server refuses this host's certificate: {refusal}", source, "tls.cert")
    setup_logging(config, args, "worker", name)
    for warning in plugin_path_warnings(config):  # it then serves fewer tasks than meant
        get_logger("geartask.worker").warning(warning)

    process = WorkerProcess(config, name, threads, tasks, max_jobs=max_jobs, sinks=plugins)
    signals_seen = []

    def on_signal(signum, frame):
        signals_seen.append(signum)
        if len(signals_seen) > 1:
            veryeasyprocess.kill_all()  # no command outlives us in its own process group
            flush_logs()
            os._exit(1)  # second signal: now; gearmand requeues in-flight jobs
        process.request_shutdown(now=False, reason=signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # SIGHUP: its terminal was closed
        signal.signal(sig, on_signal)
    process.start()
    if config.fleet:  # a worker of a named fleet looks once for other fleets on its servers
        from ..fleet.neighbours import warn_other_fleets
        warn_other_fleets(config)  # one warning line each
    try:
        return process.wait()
    finally:
        process.close()


def cli() -> None:
    sys.exit(run(main))


if __name__ == "__main__":
    cli()
